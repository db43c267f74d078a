// SIMD across blocks: one vector lane per block, W blocks per tile.
//
// A 9x9 block is too small to vectorise inside, but W blocks side by side fill a vector
// register (W = 8 floats with AVX2, 16 with AVX-512): each scalar step of the per-block
// algorithm becomes one vector instruction for W blocks, with no shuffles and no branches.
// This is the layout MKL's "compact" batched routines use. Written with GCC/Clang vector
// extensions so the same code compiles to AVX2, AVX-512 or NEON, and torch-free.
//
// A tile holds the lower triangle of each of its blocks as vectors, lane l = block l: by
// default packed, entry (i, j), j <= i, at index i(i+1)/2 + j (the canonical packed order);
// the dense kernels use full row-major blocks in place instead (FullIndex).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mbf {
namespace lanes {

#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
inline constexpr int kVectorBytes = 32;
#else
inline constexpr int kVectorBytes = 16;  // SSE2 / NEON
#endif

template <typename T>
struct Lanes {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  static constexpr int W = kVectorBytes / int(sizeof(T));
  using I = std::conditional_t<std::is_same_v<T, float>, int32_t, int64_t>;
  typedef T V __attribute__((vector_size(kVectorBytes)));   // W values, one per block
  typedef I M __attribute__((vector_size(kVectorBytes)));   // lane masks / lane integers
};

// x in every lane. (x - 0, not 0 + x: x - (+0) is x for every x, so GCC folds it to a plain
// broadcast; 0 + x is not x for x = -0, and cost an add before each broadcast.)
template <typename V, typename S>
inline V splat(S x) {
  return x - V{};
}

inline constexpr int tri_index(int i, int j) { return i * (i + 1) / 2 + j; }

// ---------------------------------------------------------------------------------------
// Compile-time loops. GCC does not fully unroll the triangular loop nests on its own (the
// d = 9 factorisation kept its loops, with ~6 scalar index instructions per vector
// multiply-add), so the hot sizes are unrolled explicitly: a bound is either Ic<N>, a
// compile-time constant, or a plain int (generic path). loop(lo, hi, f) expands f(Ic<k>)
// for every k when both bounds are constants and is an ordinary loop otherwise, so each
// algorithm below is written once for both.
template <int N>
struct Ic {
  static constexpr int value = N;
  constexpr operator int() const { return N; }
};
template <int A, int B>
constexpr Ic<A + B> operator+(Ic<A>, Ic<B>) { return {}; }
template <int A, int B>
constexpr Ic<A - B> operator-(Ic<A>, Ic<B>) { return {}; }

// On each lambda that a loop unrolls: without it GCC inlines the unrolled bodies only up to
// its size limits and calls the rest, so that the d = 9 dense solve's substitutions and the
// d = 16 factorisation ran as out-of-line calls, their vectors passed through memory.
#define MBF_INLINE __attribute__((always_inline))

template <typename X>
inline constexpr bool is_ic = false;
template <int N>
inline constexpr bool is_ic<Ic<N>> = true;

template <int Lo, typename F, int... K>
__attribute__((always_inline)) inline void unrolled(F&& f, std::integer_sequence<int, K...>) {
  (f(Ic<Lo + K>{}), ...);
}

template <typename Lo, typename Hi, typename F>
__attribute__((always_inline)) inline void loop(Lo lo, Hi hi, F&& f) {
  if constexpr (is_ic<Lo> && is_ic<Hi>) {
    if constexpr (Hi::value > Lo::value)
      unrolled<Lo::value>(f, std::make_integer_sequence<int, Hi::value - Lo::value>{});
  } else {
    for (int k = lo; k < hi; ++k) f(k);
  }
}

// Sizes up to this are unrolled completely; larger hot sizes (25, 27) keep compile-time
// bounds but run as loops, which keeps the code size and the compile time reasonable.
inline constexpr int kMaxUnrolled = 16;

template <int D>
using BlockDim = std::conditional_t<(D > 0 && D <= kMaxUnrolled), Ic<D>, int>;

// Where entry (i, j), j <= i, of a tile's block lives: the packed triangle (the default,
// and the compact layout's order) or a full row-major n x n block (the dense API's layout,
// used in place after the transposing load). With Ic arguments both fold to constants.
struct PackedIndex {
  template <typename I, typename J>
  constexpr int operator()(I i, J j) const { return tri_index(i, j); }
};
template <typename N>
struct FullIndex {
  N n;
  template <typename I, typename J>
  constexpr int operator()(I i, J j) const { return int(i) * int(n) + int(j); }
};
// A full block stored transposed (a column-major batch, as torch.linalg.cholesky returns its
// factors): entry (i, j) at j n + i.
template <typename N>
struct TransposedFullIndex {
  N n;
  template <typename I, typename J>
  constexpr int operator()(I i, J j) const { return int(j) * int(n) + int(i); }
};

template <int D>
inline BlockDim<D> block_dim(int d) {
  if constexpr (D > 0 && D <= kMaxUnrolled) return {};
  else return D > 0 ? D : d;
}

// Lane-wise sqrt. With -fno-math-errno the compiler emits one vector sqrt instruction. (`r{}`:
// every lane is written below, but GCC's -Wmaybe-uninitialized fires with 16 AVX-512 lanes.)
template <typename T>
inline typename Lanes<T>::V vsqrt(typename Lanes<T>::V x) {
  typename Lanes<T>::V r{};
  for (int l = 0; l < Lanes<T>::W; ++l) r[l] = std::sqrt(x[l]);
  return r;
}

// c - a b, lane-wise, as one fused multiply-add where the level has one, and spelled out: GCC
// fuses `c - a * b` at its own discretion, per instantiation, and did so differently in the
// solve's float32- and bfloat16-factor instantiations at some d, so that the two steps no
// longer agreed bit for bit on equal factors. Written through this, the solve rounds the same
// in every instantiation. (Without FMA, as at the scalar level, there is nothing to fuse.)
template <typename V>
__attribute__((always_inline)) inline V fnmadd(V a, V b, V c) {
#if defined(__AVX512F__) || defined(__FMA__)
  using T = std::remove_cv_t<std::remove_reference_t<decltype(a[0])>>;
#endif
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && std::is_same_v<T, float>)
    return (V)_mm512_fnmadd_ps((__m512)a, (__m512)b, (__m512)c);
  if constexpr (sizeof(V) == 64 && std::is_same_v<T, double>)
    return (V)_mm512_fnmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#endif
#if defined(__FMA__)
  if constexpr (sizeof(V) == 32 && std::is_same_v<T, float>)
    return (V)_mm256_fnmadd_ps((__m256)a, (__m256)b, (__m256)c);
  if constexpr (sizeof(V) == 32 && std::is_same_v<T, double>)
    return (V)_mm256_fnmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#endif
  return c - a * b;
}

// In-place Cholesky of a tile: `a` holds the damped lower triangles (tri vectors) on entry
// and the lower factors on exit; `inv_diag` (n vectors) receives 1 / L_ii.
// Returns per-lane info: 0 on success, else 1 + the first row whose pivot was not a finite
// positive number (same contract as cholesky_block). A failed lane keeps computing on a
// pivot of 1 so that it stays finite; its results are discarded by the caller.
//
// Right-looking (outer-product) order: after column j is scaled, the trailing update's
// multiply-adds are all independent, which keeps the pipeline full. The row-by-row
// (left-looking) order is one long dependency chain per row and ran at an IPC below 0.5.
// Each entry still receives its updates in the same order (k = 0, 1, ...), so the rounding
// is that of the row-by-row version.
//
// `column(j)` runs at the start of column j: a caller spreads its prefetches over the columns
// there (lane_types.h, SpreadPrefetch).
struct NoColumnHook {
  template <typename J>
  void operator()(J) const {}
};

template <typename T, int D, typename Index = PackedIndex, typename ColumnHook = NoColumnHook>
inline typename Lanes<T>::M factor_tile(typename Lanes<T>::V* a, typename Lanes<T>::V* inv_diag,
                                        int d, Index idx = {},
                                        const ColumnHook& column = ColumnHook{}) {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  const auto n = block_dim<D>(d);
  constexpr Ic<1> one;
  M info = splat<M>(0);
  loop(Ic<0>{}, n, [&](auto j) MBF_INLINE {
    column(j);
    V s = a[idx(j, j)];
    // (s - s) == 0 is false exactly for Inf and NaN; s > 0 is false for NaN.
    const M ok = (s > T(0)) & ((s - s) == T(0));
    info = ((info == 0) & ~ok) ? splat<M>(int(j) + 1) : info;
    s = ok ? s : splat<V>(T(1));
    const V r = vsqrt<T>(s);
    const V inv = T(1) / r;
    a[idx(j, j)] = r;
    inv_diag[j] = inv;
    loop(j + one, n, [&](auto i) MBF_INLINE { a[idx(i, j)] *= inv; });
    loop(j + one, n, [&](auto i) MBF_INLINE {
      const V lij = a[idx(i, j)];
      loop(j + one, i + one, [&](auto k) MBF_INLINE { a[idx(i, k)] -= lij * a[idx(k, j)]; });
    });
  });
  return info;
}

// Solve (L L^T) x = b in place for k right-hand sides: x[i * k + c], i < n, c < k.
// L[t] is packed entry t of the factor: a pointer to vectors, or any accessor returning
// one (the step reads a compact tile in place that way). 1 / L_ii is inv_diag[i], or, with
// InvDiagInL, L's own diagonal entry (the compact factor stores it that way).
//
// Written as L = U D, U unit lower (U_ij = L_ij / L_jj), so that (L L^T)^{-1} b =
// U^{-T} D^{-2} U^{-1} b: each column of a substitution is then one multiply-add on the
// dependency chain (U_ij's multiply and the D^{-2} scaling sit beside it), where L y = b
// took a multiply-add and then a multiply. At d = 9 the chain is most of a solve's latency.
// Column-oriented, for the same reason as the right-looking factorisation.
//
// One right-hand side of an unrolled size is solved in a local copy: x and L may alias as
// far as the compiler knows (L is read through memcpy or the same vector type), so in place
// every update was stored before the next read of L, 2 n^2 stores per solve where the
// values fit the registers (d = 9 at AVX2: 90 stores per tile, the store port's limit).
template <typename T, int D, bool InvDiagInL = false, typename Rows,
          typename Index = PackedIndex>
inline void solve_tile(const Rows& L, const typename Lanes<T>::V* inv_diag,
                       typename Lanes<T>::V* x, int d, int k, Index idx = {}) {
  using V = typename Lanes<T>::V;
  const auto n = block_dim<D>(d);
  constexpr Ic<1> one;
  auto inverse_pivot = [&](auto i) MBF_INLINE -> V {
    if constexpr (InvDiagInL) return L[idx(i, i)];
    else return inv_diag[i];
  };
  auto unit = [&](auto i, auto j) MBF_INLINE -> V {  // U_ij
    return L[idx(i, j)] * inverse_pivot(j);
  };
  auto substitute = [&](V* xs, int stride, int c) MBF_INLINE {
    loop(Ic<0>{}, n, [&](auto j) MBF_INLINE {  // U z = b
      const V zj = xs[j * stride + c];
      loop(j + one, n, [&](auto i) MBF_INLINE {
        xs[i * stride + c] = fnmadd(unit(i, j), zj, xs[i * stride + c]);
      });
    });
    loop(Ic<0>{}, n, [&](auto i) MBF_INLINE {  // w = D^{-2} z
      const V q = inverse_pivot(i);
      xs[i * stride + c] *= q * q;
    });
    loop(Ic<0>{}, n, [&](auto r) MBF_INLINE {  // U^T x = w, rows from the last
      const auto i = n - one - r;
      const V xi = xs[i * stride + c];
      loop(Ic<0>{}, i, [&](auto j) MBF_INLINE {
        xs[j * stride + c] = fnmadd(unit(i, j), xi, xs[j * stride + c]);
      });
    });
  };
  if constexpr (is_ic<std::remove_const_t<decltype(n)>>) {
    if (k == 1) {
      V local[decltype(n)::value];
      loop(Ic<0>{}, n, [&](auto i) MBF_INLINE { local[i] = x[i]; });
      substitute(local, 1, 0);
      loop(Ic<0>{}, n, [&](auto i) MBF_INLINE { x[i] = local[i]; });
      return;
    }
  }
  for (int c = 0; c < k; ++c) substitute(x, k, c);
}

// (L L^T)^{-1} = L^{-T} L^{-1}, written as a packed lower triangle `out` (tri vectors);
// `linv` is scratch for the packed L^{-1}. Forming the product from L^{-1} makes the
// inverse exactly symmetric, unlike a solve against the identity.
template <typename T, int D, typename Index = PackedIndex>
inline void inverse_tile(const typename Lanes<T>::V* L, const typename Lanes<T>::V* inv_diag,
                         typename Lanes<T>::V* linv, typename Lanes<T>::V* out, int d,
                         Index idx = {}) {
  using V = typename Lanes<T>::V;
  const auto n = block_dim<D>(d);
  constexpr Ic<1> one;
  loop(Ic<0>{}, n, [&](auto j) MBF_INLINE {
    linv[tri_index(j, j)] = inv_diag[j];
    loop(j + one, n, [&](auto i) MBF_INLINE {
      V s = splat<V>(T(0));
      loop(j, i, [&](auto k) MBF_INLINE { s += L[idx(i, k)] * linv[tri_index(k, j)]; });
      linv[tri_index(i, j)] = -s * inv_diag[i];
    });
  });
  loop(Ic<0>{}, n, [&](auto i) MBF_INLINE {
    loop(Ic<0>{}, i + one, [&](auto j) MBF_INLINE {
      V s = splat<V>(T(0));
      loop(i, n, [&](auto k) MBF_INLINE {
        s += linv[tri_index(k, i)] * linv[tri_index(k, j)];
      });
      out[tri_index(i, j)] = s;
    });
  });
}

// ---------------------------------------------------------------------------------------
// Moving tiles between the blocks' own layout and lanes.
//
// gather_lanes: `count` consecutive elements of each of `cnt` blocks (block l starts at
// src + l * stride) into lane l of dst[0 .. count): dst[e * W + l] = src[l * stride + e].
// Lanes from cnt to W are set to `pad`. scatter_lanes is the inverse, for lanes < cnt.
//
// With AVX2 (and AVX-512) and a full tile, 8 (float) or 4 (double) blocks' rows are loaded
// as vectors and transposed in registers: a handful of shuffles per vector instead of one
// scalar store per element, whose vector reloads stall on store forwarding. The scalar level,
// the batch tail and the last `count % 8` (or 4) elements take the scalar loop.

#if defined(__AVX2__)
inline void transpose_in_registers(__m256* r) {  // 8 x 8 floats
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

inline void transpose_in_registers(__m256d* r) {  // 4 x 4 doubles
  const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
  const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
  r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
  r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
  r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
  r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}

// Unaligned loads and stores of one AVX2 register, by element type. (Specialisations rather
// than std::conditional_t: template arguments drop the vector types' alignment attributes.)
template <typename T>
struct Avx2;
template <>
struct Avx2<float> {
  using R = __m256;
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
};
template <>
struct Avx2<double> {
  using R = __m256d;
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
};
#endif

#if defined(__AVX2__)
// One register of W lanes (a whole row of a tile) by element type: from the AVX2 transposes'
// G-lane groups (`row`: group h's row e, joined at AVX-512), a store, and a `column`: one
// element of each of the W blocks at src + l stride, for the rows left over by the
// transposes. At AVX2 a row is one Avx2 register, whose type and store it takes.
template <typename T>
struct FullRow;

#if defined(__AVX512F__)
// At AVX-512 a column is a gather at 32-bit offsets (the caller checks that the last block's
// offset fits). (Masked gathers and __builtin_shufflevector for the join: GCC's plain gathers
// and inserts read an undefined source, which -Wmaybe-uninitialized reports.)
template <>
struct FullRow<float> {
  using R = __m512;
  static R row(const __m256 (*r)[8], int e) {
    return __builtin_shufflevector(r[0][e], r[1][e], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                   13, 14, 15);
  }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R column(const float* src, int64_t stride) {
    const __m512i index = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int32_t>(stride)));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), __mmask16(0xFFFF), index, src, 4);
  }
};
template <>
struct FullRow<double> {
  using R = __m512d;
  static R row(const __m256d (*r)[4], int e) {
    return __builtin_shufflevector(r[0][e], r[1][e], 0, 1, 2, 3, 4, 5, 6, 7);
  }
  static void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static R column(const double* src, int64_t stride) {
    const __m256i index = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32(static_cast<int32_t>(stride)));
    return _mm512_mask_i32gather_pd(_mm512_setzero_pd(), __mmask8(0xFF), index, src, 8);
  }
};
#else
// At AVX2 a column is W unaligned loads, the one at src + l (stride - 1) having block l's
// element in its lane l, blended. They replace a vgatherdps on which perf put a fifth of the
// gathers' samples on Zen 3 at d = 9, though no speed-up was measurable: plain loads and
// blends are cheap on every x86 core, the gather is not everywhere. Every load stays inside
// [src, src + (W - 1) stride].
template <>
struct FullRow<float> : Avx2<float> {
  static R row(const __m256 (*r)[8], int e) { return r[0][e]; }
  static R column(const float* src, int64_t stride) {
    const int64_t s = stride - 1;
    R c = _mm256_loadu_ps(src);
    c = _mm256_blend_ps(c, _mm256_loadu_ps(src + 1 * s), 0x02);
    c = _mm256_blend_ps(c, _mm256_loadu_ps(src + 2 * s), 0x04);
    c = _mm256_blend_ps(c, _mm256_loadu_ps(src + 3 * s), 0x08);
    c = _mm256_blend_ps(c, _mm256_loadu_ps(src + 4 * s), 0x10);
    c = _mm256_blend_ps(c, _mm256_loadu_ps(src + 5 * s), 0x20);
    c = _mm256_blend_ps(c, _mm256_loadu_ps(src + 6 * s), 0x40);
    return _mm256_blend_ps(c, _mm256_loadu_ps(src + 7 * s), 0x80);
  }
};
template <>
struct FullRow<double> : Avx2<double> {
  static R row(const __m256d (*r)[4], int e) { return r[0][e]; }
  static R column(const double* src, int64_t stride) {
    const int64_t s = stride - 1;
    R c = _mm256_loadu_pd(src);
    c = _mm256_blend_pd(c, _mm256_loadu_pd(src + 1 * s), 0x2);
    c = _mm256_blend_pd(c, _mm256_loadu_pd(src + 2 * s), 0x4);
    return _mm256_blend_pd(c, _mm256_loadu_pd(src + 3 * s), 0x8);
  }
};
#endif
#endif

#if defined(__AVX512F__)
// The hot case, 3x3 kernels: 16 contiguous 9-float blocks (stride 9, a conv weight's own
// layout) are 9 zmm registers, and block l's element e sits at 9 l + e. Since 9 = 3 x 3, the
// 16 x 9 transpose is two deinterleaves by 3 (9 l + e = 3 (3 l + a) + b for e = 3 a + b),
// each output register two two-source permutes: 36 vpermt2ps per direction, in registers,
// every store a whole zmm. (The generic path below moved element 8 by scalar stores and the
// rest as 256-bit halves, and the step's 512-bit reloads of those stalled on store
// forwarding: about half the fused step's time at d = 9.)
struct Stride3 {
  // take[b]: output lane i <- position 3 i + b of (x, y) (< 32); then keep[b]: lane i kept
  // from the first result where 3 i + b < 32, else position 3 i + b - 32 of z.
  __m512i take[3], keep[3];
  // put[r]: for output register r of an interleave, lane i (position P = 16 r + i) <- stream
  // P % 3 at P / 3; first from streams 0 and 1 (put), then stream 2 (put2).
  __m512i put[3], put2[3];
  Stride3() {
    alignas(64) int32_t a[16], b[16], c[16], e[16];
    for (int o = 0; o < 3; ++o) {
      for (int i = 0; i < 16; ++i) {
        const int q = 3 * i + o, p = 16 * o + i;
        a[i] = q < 32 ? q : 0;
        b[i] = q < 32 ? i : 16 + (q - 32);
        c[i] = p % 3 == 2 ? 0 : (p % 3) * 16 + p / 3;
        e[i] = p % 3 == 2 ? 16 + p / 3 : i;
      }
      take[o] = _mm512_load_si512(a);
      keep[o] = _mm512_load_si512(b);
      put[o] = _mm512_load_si512(c);
      put2[o] = _mm512_load_si512(e);
    }
  }
  // Lane i <- position 3 i + o of the 48 values in x, y, z.
  __m512 deinterleave(__m512 x, __m512 y, __m512 z, int o) const {
    return _mm512_permutex2var_ps(_mm512_permutex2var_ps(x, take[o], y), keep[o], z);
  }
  // Register r of the 48 values whose position P holds s[P % 3] lane P / 3.
  __m512 interleave(__m512 s0, __m512 s1, __m512 s2, int r) const {
    return _mm512_permutex2var_ps(_mm512_permutex2var_ps(s0, put[r], s1), put2[r], s2);
  }
};

inline const Stride3& stride3() {
  static const Stride3 tables;
  return tables;
}

inline void gather_lanes_9x16(const float* src, float* dst) {
  const Stride3& t = stride3();
  __m512 r[9], s[3][3];
  for (int k = 0; k < 9; ++k) r[k] = _mm512_loadu_ps(src + 16 * k);
  for (int j = 0; j < 3; ++j)
    for (int b = 0; b < 3; ++b) s[b][j] = t.deinterleave(r[3 * j], r[3 * j + 1], r[3 * j + 2], b);
  for (int b = 0; b < 3; ++b)
    for (int a = 0; a < 3; ++a)
      _mm512_storeu_ps(dst + 16 * (3 * a + b), t.deinterleave(s[b][0], s[b][1], s[b][2], a));
}

inline void scatter_lanes_9x16(const float* src, float* dst) {
  const Stride3& t = stride3();
  __m512 x[9], s[3][3];
  for (int e = 0; e < 9; ++e) x[e] = _mm512_loadu_ps(src + 16 * e);
  for (int b = 0; b < 3; ++b)
    for (int j = 0; j < 3; ++j) s[b][j] = t.interleave(x[b], x[3 + b], x[6 + b], j);
  for (int j = 0; j < 3; ++j)
    for (int r = 0; r < 3; ++r)
      _mm512_storeu_ps(dst + 16 * (3 * j + r), t.interleave(s[0][j], s[1][j], s[2][j], r));
}
#endif

// A full tile moves through the registers in groups of G = 32 / sizeof(T) lanes (one AVX2
// register of blocks: 8 floats or 4 doubles): G rows of G blocks transposed at a time, one
// group for AVX2 tiles, two for AVX-512 tiles (W = 16 floats or 8 doubles), joined into one
// register per row. (A 16 x 16 transpose would need count >= 16; the hot d = 9 would never
// take it.) d = 9 at AVX-512 takes the permutes above.
template <typename T>
inline void gather_lanes(const T* src, int64_t stride, int count, int cnt, T pad, T* dst) {
  constexpr int W = Lanes<T>::W;
  int e0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    if (count == 9 && stride == 9 && cnt == W) return gather_lanes_9x16(src, dst);
#endif
#if defined(__AVX2__)
  // Whole rows only: at AVX-512 both G-lane halves of a row are transposed before it is stored
  // as one zmm, and the rows left over (count % G) are gathered. The step reloads every row as
  // one register, and a load that spans two stores (or W scalar ones) waits for them to retire
  // instead of being forwarded.
  constexpr int G = 32 / int(sizeof(T));
  using Z = FullRow<T>;
  if (cnt == W && stride <= (int64_t(1) << 31) / (W * int64_t(sizeof(T)))) {
    typename Avx2<T>::R r[W / G][G];
    for (; e0 + G <= count; e0 += G) {
      for (int h = 0; h < W / G; ++h) {
        for (int l = 0; l < G; ++l) r[h][l] = Avx2<T>::load(src + (h * G + l) * stride + e0);
        transpose_in_registers(r[h]);
      }
      for (int e = 0; e < G; ++e) Z::store(dst + (e0 + e) * W, Z::row(r, e));
    }
    // (Counted by the remainder, < G, so that GCC sees the loop's bound.)
    for (int k = 0, rem = count - e0; k < rem && k < G; ++k)
      Z::store(dst + (e0 + k) * W, Z::column(src + e0 + k, stride));
    return;
  }
#endif
  for (int l = 0; l < W; ++l)
    for (int e = e0; e < count; ++e) dst[e * W + l] = l < cnt ? src[l * stride + e] : pad;
}

template <typename T>
inline void scatter_lanes(const T* src, int count, int cnt, int64_t stride, T* dst) {
  constexpr int W = Lanes<T>::W;
  int e0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    if (count == 9 && stride == 9 && cnt == W) return scatter_lanes_9x16(src, dst);
#endif
#if defined(__AVX2__)
  constexpr int G = 32 / int(sizeof(T));
  if (cnt == W) {
    typename Avx2<T>::R r[G];
    for (; e0 + G <= count; e0 += G) {
      for (int h = 0; h < W; h += G) {
        for (int e = 0; e < G; ++e) r[e] = Avx2<T>::load(src + (e0 + e) * W + h);
        transpose_in_registers(r);
        for (int l = 0; l < G; ++l) Avx2<T>::store(dst + (h + l) * stride + e0, r[l]);
      }
    }
    // The rows left over (count % G) go lane by lane from a register holding the whole row.
    // Scalar loads of its lanes, from the vector store that just wrote the row, were not
    // forwarded on Zen 3 (they waited for the store): at d = 9 that loop was 15-20% of the
    // fused step there.
    // (Counted by the remainder, < G, as in gather_lanes.)
    for (int k = 0, rem = count - e0; k < rem && k < G; ++k) {
      typename Lanes<T>::V row;
      std::memcpy(&row, src + (e0 + k) * W, sizeof(row));
      loop(Ic<0>{}, Ic<W>{}, [&](auto l) { dst[l * stride + e0 + k] = row[int(l)]; });
    }
    return;
  }
#endif
  for (int l = 0; l < cnt; ++l)
    for (int e = e0; e < count; ++e) dst[l * stride + e] = src[e * W + l];
}

}  // namespace lanes
}  // namespace mbf
