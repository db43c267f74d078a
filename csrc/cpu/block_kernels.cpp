// CPU batched block kernels for the dense (N, d, d) layout of the public API.
//
// Factor / solve / inverse run SIMD-across-blocks (mbf/lanes.h): each tile of W blocks is
// transposed into lanes on load (only the lower triangle is read), computed with one
// vector instruction per scalar step, and transposed back on store. The transposition
// works in L1 while memory streams in, so these kernels are bounded by memory bandwidth,
// not by the per-block arithmetic. The hot block sizes are compile-time constants.
// Torch-free: built into the extension and into the CMake library alike.
#include "mbf/batched.h"

#include <algorithm>
#include <vector>

#include "lane_types.h"
#include "mbf/lanes.h"
#include "mbf/small_spd.h"

namespace mbf {
namespace cpu {
namespace {

// Per-call scratch of the tile kernels: the full d x d blocks in lanes (transposed in and
// factored in place), 1/diag, right-hand sides, and packed triangles for the inverse.
template <typename T>
struct TileScratch {
  std::vector<V<T>> full, inv_diag, x, linv, out;
  TileScratch(int n, int k, bool for_inverse)
      : full(size_t(n) * n), inv_diag(n), x(size_t(n) * k),
        linv(for_inverse ? n * (n + 1) / 2 : 0), out(for_inverse ? n * (n + 1) / 2 : 0) {}
};

template <typename T>
T* elements(std::vector<V<T>>& v) {
  // GCC/Clang vector types alias their element type.
  return reinterpret_cast<T*>(v.data());
}

// `cnt` consecutive dense blocks into lanes, in place in s.full (row-major n x n per lane;
// only the lower triangle is used), plus `damping` on the diagonal. Lanes past `cnt` (the
// batch tail) get the identity so that they stay finite.
template <typename T, int D>
void load_blocks(const T* A, TileScratch<T>& s, int d, int cnt, T damping) {
  constexpr int W = Ln<T>::W;
  const int n = D > 0 ? D : d;
  lanes::gather_lanes<T>(A, int64_t(n) * n, n * n, cnt, T(0), elements<T>(s.full));
  for (int i = 0; i < n; ++i) {
    V<T>& diag = s.full[i * n + i];
    for (int l = cnt; l < W; ++l) diag[l] = T(1);
    diag += damping;
  }
}

// Lanes back to `cnt` dense blocks. `a` holds the lower triangles in `idx`'s layout (it may
// be s.full itself); the upper triangle is mirrored (symmetric) or zero (triangular). Lanes
// whose `info` is non-zero are written as zeros.
template <typename T, int D, typename Index>
void store_blocks(const V<T>* a, Index idx, const M<T>& info, TileScratch<T>& s, T* out, int d,
                  int cnt, bool symmetric) {
  const int n = D > 0 ? D : d;
  const M<T> ok = info == 0;
  const V<T> zero = lanes::splat<V<T>>(T(0));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) {
      const V<T> v = ok ? a[idx(i, j)] : zero;
      s.full[j * n + i] = symmetric ? v : zero;  // first, so that the diagonal keeps v
      s.full[i * n + j] = v;
    }
  }
  lanes::scatter_lanes<T>(elements<T>(s.full), n * n, cnt, int64_t(n) * n, out);
}

template <typename T>
void load_rhs(const T* B, TileScratch<T>& s, int dk, int cnt) {
  lanes::gather_lanes<T>(B, dk, dk, cnt, T(0), elements<T>(s.x));
}

// Solutions of `cnt` blocks back to row-major (d, k); failed lanes (info != 0) get zeros.
template <typename T>
void store_rhs(TileScratch<T>& s, const M<T>& info, T* X, int dk, int cnt) {
  const M<T> ok = info == 0;
  for (int e = 0; e < dk; ++e) s.x[e] = ok ? s.x[e] : lanes::splat<V<T>>(T(0));
  lanes::scatter_lanes<T>(elements<T>(s.x), dk, cnt, dk, X);
}

template <typename T>
void store_info(const M<T>& info, int32_t* out, int cnt) {
  for (int l = 0; l < cnt; ++l) out[l] = static_cast<int32_t>(info[l]);
}

// The diagonal of a stored (full-layout) factor, inverted, for the solve of cholesky_solve.
template <typename T, int D>
void inverse_diagonal(const V<T>* a, V<T>* inv_diag, int d) {
  const int n = D > 0 ? D : d;
  for (int i = 0; i < n; ++i) inv_diag[i] = T(1) / a[i * n + i];
}

// Calls body(b0, cnt, pf) for each tile of at most W blocks in [begin, end), with `pf` set to
// the tile kPrefetchTiles ahead of `stream` (elements_per_block elements per block): the body
// spreads its lines over its arithmetic, and what it leaves is sent after it.
template <typename T, typename Body>
void for_each_tile(int64_t begin, int64_t end, const T* stream, int64_t elements_per_block,
                   Body&& body) {
  constexpr int W = Ln<T>::W;
  SpreadPrefetch pf;
  for (int64_t b0 = begin; b0 < end; b0 += W) {
    const int64_t next = b0 + kPrefetchTiles * W;
    if (next < end)
      pf.start(stream + next * elements_per_block,
               std::min<int64_t>(W, end - next) * elements_per_block * int64_t(sizeof(T)));
    body(b0, static_cast<int>(std::min<int64_t>(W, end - b0)), pf);
    pf.rest();
  }
}

// factor_tile's column hook: an equal share of the tile's prefetch at each column.
struct PrefetchByColumn {
  SpreadPrefetch& pf;
  int64_t per_column;
  PrefetchByColumn(SpreadPrefetch& p, int d) : pf(p), per_column((p.lines() + d - 1) / d) {}
  template <typename J>
  void operator()(J) const { pf.issue(per_column); }
};

}  // namespace

template <typename T>
void cholesky_batched(const T* A, T* L, int32_t* info, int64_t begin, int64_t end, int d,
                      T damping) {
  const int64_t dd = int64_t(d) * d;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    TileScratch<T> s(d, 0, false);
    const lanes::FullIndex<lanes::BlockDim<kD>> full{lanes::block_dim<kD>(d)};
    for_each_tile<T>(begin, end, A, dd, [&](int64_t b0, int cnt, SpreadPrefetch& pf) {
      load_blocks<T, kD>(A + b0 * dd, s, d, cnt, damping);
      const M<T> inf = lanes::factor_tile<T, kD>(s.full.data(), s.inv_diag.data(), d, full,
                                                 PrefetchByColumn(pf, d));
      store_blocks<T, kD>(s.full.data(), full, inf, s, L + b0 * dd, d, cnt, /*symmetric=*/false);
      store_info<T>(inf, info + b0, cnt);
    });
  });
}

namespace {

// cholesky_solve_batched's tiles, with `index` placing entry (i, j) of a factor in the tile as
// loaded: row-major, or (transposed storage) column-major; the diagonal is where it is either way.
template <typename T, int D, typename Index>
void cholesky_solve_tiles(const T* L, const T* B, T* X, int64_t begin, int64_t end, int d, int k,
                          Index index) {
  const int64_t dd = int64_t(d) * d, dk = int64_t(d) * k;
  TileScratch<T> s(d, k, false);
  const M<T> ok = lanes::splat<M<T>>(0);
  for_each_tile<T>(begin, end, L, dd, [&](int64_t b0, int cnt, SpreadPrefetch& pf) {
    load_blocks<T, D>(L + b0 * dd, s, d, cnt, T(0));
    pf.issue(pf.lines() / 2);  // half here, the rest after the solve
    inverse_diagonal<T, D>(s.full.data(), s.inv_diag.data(), d);
    load_rhs<T>(B + b0 * dk, s, static_cast<int>(dk), cnt);
    lanes::solve_tile<T, D>(s.full.data(), s.inv_diag.data(), s.x.data(), d, k, index);
    store_rhs<T>(s, ok, X + b0 * dk, static_cast<int>(dk), cnt);
  });
}

}  // namespace

template <typename T>
void cholesky_solve_batched(const T* L, const T* B, T* X, int64_t begin, int64_t end, int d,
                            int k, bool transposed) {
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    const auto n = lanes::block_dim<kD>(d);
    if (transposed)
      cholesky_solve_tiles<T, kD>(L, B, X, begin, end, d, k,
                                  lanes::TransposedFullIndex<lanes::BlockDim<kD>>{n});
    else
      cholesky_solve_tiles<T, kD>(L, B, X, begin, end, d, k,
                                  lanes::FullIndex<lanes::BlockDim<kD>>{n});
  });
}

template <typename T>
void solve_spd_batched(const T* A, const T* B, T* X, int32_t* info, int64_t begin,
                       int64_t end, int d, int k, T damping) {
  const int64_t dd = int64_t(d) * d, dk = int64_t(d) * k;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    TileScratch<T> s(d, k, false);
    const lanes::FullIndex<lanes::BlockDim<kD>> full{lanes::block_dim<kD>(d)};
    for_each_tile<T>(begin, end, A, dd, [&](int64_t b0, int cnt, SpreadPrefetch& pf) {
      load_blocks<T, kD>(A + b0 * dd, s, d, cnt, damping);
      const M<T> inf = lanes::factor_tile<T, kD>(s.full.data(), s.inv_diag.data(), d, full,
                                                 PrefetchByColumn(pf, d));
      load_rhs<T>(B + b0 * dk, s, static_cast<int>(dk), cnt);
      lanes::solve_tile<T, kD>(s.full.data(), s.inv_diag.data(), s.x.data(), d, k, full);
      store_rhs<T>(s, inf, X + b0 * dk, static_cast<int>(dk), cnt);
      store_info<T>(inf, info + b0, cnt);
    });
  });
}

template <typename T>
void inv_spd_batched(const T* A, T* Ainv, int32_t* info, int64_t begin, int64_t end, int d,
                     T damping) {
  const int64_t dd = int64_t(d) * d;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    TileScratch<T> s(d, 0, true);
    const lanes::FullIndex<lanes::BlockDim<kD>> full{lanes::block_dim<kD>(d)};
    for_each_tile<T>(begin, end, A, dd, [&](int64_t b0, int cnt, SpreadPrefetch& pf) {
      load_blocks<T, kD>(A + b0 * dd, s, d, cnt, damping);
      const M<T> inf = lanes::factor_tile<T, kD>(s.full.data(), s.inv_diag.data(), d, full,
                                                 PrefetchByColumn(pf, d));
      lanes::inverse_tile<T, kD>(s.full.data(), s.inv_diag.data(), s.linv.data(), s.out.data(),
                                 d, full);
      store_blocks<T, kD>(s.out.data(), lanes::PackedIndex{}, inf, s, Ainv + b0 * dd, d, cnt,
                          /*symmetric=*/true);
      store_info<T>(inf, info + b0, cnt);
    });
  });
}

template <typename T>
void outer_ema_batched(T* F, const T* G, int64_t begin, int64_t end, int d, int S, T beta) {
  const int64_t dd = int64_t(d) * d, sd = int64_t(S) * d;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    for (int64_t b = begin; b < end; ++b)
      outer_ema_block<T, kD>(F + b * dd, G + b * sd, d, S, beta);
  });
}

#define MBF_INSTANTIATE(T)                                                                  \
  template void cholesky_batched<T>(const T*, T*, int32_t*, int64_t, int64_t, int, T);      \
  template void cholesky_solve_batched<T>(const T*, const T*, T*, int64_t, int64_t, int, int, \
                                          bool);                                              \
  template void solve_spd_batched<T>(const T*, const T*, T*, int32_t*, int64_t, int64_t, int,  \
                                     int, T);                                                 \
  template void inv_spd_batched<T>(const T*, T*, int32_t*, int64_t, int64_t, int, T);       \
  template void outer_ema_batched<T>(T*, const T*, int64_t, int64_t, int, int, T);

MBF_INSTANTIATE(float)
MBF_INSTANTIATE(double)
#undef MBF_INSTANTIATE

}  // namespace cpu
}  // namespace mbf
