// The fused MBF step on the compact layout (declared in mbf/batched.h): momentum, optional
// curvature EMA, optional refactor, solve and parameter update for a tile of blocks while
// it is in registers/L1, so each array is read and written once per step.
// Torch-free: built into the extension and into the CMake library alike.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mbf/batched.h"
#include "lane_types.h"
#include "mbf/lanes.h"
#include "mbf/small_spd.h"

namespace mbf {
namespace cpu {
namespace {

// Row t of one sub-tile of a compact tile (W lanes at `base`, row stride kCompactTile),
// read in place. memcpy: the buffer may be aligned to the element only (any std::vector),
// and this compiles to one unaligned vector load.
template <typename T>
struct CompactRows {
  const T* base;
  V<T> operator[](int t) const {
    V<T> v;
    std::memcpy(&v, base + t * kCompactTile, sizeof(V<T>));
    return v;
  }
};

// CompactRows of a bfloat16 factor (factor_dtype="bfloat16"), widened to float as read: W
// 16-bit values zero-extended to 32 bits and shifted into the top half (vpmovzxwd + vpslld).
// Written with intrinsics where there are some: GCC lowered the generic conversion below to
// 256-bit halves (two vpmovzxwd, a vextracti128 and a vinserti64x4 per row) at AVX-512,
// which took more of the cached step than the solve's arithmetic.
struct Bf16Rows {
  const Bf16* base;
  V<float> operator[](int t) const {
#if defined(__AVX512F__)
    // (The maskz form with every lane set is the same vpmovzxwd; the plain one trips GCC 12's
    // -Wuninitialized on its undefined pass-through operand.)
    typedef uint32_t U __attribute__((vector_size(64)));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + t * kCompactTile));
    return (V<float>)((U)_mm512_maskz_cvtepu16_epi32(__mmask16(0xFFFF), h) << 16);
#elif defined(__AVX2__)
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + t * kCompactTile));
    return (V<float>)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
    typedef uint16_t H __attribute__((vector_size(sizeof(V<float>) / 2)));
    typedef uint32_t U __attribute__((vector_size(sizeof(V<float>))));
    H h;
    std::memcpy(&h, base + t * kCompactTile, sizeof(H));
    return (V<float>)(__builtin_convertvector(h, U) << 16);
#endif
  }
};
// Rows of int8 codes (the unit factor's U, factor_dtype="int8") widened to float as read:
// W bytes sign-extended to 32 bits and converted (vpmovsxbd + vcvtdq2ps; at AVX-512 the
// maskz form and a vector conversion, as Bf16Rows, for GCC 12's -Wuninitialized).
struct I8Rows {
  const int8_t* base;
  V<float> operator[](int k) const {
    const int8_t* at = base + k * kCompactTile;
#if defined(__AVX512F__)
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
    typedef int32_t I __attribute__((vector_size(64)));
    return __builtin_convertvector((I)_mm512_maskz_cvtepi8_epi32(__mmask16(0xFFFF), c), V<float>);
#elif defined(__AVX2__)
    const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(at));
    return (V<float>)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
#else
    typedef int8_t C __attribute__((vector_size(Ln<float>::W)));
    C c;
    std::memcpy(&c, at, sizeof(C));
    return __builtin_convertvector(c, V<float>);
#endif
  }
};

// The sections of a unit factor's tile (UnitI8, mbf/batched.h) for the sub-tile whose lanes
// start at u: `at` points at its lanes of the tile's first row.
struct UnitTile {
  int8_t* codes;  // row i(i-1)/2 + j: (i, j)'s codes
  float* scale;   // one per block
  Bf16* pivots;   // row i: r_i = 1 / L_ii^2
  UnitTile(UnitI8* at, int u, int d) {
    int8_t* tile = reinterpret_cast<int8_t*>(at) - u;
    const int strict = d * (d - 1) / 2;
    codes = tile + u;
    scale = reinterpret_cast<float*>(tile + strict * kCompactTile) + u;
    pivots = reinterpret_cast<Bf16*>(tile + (strict + kUnitScaleRows) * kCompactTile) + u;
  }
};

template <typename T>
CompactRows<T> factor_rows(const T* base) { return {base}; }
inline Bf16Rows factor_rows(const Bf16* base) { return {base}; }

// Compact rows of one sub-tile (W lanes at `base`, row stride kCompactTile) in and out.
template <typename T>
void load_compact(const T* base, int rows, V<T>* out) {
  for (int r = 0; r < rows; ++r) std::memcpy(&out[r], base + r * kCompactTile, sizeof(V<T>));
}
template <typename T>
void store_compact(const V<T>* in, int rows, T* base) {
  for (int r = 0; r < rows; ++r) std::memcpy(base + r * kCompactTile, &in[r], sizeof(V<T>));
}
// store_compact into a factor of storage FT: a bfloat16 one has each value rounded
// (bf16_from_float); at a refactor only, so plainly.
template <typename T, typename FT>
void store_factor(const V<T>* in, int rows, FT* base) {
  if constexpr (std::is_same_v<FT, T>) {
    store_compact<T>(in, rows, base);
  } else {
    for (int r = 0; r < rows; ++r)
      for (int l = 0; l < Ln<T>::W; ++l) base[r * kCompactTile + l] = bf16_from_float(in[r][l]);
  }
}

// store_compact with non-temporal stores, where this level has them and `base` is aligned to
// a vector (compact rows are whole vectors, so each row then is): the grafted step's
// directions are written once and read by the next pass only, after the whole bucket; in a
// bucket larger than the caches a plain store first reads each line in (4 B more per element
// of the measuring pass's 48). Ordered by stream_fence() before another thread reads them.
template <typename T>
void stream_compact(const V<T>* in, int rows, T* base) {
#if defined(__AVX512F__) || defined(__AVX__)
  if (reinterpret_cast<uintptr_t>(base) % sizeof(V<T>) == 0) {
    for (int r = 0; r < rows; ++r) {
      T* out = base + r * kCompactTile;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(out, (__m512)in[r]);
      else _mm512_stream_pd(out, (__m512d)in[r]);
#else
      if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(out, (__m256)in[r]);
      else _mm256_stream_pd(out, (__m256d)in[r]);
#endif
    }
    return;
  }
#endif
  store_compact<T>(in, rows, base);
}
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

// Whether a pass reads the parameters: to write them, or for a coupled weight decay's direction
// (g + wd p even at wd = 0, as the reference: a non-finite p then reaches m, as it should).
inline bool needs_p(const StepConfig& cfg) { return cfg.write || !cfg.decoupled_weight_decay; }
// A grafted step's writing pass: p moves by the stored direction (no g, m, v or factor read).
inline bool applies_direction(const StepConfig& cfg) {
  return cfg.write && cfg.graft && !cfg.lagged;
}

// The sum of a vector's lanes, pairwise (a tree of W - 1 adds, log2 W deep).
template <typename T>
T lane_sum(const V<T>& v) {
  constexpr int W = Ln<T>::W;
  T part[W];
  std::memcpy(part, &v, sizeof(V<T>));
  for (int w = W / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

template <typename T>
int64_t count_lanes(const M<T>& mask, int cnt) {
  int64_t c = 0;
  for (int l = 0; l < cnt; ++l) c += mask[l] != 0;
  return c;
}

// One sub-tile (W blocks: lanes) of a bucket on the compact layout, with the phases of the
// step as members so that the fused step and the standalone packed ops share them.
template <typename T, int D>
struct CompactTile {
  static constexpr int W = Ln<T>::W;
  std::vector<V<T>> gv, mv, pv, vv, F, L, inv_diag, x, flat;
  int n, tri;
  explicit CompactTile(int d)
      : gv(d), mv(d), pv(d), vv(d), F(d * (d + 1) / 2), L(d * (d + 1) / 2), inv_diag(d), x(d),
        flat(d), n(D > 0 ? D : d), tri(n * (n + 1) / 2) {}

  // Whether the W blocks at b0 are W n consecutive values of every stream (a full sub-tile of
  // a segment without a tail whose blocks are contiguous: a conv weight). The element-wise
  // parts of the step (momentum, Adam's second moment, the parameter update) then run on
  // those values in place, as n plain vectors that need no transposing, and only the solve's
  // input and output cross into lanes: two transposes where gathering g, m, p (or v) and
  // scattering m and p (or v) took five. Each value gets the same operations either way.
  bool contiguous(const StepSegment<T>& s, int cnt) const {
    return cnt == W && s.p_tail == nullptr && s.width == n && s.row_stride == n;
  }
  static V<T> load_flat(const T* at) {
    V<T> v;
    std::memcpy(&v, at, sizeof(V<T>));
    return v;
  }
  static void store_flat(T* at, const V<T>& v) { std::memcpy(at, &v, sizeof(V<T>)); }

  // The step's element-wise updates of one vector, written once for both layouts: a vector
  // of lanes (W blocks' element e) or of W consecutive values of contiguous blocks.
  struct Elementwise {
    T rho, wd, beta2, w2, lr_wd;
    bool decoupled;
    explicit Elementwise(const StepConfig& cfg)
        : rho(static_cast<T>(cfg.momentum)), wd(static_cast<T>(cfg.weight_decay)),
          beta2(static_cast<T>(cfg.beta2)), w2(T(1) - static_cast<T>(cfg.beta2)),
          lr_wd(static_cast<T>(cfg.lr) * static_cast<T>(cfg.weight_decay)),
          decoupled(cfg.decoupled_weight_decay) {}
    // The gradient with a coupled decay (p is read only then).
    V<T> direction(const V<T>& g, const V<T>& p) const { return decoupled ? g : g + wd * p; }
    V<T> momentum(const V<T>& m, const V<T>& dir) const { return rho * m + dir; }
    V<T> second_moment(const V<T>& v, const V<T>& dir) const {
      return beta2 * v + w2 * dir * dir;
    }
    // p moved by lr_u x and the decoupled decay.
    V<T> moved(const V<T>& p, const V<T>& x, T lr_u) const {
      const V<T> decay = decoupled ? lr_wd * p : lanes::splat<V<T>>(T(0));
      return p - lr_u * x - decay;
    }
  };

  // Lanes dst[0, n) of blocks b0 .. b0 + cnt of a stream laid out as StepSegment describes:
  // `width` values per block at main + b * row_stride, then tail[b] when there is a tail.
  // Padding lanes (cnt .. W) are zero.
  void gather(const T* main, int64_t row_stride, int width, const T* tail, int64_t b0, int cnt,
              std::vector<V<T>>& dst) {
    T* out = reinterpret_cast<T*>(dst.data());
    lanes::gather_lanes<T>(main + b0 * row_stride, row_stride, width, cnt, T(0), out);
    if (tail == nullptr) return;
    // A full sub-tile's tail is W contiguous values: one copy, which the step's vector load
    // of that row is forwarded from (it would wait for W scalar stores to retire).
    if (cnt == W) std::memcpy(out + width * W, tail + b0, sizeof(V<T>));
    else for (int l = 0; l < W; ++l) out[width * W + l] = l < cnt ? tail[b0 + l] : T(0);
  }
  void scatter(const std::vector<V<T>>& src, int64_t b0, int cnt, T* main, int64_t row_stride,
               int width, T* tail) {
    const T* in = reinterpret_cast<const T*>(src.data());
    lanes::scatter_lanes<T>(in, width, cnt, row_stride, main + b0 * row_stride);
    if (tail == nullptr) return;
    if (cnt == W) std::memcpy(tail + b0, in + width * W, sizeof(V<T>));  // as in gather
    else for (int l = 0; l < cnt; ++l) tail[b0 + l] = in[width * W + l];
  }
  // Contiguous rows of n values (the standalone ops' B, G, X).
  void gather(const T* rows, int64_t b0, int cnt, std::vector<V<T>>& dst) {
    gather(rows, n, n, nullptr, b0, cnt, dst);
  }
  void scatter(const std::vector<V<T>>& src, int64_t b0, int cnt, T* rows) {
    scatter(src, b0, cnt, rows, n, n, nullptr);
  }

  // F (compact rows at Fc) = beta F + (1 - beta) g g^T with g = gv, or g g^T when `first`.
  // Lanes in `keep` (a NaN/Inf gradient, when the step protects F) keep their F.
  // Leaves the refreshed F in the F scratch.
  void refresh_curvature(T* Fc, T beta_, bool first, const M<T>& keep) {
    const auto nd = lanes::block_dim<D>(n);
    load_compact<T>(Fc, tri, F.data());
    const T beta = beta_, w = T(1) - beta_;
    lanes::loop(lanes::Ic<0>{}, nd, [&](auto i) MBF_INLINE {
      lanes::loop(lanes::Ic<0>{}, i + lanes::Ic<1>{}, [&](auto j) MBF_INLINE {
        const V<T> c = gv[i] * gv[j];
        V<T>& f = F[tri_index(i, j)];
        const V<T> updated = first ? c : beta * f + w * c;
        f = keep ? f : updated;
      });
    });
    store_compact<T>(F.data(), tri, Fc);
  }

  // Factor of F + damping I (F in the F scratch) into compact rows at Lc, diagonal inverted.
  // Failed lanes get the diagonal fallback of MBF_SPEC section 4 when `fallback` is set
  // (1 / sqrt(F_ii + damping) where finite and positive, else 1 / sqrt(damping), else 1),
  // zeros otherwise. Returns the per-lane info of the factorisation.
  template <typename FT>
  M<T> refactor(FT* Lc, T damping, bool fallback, int u = 0) {
    for (int t = 0; t < tri; ++t) L[t] = F[t];
    for (int i = 0; i < n; ++i) L[tri_index(i, i)] += damping;
    const M<T> info = lanes::factor_tile<T, D>(L.data(), inv_diag.data(), n);
    const M<T> failed = info != 0;
    const V<T> zero = lanes::splat<V<T>>(T(0));
    const T inv_sqrt_damping = damping > 0 ? T(1) / std::sqrt(damping) : T(1);
    for (int i = 0; i < n; ++i) {
      V<T> replacement = zero;
      if (fallback) {
        const V<T> s = F[tri_index(i, i)] + damping;
        const M<T> ok = (s > T(0)) & ((s - s) == T(0));
        const V<T> root = lanes::vsqrt<T>(ok ? s : lanes::splat<V<T>>(T(1)));
        replacement = ok ? T(1) / root : lanes::splat<V<T>>(inv_sqrt_damping);
      }
      for (int j = 0; j < i; ++j) L[tri_index(i, j)] = failed ? zero : L[tri_index(i, j)];
      L[tri_index(i, i)] = failed ? replacement : inv_diag[i];
    }
    if constexpr (std::is_same_v<FT, UnitI8>) store_unit_factor(UnitTile(Lc, u, n));
    else store_factor<T>(L.data(), tri, Lc);
    return info;
  }

  // The factor in L (diagonal inverted) as a unit factor (factor_dtype="int8"): U_ij = L_ij
  // / L_jj coded as round(U_ij / scale) with scale = max |U_i'j'| / 127 per block, r_i =
  // (1 / L_ii)^2 rounded to bfloat16 (layout.unit_from_factor, the same arithmetic). Vector
  // arithmetic throughout (a refactor touches every block of the bucket).
  void store_unit_factor(const UnitTile& out) {
    static_assert(std::is_same_v<T, float>, "the unit factor is a float32 bucket's");
    constexpr int W = Ln<T>::W;
    const V<T> zero = lanes::splat<V<T>>(T(0));
    V<T> amax = zero;
    M<T> finite = lanes::splat<M<T>>(-1);
    // U_ij = L_ij / L_jj into L's strictly lower entries (this refactor's scratch; the
    // diagonal, which each row reads, stays).
    for (int i = 1; i < n; ++i)
      for (int j = 0; j < i; ++j) {
        const V<T> a = L[tri_index(i, j)] * L[tri_index(j, j)];
        L[tri_index(i, j)] = a;
        amax = a > amax ? a : (-a > amax ? -a : amax);
        finite &= (a - a) == T(0);
      }
    // The scale amax / 127 rounded to bfloat16 (ties to even): a factor decoded and coded
    // again (a checkpoint loaded) then gets the same scale and codes, where a float32 scale
    // moved by an ulp. A block whose U is not finite codes zeros: U = I.
    const M<T> bits = (M<T>)(amax / T(127));
    const V<T> rounded_scale = (V<T>)((bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF);
    const V<T> scale = finite ? rounded_scale : zero;
    const V<T> coding = finite & (amax > T(0)) ? T(1) / scale : zero;
    std::memcpy(out.scale, &scale, sizeof(V<T>));
    // Rounded to nearest, ties to even, by the 1.5 * 2^23 trick (|values| <= 127): the
    // vector conversion to integers truncates.
    const V<T> magic = lanes::splat<V<T>>(T(12582912));
    typedef int32_t I32 __attribute__((vector_size(lanes::kVectorBytes)));
    typedef int8_t I8 __attribute__((vector_size(lanes::kVectorBytes / 4)));
    for (int i = 1; i < n; ++i)
      for (int j = 0; j < i; ++j) {
        const V<T> q = L[tri_index(i, j)] * coding;
        const V<T> rounded = ((finite ? q : zero) + magic) - magic;
        const I32 wide = __builtin_convertvector(rounded, I32);
        const I8 c = __builtin_convertvector(wide, I8);
        std::memcpy(out.codes + (i * (i - 1) / 2 + j) * kCompactTile, &c, sizeof(I8));
      }
    for (int i = 0; i < n; ++i) {
      const V<T> r = L[tri_index(i, i)] * L[tri_index(i, i)];
      for (int l = 0; l < W; ++l) out.pivots[i * kCompactTile + l] = bf16_from_float(r[l]);
    }
  }

  // x = U^{-T} diag(r) U^{-1} x from a unit factor (factor_dtype="int8"), read in place. The
  // block's scale multiplies each solved value once (U_ij x_j = code_ij (scale x_j)), not
  // each code.
  void solve_unit(const UnitTile& f) {
    const auto nd = lanes::block_dim<D>(n);
    constexpr lanes::Ic<1> one;
    const I8Rows U{f.codes};
    const Bf16Rows r{f.pivots};
    V<T> s;
    std::memcpy(&s, f.scale, sizeof(V<T>));
    auto code = [&](auto i, auto j) MBF_INLINE { return U[i * (i - 1) / 2 + j]; };
    auto substitute = [&](V<T>* xs) MBF_INLINE {
      lanes::loop(lanes::Ic<0>{}, nd, [&](auto j) MBF_INLINE {  // U z = b
        const V<T> zs = xs[j] * s;
        lanes::loop(j + one, nd, [&](auto i) MBF_INLINE {
          xs[i] = lanes::fnmadd(code(int(i), int(j)), zs, xs[i]);
        });
      });
      lanes::loop(lanes::Ic<0>{}, nd, [&](auto i) MBF_INLINE { xs[i] *= r[int(i)]; });
      lanes::loop(lanes::Ic<0>{}, nd, [&](auto k) MBF_INLINE {  // U^T x = w, from the last
        const auto i = nd - one - k;
        const V<T> xs_i = xs[i] * s;
        lanes::loop(lanes::Ic<0>{}, i, [&](auto j) MBF_INLINE {
          xs[j] = lanes::fnmadd(code(int(i), int(j)), xs_i, xs[j]);
        });
      });
    };
    if constexpr (D > 0) {
      V<T> local[D];
      for (int i = 0; i < D; ++i) local[i] = x[i];
      substitute(local);
      for (int i = 0; i < D; ++i) x[i] = local[i];
    } else {
      substitute(x.data());
    }
  }

  // x = (L L^T)^{-1} x, read straight from the compact factor rows at Lc (whose diagonal
  // holds 1 / L_ii): no copy of the factor per tile. A refactor in the same step wrote Lc
  // first, so a bfloat16 factor is used as stored, rounded, from its first step on.
  template <typename FT>
  void solve(const FT* Lc, int u = 0) {
    if constexpr (std::is_same_v<FT, UnitI8>)
      solve_unit(UnitTile(const_cast<UnitI8*>(Lc), u, n));
    else
      lanes::solve_tile<T, D, /*InvDiagInL=*/true>(factor_rows(Lc), nullptr, x.data(), n, 1);
  }

  // The fused step for the W blocks of segment `s` starting at its block b0, of which cnt
  // are real; they sit at lanes [u, u + W) of compact tile t (StepTiles' index).
  template <typename FT>
  void step(const StepSegment<T>& s, T* Fc, FT* Lc, int64_t b0, int cnt, const StepConfig& cfg,
            const StepTiles<T>& tiles, int64_t t, int u, StepStats& stats) {
    const bool apply = applies_direction(cfg);
    const bool flat_blocks = contiguous(s, cnt);
    // (Contiguous blocks read g in place for the momentum: into lanes for the curvature only.)
    if ((!apply && !flat_blocks) || s.flags.update_curvature)
      gather(s.g, s.row_stride, s.width, s.g_tail, b0, cnt, gv);
    if (s.flags.update_curvature) {
      M<T> finite = lanes::splat<M<T>>(-1);
      for (int e = 0; e < n; ++e) finite &= (gv[e] - gv[e]) == T(0);
      stats.skipped_curvature += count_lanes<T>(~finite, cnt);
      refresh_curvature(Fc, static_cast<T>(cfg.beta), s.flags.first_curvature, ~finite);
    }
    if (s.flags.refactor) {
      if (!s.flags.update_curvature) load_compact<T>(Fc, tri, F.data());
      const T damping = tiles.damping ? tiles.damping[t] : static_cast<T>(cfg.damping);
      const M<T> info = refactor(Lc, damping, /*fallback=*/true, u);
      stats.failed_factor += count_lanes<T>(info != 0, cnt);
    }
    if (!cfg.write && !cfg.graft) return;  // the refresh/refactor-only pass
    const T lr = static_cast<T>(cfg.lr);
    const Elementwise op(cfg);
    // This sub-tile's direction rows (compact: d rows of kCompactTile per tile).
    T* direction = cfg.graft && !cfg.lagged ? tiles.directions + t * n * kCompactTile + u
                                            : nullptr;
    if (apply) {
      if (!flat_blocks) gather(s.p, s.row_stride, s.width, s.p_tail, b0, cnt, pv);
      load_compact<T>(direction, n, x.data());
      move_params(s, b0, cnt, op, lr * tiles.scale[t], flat_blocks);
      return;
    }
    // Adam's v one per block (StepTiles::block_v): this sub-tile's W values, in lanes.
    T* block_v = cfg.graft && tiles.block_v != nullptr ? tiles.block_v + t * kCompactTile + u
                                                       : nullptr;
    const bool entry_v = cfg.graft && block_v == nullptr;
    if (flat_blocks) {
      moments_in_place(s, b0, op, entry_v, block_v != nullptr);
    } else {
      gather(s.m, s.row_stride, s.width, s.m_tail, b0, cnt, mv);
      // Grafting's measuring pass reads p only for a coupled decay (with the default,
      // decoupled decay, that is a ninth of its reads saved).
      if (needs_p(cfg)) gather(s.p, s.row_stride, s.width, s.p_tail, b0, cnt, pv);
      if (entry_v) gather(s.v, s.row_stride, s.width, s.v_tail, b0, cnt, vv);
      for (int e = 0; e < n; ++e) {
        const V<T> dir = op.direction(gv[e], pv[e]);
        mv[e] = op.momentum(mv[e], dir);
        if (entry_v) vv[e] = op.second_moment(vv[e], dir);
        if (block_v != nullptr) vv[e] = dir * dir;  // (summed below)
      }
    }
    // Each block's v from its squared directions' mean (padding lanes: zeros in, zeros out);
    // 4 bytes per block moved where v per entry moved 4 per entry.
    V<T> v_of_block = lanes::splat<V<T>>(T(0));
    if (block_v != nullptr) {
      V<T> sum = vv[0];
      for (int e = 1; e < n; ++e) sum += vv[e];
      v_of_block = op.beta2 * load_flat(block_v) + (op.w2 / static_cast<T>(n)) * sum;
      store_flat(block_v, v_of_block);
    }
    for (int e = 0; e < n; ++e) x[e] = mv[e];
    solve(Lc, u);
    // The measuring pass: m, v, u and the norms stored, p untouched; lagged, the norms, m and
    // v stored and p moved by u at the previous step's ratio (no direction stream).
    if (cfg.graft) {
      const V<T> zero = lanes::splat<V<T>>(T(0));
      const T eps = static_cast<T>(cfg.eps);
      V<T> su = zero, sa = zero;
      if (block_v != nullptr) {  // one denominator per block
        const V<T> scale = s.graft_c1 / (s.graft_s2 * lanes::vsqrt<T>(v_of_block) + eps);
        for (int e = 0; e < n; ++e) {
          const V<T> a = scale * mv[e];
          su += x[e] * x[e];
          sa += a * a;
        }
      } else {
        for (int e = 0; e < n; ++e) {
          const V<T> a = s.graft_c1 * mv[e] / (s.graft_s2 * lanes::vsqrt<T>(vv[e]) + eps);
          su += x[e] * x[e];
          sa += a * a;
        }
      }
      // A block whose norms are not finite (a NaN gradient) is left out of its unit's norms.
      const M<T> ok = ((su - su) == T(0)) & ((sa - sa) == T(0));
      su = ok ? su : zero;
      sa = ok ? sa : zero;
      if (tiles.norm_sums) {
        // The tile's sums, added up over its sub-tiles (this thread steps the whole tile, the
        // first sub-tile first): 8 bytes per tile written, and read back by unit_ratios, where
        // per-block norms were 128 (VGG16-w512's step 8% faster, Intel Xeon).
        T* out = tiles.norms + t * 2;
        const T tu = lane_sum<T>(su), ta = lane_sum<T>(sa);
        out[0] = u == 0 ? tu : out[0] + tu;
        out[1] = u == 0 ? ta : out[1] + ta;
      } else {
        T* out = tiles.norms + t * 2 * kCompactTile + u;
        std::memcpy(out, &su, sizeof(V<T>));
        std::memcpy(out + kCompactTile, &sa, sizeof(V<T>));
      }
      if (cfg.lagged) {
        if (!flat_blocks) {
          scatter(mv, b0, cnt, s.m, s.row_stride, s.width, s.m_tail);
          if (entry_v) scatter(vv, b0, cnt, s.v, s.row_stride, s.width, s.v_tail);
        }
        move_params(s, b0, cnt, op, lr * tiles.scale[t], flat_blocks);
        return;
      }
      if (cfg.stream_directions) stream_compact<T>(x.data(), n, direction);
      else store_compact<T>(x.data(), n, direction);
      if (flat_blocks) return;  // m and v were stored in place
      scatter(mv, b0, cnt, s.m, s.row_stride, s.width, s.m_tail);
      if (entry_v) scatter(vv, b0, cnt, s.v, s.row_stride, s.width, s.v_tail);
      return;
    }
    if (!flat_blocks) scatter(mv, b0, cnt, s.m, s.row_stride, s.width, s.m_tail);
    move_params(s, b0, cnt, op, lr, flat_blocks);
  }

  // The momentum (and Adam's second moment per entry, `entry_v`) of contiguous blocks
  // (`contiguous`), updated and stored in place; the new values go into lanes (mv, vv) for the
  // solve and the norms. `squares`: the squared directions into vv instead (v per block).
  void moments_in_place(const StepSegment<T>& s, int64_t b0, const Elementwise& op,
                        bool entry_v, bool squares) {
    const int64_t at = b0 * s.row_stride;
    for (int k = 0; k < n; ++k) {
      const V<T> g = load_flat(s.g + at + k * W);
      const V<T> dir = op.decoupled ? g : op.direction(g, load_flat(s.p + at + k * W));
      flat[k] = op.momentum(load_flat(s.m + at + k * W), dir);
      store_flat(s.m + at + k * W, flat[k]);
      if (entry_v) {
        const V<T> v = op.second_moment(load_flat(s.v + at + k * W), dir);
        store_flat(s.v + at + k * W, v);
        pv[k] = v;  // (scratch: this path reads p in place, never into pv)
      }
      if (squares) pv[k] = dir * dir;
    }
    lanes::gather_lanes<T>(reinterpret_cast<const T*>(flat.data()), n, n, W, T(0),
                           reinterpret_cast<T*>(mv.data()));
    if (entry_v || squares)
      lanes::gather_lanes<T>(reinterpret_cast<const T*>(pv.data()), n, n, W, T(0),
                             reinterpret_cast<T*>(vv.data()));
  }

  // p moved by lr_u x and the decoupled decay, then stored: in place for contiguous blocks
  // (x crossing back from lanes), else through pv (gathered by the caller).
  void move_params(const StepSegment<T>& s, int64_t b0, int cnt, const Elementwise& op,
                   T lr_u, bool flat_blocks) {
    if (flat_blocks) {
      lanes::scatter_lanes<T>(reinterpret_cast<const T*>(x.data()), n, W, n,
                              reinterpret_cast<T*>(flat.data()));
      T* p = s.p + b0 * s.row_stride;
      for (int k = 0; k < n; ++k)
        store_flat(p + k * W, op.moved(load_flat(p + k * W), flat[k], lr_u));
      return;
    }
    for (int e = 0; e < n; ++e) pv[e] = op.moved(pv[e], x[e], lr_u);
    scatter(pv, b0, cnt, s.p, s.row_stride, s.width, s.p_tail);
  }
};

// Calls body(tile, first block of the sub-tile, real blocks in it, row offset of the
// sub-tile inside the tile) for every sub-tile of compact tiles [t0, t1).
template <typename T, typename Body>
void for_each_subtile(int64_t n_blocks, int64_t t0, int64_t t1, Body&& body) {
  constexpr int W = Ln<T>::W;
  static_assert(kCompactTile % W == 0, "a compact tile must hold whole vectors");
  for (int64_t t = t0; t < t1; ++t)
    for (int u = 0; u < kCompactTile; u += W) {
      const int64_t b0 = t * kCompactTile + u;
      body(t, b0, static_cast<int>(std::clamp<int64_t>(n_blocks - b0, 0, W)), u);
    }
}

}  // namespace

template <typename T, typename FT>
StepStats mbf_bucket_step_tiles(const StepSegment<T>* segments, int n_segments, T* F,
                                FT* factor, int d, int64_t tile_begin, int64_t tile_end,
                                const StepConfig& cfg, const StepTiles<T>& tiles) {
  static_assert(std::is_same_v<FT, T> || ((std::is_same_v<FT, Bf16> ||
                 std::is_same_v<FT, UnitI8>) && std::is_same_v<T, float>),
                "the factor is stored as the state's dtype, or in bfloat16 or int8 for float32");
  StepStats stats;
  const int64_t tri = int64_t(d) * (d + 1) / 2, tile_elems = tri * kCompactTile;
  const int64_t tile_bytes = tile_elems * int64_t(sizeof(T));
  const int64_t factor_tile_elems =
      (std::is_same_v<FT, UnitI8> ? unit_factor_rows(d) : tri) * int64_t(kCompactTile);
  const int64_t factor_tile_bytes = factor_tile_elems * int64_t(sizeof(FT));
  // The last segment starting at or before tile_begin (segments are sorted by tile_offset).
  const StepSegment<T>* end = segments + n_segments;
  const StepSegment<T>* first = std::upper_bound(
      segments, end, tile_begin,
      [](int64_t t, const StepSegment<T>& s) { return t < s.tile_offset; });
  if (first != segments) --first;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    CompactTile<T, kD> tile(d);
    for (const StepSegment<T>* s = first; s != end && s->tile_offset < tile_end; ++s) {
      const int64_t seg_tiles = (s->n_blocks + kCompactTile - 1) / kCompactTile;
      const int64_t t0 = std::max(tile_begin, s->tile_offset) - s->tile_offset;
      const int64_t t1 = std::min(tile_end, s->tile_offset + seg_tiles) - s->tile_offset;
      const bool touches_F = s->flags.update_curvature || s->flags.refactor;
      const int64_t rows_bytes = int64_t(kCompactTile) * s->row_stride * int64_t(sizeof(T));
      for_each_subtile<T>(s->n_blocks, t0, t1, [&](int64_t lt, int64_t b0, int cnt, int u) {
        const int64_t t = s->tile_offset + lt;
        // At a tile's start, prefetch every stream the step reads kPrefetchTiles tiles ahead.
        if (u == 0 && lt + kPrefetchTiles < t1) {
          const int64_t ahead = t + kPrefetchTiles;
          const int64_t next_row = (b0 + kPrefetchTiles * kCompactTile) * s->row_stride;
          if (touches_F) prefetch_bytes(F + ahead * tile_elems, tile_bytes);
          if (applies_direction(cfg)) {
            prefetch_bytes(tiles.directions + ahead * d * kCompactTile,
                           d * kCompactTile * int64_t(sizeof(T)));
            prefetch_bytes(s->p + next_row, rows_bytes);
          } else {
            prefetch_bytes(factor + ahead * factor_tile_elems, factor_tile_bytes);
            prefetch_bytes(s->g + next_row, rows_bytes);
            prefetch_bytes(s->m + next_row, rows_bytes);
            if (needs_p(cfg)) prefetch_bytes(s->p + next_row, rows_bytes);
            if (s->v != nullptr) prefetch_bytes(s->v + next_row, rows_bytes);
          }
        }
        tile.step(*s, F + t * tile_elems + u, factor + t * factor_tile_elems + u, b0, cnt, cfg,
                  tiles, t, u, stats);
      });
    }
  });
  if (cfg.stream_directions) stream_fence();
  return stats;
}

template <typename T>
StepStats mbf_step_tiles(T* p, const T* g, T* m, T* F, T* factor, int64_t n_blocks, int d,
                         int64_t tile_begin, int64_t tile_end, const StepConfig& cfg,
                         const StepFlags& flags) {
  const StepSegment<T> whole{p, g, m, nullptr, nullptr, nullptr, n_blocks, d, 0, d, flags};
  return mbf_bucket_step_tiles<T>(&whole, 1, F, factor, d, tile_begin, tile_end, cfg);
}

template <typename T>
void compact_outer_ema_tiles(T* F, const T* G, int64_t n_blocks, int d, int64_t tile_begin,
                             int64_t tile_end, T beta) {
  const int64_t tile_elems = int64_t(d) * (d + 1) / 2 * kCompactTile;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    CompactTile<T, kD> tile(d);
    const M<T> keep_none = lanes::splat<M<T>>(0);
    for_each_subtile<T>(n_blocks, tile_begin, tile_end, [&](int64_t t, int64_t b0, int cnt, int u) {
      tile.gather(G, b0, cnt, tile.gv);
      tile.refresh_curvature(F + t * tile_elems + u, beta, /*first=*/false, keep_none);
    });
  });
}

template <typename T>
void compact_cholesky_tiles(const T* F, T* factor, int32_t* info, int64_t n_blocks, int d,
                            int64_t tile_begin, int64_t tile_end, T damping) {
  const int64_t tri = int64_t(d) * (d + 1) / 2, tile_elems = tri * kCompactTile;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    CompactTile<T, kD> tile(d);
    for_each_subtile<T>(n_blocks, tile_begin, tile_end, [&](int64_t t, int64_t b0, int cnt, int u) {
      load_compact<T>(F + t * tile_elems + u, static_cast<int>(tri), tile.F.data());
      const M<T> inf = tile.refactor(factor + t * tile_elems + u, damping, /*fallback=*/false);
      for (int l = 0; l < cnt; ++l) info[b0 + l] = static_cast<int32_t>(inf[l]);
    });
  });
}

template <typename T>
void compact_solve_tiles(const T* factor, const T* B, T* X, int64_t n_blocks, int d,
                         int64_t tile_begin, int64_t tile_end) {
  const int64_t tile_elems = int64_t(d) * (d + 1) / 2 * kCompactTile;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    CompactTile<T, kD> tile(d);
    for_each_subtile<T>(n_blocks, tile_begin, tile_end, [&](int64_t t, int64_t b0, int cnt, int u) {
      tile.gather(B, b0, cnt, tile.x);
      tile.solve(factor + t * tile_elems + u);
      tile.scatter(tile.x, b0, cnt, X);
    });
  });
}

namespace {

// One row of m = rho m + g (g: the weight's row gr and the bias *gb; null: 0): sq[0] = 0 (no
// Adam direction), sq[1] = |m|^2.
template <typename T>
void momentum_row(T* mr, const T* gr, const T* gb, int64_t width, int64_t d, T rho, T* sq) {
  constexpr int W = Ln<T>::W;
  const V<T> rhov = lanes::splat<V<T>>(rho);
  V<T> acc = lanes::splat<V<T>>(T(0));
  int64_t j = 0;
  for (; j + W <= width; j += W) {
    V<T> mv, g = lanes::splat<V<T>>(T(0));
    std::memcpy(&mv, mr + j, sizeof(mv));
    if (gr != nullptr) std::memcpy(&g, gr + j, sizeof(g));
    mv = rhov * mv + g;
    std::memcpy(mr + j, &mv, sizeof(mv));
    acc += mv * mv;
  }
  T sum = T(0);
  for (int l = 0; l < W; ++l) sum += acc[l];
  for (; j < d; ++j) {
    const T g = j < width ? (gr != nullptr ? gr[j] : T(0)) : (gb != nullptr ? *gb : T(0));
    mr[j] = rho * mr[j] + g;
    sum += mr[j] * mr[j];
  }
  sq[0] = T(0);
  sq[1] = sum;
}

}  // namespace

template <typename T>
void graft_rows(T* m, T* v, const T* gw, const T* gb, int64_t width, int64_t d,
                int64_t row_begin, int64_t row_end, T rho, T beta2, T eps, T* sq, T* copy,
                int64_t copy_ld) {
  constexpr int W = Ln<T>::W;
  const T w2 = T(1) - beta2;
  const V<T> b2v = lanes::splat<V<T>>(beta2), w2v = lanes::splat<V<T>>(w2);
  const V<T> epsv = lanes::splat<V<T>>(eps), rhov = lanes::splat<V<T>>(rho);
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* mr = m + r * d;
    T* cr = copy != nullptr ? copy + (r - row_begin) * copy_ld : nullptr;
    const T* gr = gw != nullptr ? gw + r * width : nullptr;
    if (v == nullptr) {  // no Adam: the momentum and its norm
      momentum_row(mr, gr, gb != nullptr ? gb + r : nullptr, width, d, rho, sq + 2 * r);
      if (cr != nullptr) std::memcpy(cr, mr, d * sizeof(T));
      continue;
    }
    T* vr = v + r * d;
    V<T> acc = lanes::splat<V<T>>(T(0)), m_acc = acc;
    int64_t j = 0;
    for (; j + W <= width; j += W) {  // W lanes at a time (unaligned loads and stores)
      V<T> vv, mv, g = lanes::splat<V<T>>(T(0));
      std::memcpy(&vv, vr + j, sizeof(vv));
      std::memcpy(&mv, mr + j, sizeof(mv));
      if (gr != nullptr) std::memcpy(&g, gr + j, sizeof(g));
      mv = rhov * mv + g;
      vv = b2v * vv + w2v * g * g;
      std::memcpy(mr + j, &mv, sizeof(mv));
      std::memcpy(vr + j, &vv, sizeof(vv));
      if (cr != nullptr) std::memcpy(cr + j, &mv, sizeof(mv));
      const V<T> a = mv / (lanes::vsqrt<T>(vv) + epsv);
      acc += a * a;
      m_acc += mv * mv;
    }
    T sum = T(0), m_sum = T(0);
    for (int l = 0; l < W; ++l) {
      sum += acc[l];
      m_sum += m_acc[l];
    }
    for (; j < d; ++j) {  // the weight's last columns and the bias
      const T g = j < width ? (gr != nullptr ? gr[j] : T(0)) : (gb != nullptr ? gb[r] : T(0));
      mr[j] = rho * mr[j] + g;
      vr[j] = beta2 * vr[j] + w2 * g * g;
      if (cr != nullptr) cr[j] = mr[j];
      const T a = mr[j] / (std::sqrt(vr[j]) + eps);
      sum += a * a;
      m_sum += mr[j] * mr[j];
    }
    sq[2 * r] = sum;
    sq[2 * r + 1] = m_sum;
  }
}

namespace {

// The columns of a low-rank basis's V^T that the row passes take at a time: a k x 2048 slice
// (128 KB at k = 16, float32) stays in L2 while every row of a task's range passes over it;
// V^T whole is k d values, 1.6 MB for an ImageNet head's d = 25089, more than a core's L2.
constexpr int64_t kBasisChunk = 2048;

// out[r * k + q] += sum_{c in [c0, c1)} x[r * xld + c] vt[q * ld + c] for R rows x and G rows
// of V^T: R G dot products in registers, each x and V^T vector loaded once for all of them
// (unaligned: the rows start anywhere).
template <typename T, int R, int G>
void dot_block(const T* x, int64_t xld, const T* vt, int64_t ld, int64_t c0, int64_t c1,
               T* out, int64_t k) {
  constexpr int W = Ln<T>::W;
  using lanes::Ic;
  using lanes::loop;
  // Unrolled at compile time (lanes::loop), so that the accumulators live in registers: with
  // plain loops GCC kept them on the stack, and every multiply-add waited for the previous
  // one's store to be forwarded (5-8x slower on Zen 3).
  V<T> acc[R][G];
  loop(Ic<0>{}, Ic<R>{}, [&](auto r) {
    loop(Ic<0>{}, Ic<G>{}, [&](auto q) { acc[r][q] = lanes::splat<V<T>>(T(0)); });
  });
  int64_t j = c0;
  for (; j + W <= c1; j += W) {
    V<T> xv[R];
    loop(Ic<0>{}, Ic<R>{}, [&](auto r) { std::memcpy(&xv[r], x + r * xld + j, sizeof(V<T>)); });
    loop(Ic<0>{}, Ic<G>{}, [&](auto q) {
      V<T> b;
      std::memcpy(&b, vt + q * ld + j, sizeof(b));
      loop(Ic<0>{}, Ic<R>{}, [&](auto r) { acc[r][q] += xv[r] * b; });
    });
  }
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < G; ++q) {
      T sum = T(0);
      for (int l = 0; l < W; ++l) sum += acc[r][q][l];
      for (int64_t c = j; c < c1; ++c) sum += x[r * xld + c] * vt[q * ld + c];
      out[r * k + q] += sum;
    }
  }
}

template <typename T, int R>
void project_block(const T* x, int64_t d, const T* vt, int64_t k, int64_t c0, int64_t c1,
                   T* out) {
  // 4 x G accumulators: 16 of the 32 AVX-512 registers, 8 of AVX2's 16
  constexpr int G = lanes::kVectorBytes >= 64 ? 4 : 2;
  int64_t i = 0;
  for (; i + G <= k; i += G) dot_block<T, R, G>(x, d, vt + i * d, d, c0, c1, out + i, k);
  for (; i < k; ++i) dot_block<T, R, 1>(x, d, vt + i * d, d, c0, c1, out + i, k);
}

}  // namespace

template <typename T>
void project_rows(const T* m, int64_t d, int64_t row_begin, int64_t row_end, const T* basis_t,
                  int64_t k, T* projection) {
  // Four rows at a time share every load of V^T (1.7x faster than one row at a time, and
  // 1.6x faster than torch's GEMM for T = M V on Linear(4096, 4096), dev VM: ~3 ms, the FMA
  // rate), in column chunks (kBasisChunk).
  for (int64_t r = row_begin; r < row_end; ++r)
    for (int64_t i = 0; i < k; ++i) projection[r * k + i] = T(0);
  for (int64_t c0 = 0; c0 < d; c0 += kBasisChunk) {
    const int64_t c1 = std::min(d, c0 + kBasisChunk);
    int64_t r = row_begin;
    for (; r + 4 <= row_end; r += 4)
      project_block<T, 4>(m + r * d, d, basis_t, k, c0, c1, projection + r * k);
    for (; r < row_end; ++r)
      project_block<T, 1>(m + r * d, d, basis_t, k, c0, c1, projection + r * k);
  }
}

namespace {

// y_t[q, c] += sum_r t[r, q] x[r, c] for R rows x (row stride xld) over columns [0, w), q < s,
// each x vector loaded once for all s rows of y_t (stride ld, L2-resident); returns
// sum_r |x_r|^2 over those columns.
template <typename T, int R>
T sketch_accumulate(const T* x, int64_t xld, int64_t w, const T* t, int64_t s, T* y_t,
                    int64_t ld) {
  constexpr int W = Ln<T>::W;
  V<T> sq = lanes::splat<V<T>>(T(0));
  int64_t j = 0;
  using lanes::Ic;
  using lanes::loop;
  for (; j + W <= w; j += W) {  // (unrolled over R, as in dot_block, to keep xv in registers)
    V<T> xv[R];
    loop(Ic<0>{}, Ic<R>{}, [&](auto r) {
      std::memcpy(&xv[r], x + r * xld + j, sizeof(V<T>));
      sq += xv[r] * xv[r];
    });
    for (int64_t q = 0; q < s; ++q) {
      V<T> y;
      std::memcpy(&y, y_t + q * ld + j, sizeof(y));
      loop(Ic<0>{}, Ic<R>{}, [&](auto r) { y += lanes::splat<V<T>>(t[r * s + q]) * xv[r]; });
      std::memcpy(y_t + q * ld + j, &y, sizeof(y));
    }
  }
  T total = T(0);
  for (int l = 0; l < W; ++l) total += sq[l];
  for (; j < w; ++j) {
    for (int r = 0; r < R; ++r) {
      const T v = x[r * xld + j];
      total += v * v;
      for (int64_t q = 0; q < s; ++q) y_t[q * ld + j] += t[r * s + q] * v;
    }
  }
  return total;
}

// Rows [r0, r0 + R) of sketch_rows, their projections into t (R x s).
template <typename T, int R>
T sketch_block(const T* gw, const T* gb, int64_t width, int64_t r0, const T* omega_t,
               int64_t ld, int64_t s, T* t, T* y_t) {
  constexpr int G = lanes::kVectorBytes >= 64 ? 4 : 2;  // as project_block
  const T* x = gw + r0 * width;
  for (int64_t i = 0; i < R * s; ++i) t[i] = T(0);
  constexpr int P = R % 4 == 0 ? 4 : 1;  // rows per projection block (its registers: P x G)
  int64_t q = 0;
  for (int p = 0; p < R; p += P) {
    const T* xp = x + p * width;
    T* tp = t + p * s;
    for (q = 0; q + G <= s; q += G)
      dot_block<T, P, G>(xp, width, omega_t + q * ld, ld, 0, width, tp + q, s);
    for (; q < s; ++q) dot_block<T, P, 1>(xp, width, omega_t + q * ld, ld, 0, width, tp + q, s);
  }
  if (gb != nullptr)  // the bias, the rows' last column
    for (int r = 0; r < R; ++r)
      for (q = 0; q < s; ++q) t[r * s + q] += gb[r0 + r] * omega_t[q * ld + width];
  T sq = sketch_accumulate<T, R>(x, width, width, t, s, y_t, ld);
  if (gb != nullptr) {
    for (int r = 0; r < R; ++r) {
      const T b = gb[r0 + r];
      sq += b * b;
      for (q = 0; q < s; ++q) y_t[q * ld + width] += t[r * s + q] * b;
    }
  }
  return sq;
}

}  // namespace

template <typename T>
T sketch_rows(const T* gw, const T* gb, int64_t width, int64_t row_begin, int64_t row_end,
              const T* omega_t, int64_t ld, int64_t s, T* t, T* y_t) {
  // Eight rows at a time share every load and store of Y^T in the accumulation (and, four by
  // four, every load of Omega^T in the projection); they stay in L1/L2 between the two.
  T sq = T(0);
  int64_t r = row_begin;
  for (; r + 8 <= row_end; r += 8)
    sq += sketch_block<T, 8>(gw, gb, width, r, omega_t, ld, s, t + r * s, y_t);
  for (; r < row_end; ++r)
    sq += sketch_block<T, 1>(gw, gb, width, r, omega_t, ld, s, t + r * s, y_t);
  return sq;
}

namespace {

// How far ahead of a row pass its rows are prefetched (1 KB).
template <typename T>
constexpr int64_t kRowPrefetch = 1024 / int64_t(sizeof(T));

// R rows of p = decay p + coef u + t V^T over columns [c0, c1) (scalar tail included); each
// row of V^T loaded once for all R rows, t's values broadcast from memory.
template <typename T, int R>
void scaled_add_block(T* p, int64_t p_ld, const T* u, int64_t u_ld, const T* t, int64_t k,
                      const T* vt, int64_t vt_ld, int64_t c0, int64_t c1, T decay, T coef) {
  constexpr int W = Ln<T>::W;
  const V<T> dv = lanes::splat<V<T>>(decay), cv = lanes::splat<V<T>>(coef);
  int64_t j = c0;
  // Two vectors per row at a time: each broadcast of t serves two FMAs and each load of V^T
  // R of them (0.6 loads per FMA at R = 8 instead of 1.25 at one vector and R = 4: the rank
  // term was bound by the load ports, not the FMAs).
  for (; k > 0 && j + 2 * W <= c1; j += 2 * W) {
    V<T> acc[R][2];
    // R rows at once are 2 R streams, more than the hardware prefetcher follows: each row's p
    // and u are prefetched 1 KB ahead (on Zen 4, 6.4-6.5 ms -> 5.8 ms for 4096 x 4096 at k = 16;
    // the rest is the rank-k term's arithmetic).
    for (int r = 0; r < R; ++r) {
      prefetch_bytes(p + r * p_ld + j + kRowPrefetch<T>, 2 * sizeof(V<T>));
      prefetch_bytes(u + r * u_ld + j + kRowPrefetch<T>, 2 * sizeof(V<T>));
    }
    for (int r = 0; r < R; ++r) {
      for (int h = 0; h < 2; ++h) {
        V<T> pv, uv;
        std::memcpy(&pv, p + r * p_ld + j + h * W, sizeof(pv));
        std::memcpy(&uv, u + r * u_ld + j + h * W, sizeof(uv));
        acc[r][h] = dv * pv + cv * uv;
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      V<T> b0, b1;
      std::memcpy(&b0, vt + i * vt_ld + j, sizeof(b0));
      std::memcpy(&b1, vt + i * vt_ld + j + W, sizeof(b1));
      for (int r = 0; r < R; ++r) {
        const V<T> tv = lanes::splat<V<T>>(t[r * k + i]);
        acc[r][0] += tv * b0;
        acc[r][1] += tv * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      std::memcpy(p + r * p_ld + j, &acc[r][0], sizeof(V<T>));
      std::memcpy(p + r * p_ld + j + W, &acc[r][1], sizeof(V<T>));
    }
  }
  for (; j + W <= c1; j += W) {
    V<T> acc[R];
    for (int r = 0; r < R; ++r) {
      V<T> pv, uv;
      std::memcpy(&pv, p + r * p_ld + j, sizeof(pv));
      std::memcpy(&uv, u + r * u_ld + j, sizeof(uv));
      acc[r] = dv * pv + cv * uv;
    }
    for (int64_t i = 0; i < k; ++i) {
      V<T> b;
      std::memcpy(&b, vt + i * vt_ld + j, sizeof(b));
      for (int r = 0; r < R; ++r) acc[r] += lanes::splat<V<T>>(t[r * k + i]) * b;
    }
    for (int r = 0; r < R; ++r) std::memcpy(p + r * p_ld + j, &acc[r], sizeof(acc[r]));
  }
  for (; j < c1; ++j) {
    for (int r = 0; r < R; ++r) {
      T acc = decay * p[r * p_ld + j] + coef * u[r * u_ld + j];
      for (int64_t i = 0; i < k; ++i) acc += t[r * k + i] * vt[i * vt_ld + j];
      p[r * p_ld + j] = acc;
    }
  }
}

}  // namespace

template <typename T>
void scaled_add_rows(T* p, int64_t p_ld, const T* u, int64_t u_ld, const T* t, int64_t k,
                     const T* vt, int64_t vt_ld, int64_t w, int64_t row_begin, int64_t row_end,
                     T decay, T coef) {
  // As project_rows: rows share each load of V^T (eight where the registers hold 2 x 8
  // accumulators, AVX-512's 32), in column chunks (kBasisChunk).
  constexpr int RB = lanes::kVectorBytes >= 64 ? 8 : 4;
  for (int64_t c0 = 0; c0 < w; c0 += kBasisChunk) {
    const int64_t c1 = std::min(w, c0 + kBasisChunk);
    int64_t r = row_begin;
    for (; r + RB <= row_end; r += RB)
      scaled_add_block<T, RB>(p + r * p_ld, p_ld, u + r * u_ld, u_ld, t + r * k, k, vt, vt_ld,
                              c0, c1, decay, coef);
    for (; r + 4 <= row_end; r += 4)
      scaled_add_block<T, 4>(p + r * p_ld, p_ld, u + r * u_ld, u_ld, t + r * k, k, vt, vt_ld,
                             c0, c1, decay, coef);
    for (; r < row_end; ++r)
      scaled_add_block<T, 1>(p + r * p_ld, p_ld, u + r * u_ld, u_ld, t + r * k, k, vt, vt_ld,
                             c0, c1, decay, coef);
  }
}

#define MBF_INSTANTIATE(T)                                                                   \
  template StepStats mbf_step_tiles<T>(T*, const T*, T*, T*, T*, int64_t, int, int64_t,      \
                                       int64_t, const StepConfig&, const StepFlags&);        \
  template StepStats mbf_bucket_step_tiles<T>(const StepSegment<T>*, int, T*, T*, int,       \
                                              int64_t, int64_t, const StepConfig&,           \
                                              const StepTiles<T>&);                          \
  template void compact_outer_ema_tiles<T>(T*, const T*, int64_t, int, int64_t, int64_t, T); \
  template void compact_cholesky_tiles<T>(const T*, T*, int32_t*, int64_t, int, int64_t,     \
                                          int64_t, T);                                       \
  template void compact_solve_tiles<T>(const T*, const T*, T*, int64_t, int, int64_t, int64_t); \
  template void graft_rows<T>(T*, T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                              T, T, T, T*, T*, int64_t);                                      \
  template void project_rows<T>(const T*, int64_t, int64_t, int64_t, const T*, int64_t, T*);  \
  template void scaled_add_rows<T>(T*, int64_t, const T*, int64_t, const T*, int64_t,         \
                                   const T*, int64_t, int64_t, int64_t, int64_t, T, T);       \
  template T sketch_rows<T>(const T*, const T*, int64_t, int64_t, int64_t, const T*, int64_t, \
                            int64_t, T*, T*);

MBF_INSTANTIATE(float)
MBF_INSTANTIATE(double)
#undef MBF_INSTANTIATE
template StepStats mbf_bucket_step_tiles<float, Bf16>(const StepSegment<float>*, int, float*,
                                                      Bf16*, int, int64_t, int64_t,
                                                      const StepConfig&, const StepTiles<float>&);
template StepStats mbf_bucket_step_tiles<float, UnitI8>(const StepSegment<float>*, int, float*,
                                                        UnitI8*, int, int64_t, int64_t,
                                                        const StepConfig&,
                                                        const StepTiles<float>&);

}  // namespace cpu
}  // namespace mbf
