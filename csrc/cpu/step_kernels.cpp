// The fused MBF step on the compact layout (declared in mbf/batched.h): momentum, optional
// curvature EMA, optional refactor, solve and parameter update for a tile of blocks while
// it is in registers/L1, so each array is read and written once per step.
// Torch-free: built into the extension and into the CMake library alike.
#include <algorithm>
#include <cstring>
#include <vector>

#include "mbf/batched.h"
#include "mbf/lanes.h"
#include "mbf/small_spd.h"

namespace mbf {
namespace cpu {
namespace {

template <typename T>
using Ln = lanes::Lanes<T>;
template <typename T>
using V = typename Ln<T>::V;
template <typename T>
using M = typename Ln<T>::M;
using lanes::tri_index;

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

// Compact rows of one sub-tile (W lanes at `base`, row stride kCompactTile) in and out.
template <typename T>
void load_compact(const T* base, int rows, V<T>* out) {
  for (int r = 0; r < rows; ++r) std::memcpy(&out[r], base + r * kCompactTile, sizeof(V<T>));
}
template <typename T>
void store_compact(const V<T>* in, int rows, T* base) {
  for (int r = 0; r < rows; ++r) std::memcpy(base + r * kCompactTile, &in[r], sizeof(V<T>));
}

inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 0);
}

template <typename T>
int64_t count_lanes(const M<T>& mask, int cnt) {
  int64_t c = 0;
  for (int l = 0; l < cnt; ++l) c += mask[l] != 0;
  return c;
}

template <typename T, int D>
struct StepTile {
  static constexpr int W = Ln<T>::W;
  std::vector<V<T>> gv, mv, pv, F, L, inv_diag, x;
  int n, tri;
  explicit StepTile(int d)
      : gv(d), mv(d), pv(d), F(d * (d + 1) / 2), L(d * (d + 1) / 2), inv_diag(d), x(d),
        n(D > 0 ? D : d), tri(n * (n + 1) / 2) {}

  // One sub-tile: W blocks starting at block b0, of which cnt are real.
  void run(T* p, const T* g, T* m, T* Fc, T* Lc, int64_t b0, int cnt, const StepConfig& cfg,
           StepStats& stats) {
    const auto nd = lanes::block_dim<D>(n);
    const int64_t row = int64_t(n);
    lanes::gather_lanes<T>(g + b0 * row, row, n, cnt, T(0), reinterpret_cast<T*>(gv.data()));

    if (cfg.update_curvature) {
      M<T> finite = lanes::splat<M<T>>(-1);
      for (int e = 0; e < n; ++e) finite &= (gv[e] - gv[e]) == T(0);
      stats.skipped_curvature += count_lanes<T>(~finite, cnt);
      load_compact<T>(Fc, tri, F.data());
      const T beta = static_cast<T>(cfg.beta), w = T(1) - static_cast<T>(cfg.beta);
      lanes::loop(lanes::Ic<0>{}, nd, [&](auto i) {
        lanes::loop(lanes::Ic<0>{}, i + lanes::Ic<1>{}, [&](auto j) {
          const V<T> c = gv[i] * gv[j];
          V<T>& f = F[tri_index(i, j)];
          const V<T> updated = cfg.first_curvature ? c : beta * f + w * c;
          f = finite ? updated : f;
        });
      });
      store_compact<T>(F.data(), tri, Fc);
    }

    if (cfg.refactor) {
      if (!cfg.update_curvature) load_compact<T>(Fc, tri, F.data());
      const T damping = static_cast<T>(cfg.damping);
      for (int t = 0; t < tri; ++t) L[t] = F[t];
      for (int i = 0; i < n; ++i) L[tri_index(i, i)] += damping;
      const M<T> info = lanes::factor_tile<T, D>(L.data(), inv_diag.data(), n);
      const M<T> failed = info != 0;
      stats.failed_factor += count_lanes<T>(failed, cnt);
      // Diagonal fallback for failed blocks (MBF_SPEC section 4): 1 / sqrt(F_ii + damping)
      // where that is finite and positive, else 1 / sqrt(damping), else 1.
      const T inv_sqrt_damping = damping > 0 ? T(1) / std::sqrt(damping) : T(1);
      for (int i = 0; i < n; ++i) {
        const V<T> s = F[tri_index(i, i)] + damping;
        const M<T> ok = (s > T(0)) & ((s - s) == T(0));
        V<T> fallback = lanes::vsqrt<T>(ok ? s : lanes::splat<V<T>>(T(1)));
        fallback = ok ? T(1) / fallback : lanes::splat<V<T>>(inv_sqrt_damping);
        inv_diag[i] = failed ? fallback : inv_diag[i];
        for (int j = 0; j < i; ++j)
          L[tri_index(i, j)] = failed ? lanes::splat<V<T>>(T(0)) : L[tri_index(i, j)];
        L[tri_index(i, i)] = inv_diag[i];
      }
      store_compact<T>(L.data(), tri, Lc);
    }

    lanes::gather_lanes<T>(m + b0 * row, row, n, cnt, T(0), reinterpret_cast<T*>(mv.data()));
    lanes::gather_lanes<T>(p + b0 * row, row, n, cnt, T(0), reinterpret_cast<T*>(pv.data()));
    const T lr = static_cast<T>(cfg.lr), rho = static_cast<T>(cfg.momentum);
    const T wd = static_cast<T>(cfg.weight_decay);
    for (int e = 0; e < n; ++e) {
      const V<T> dir = cfg.decoupled_weight_decay ? gv[e] : gv[e] + wd * pv[e];
      mv[e] = rho * mv[e] + dir;
      x[e] = mv[e];
    }
    // Solve straight from the compact rows (the diagonal there holds 1 / L_ii), which the
    // refactor branch above has just written when it ran: no copy of the factor per tile.
    lanes::solve_tile<T, D, /*InvDiagInL=*/true>(CompactRows<T>{Lc}, nullptr, x.data(), n, 1);
    for (int e = 0; e < n; ++e) {
      const V<T> decay = cfg.decoupled_weight_decay ? lr * wd * pv[e] : lanes::splat<V<T>>(T(0));
      pv[e] = pv[e] - lr * x[e] - decay;
    }
    lanes::scatter_lanes<T>(reinterpret_cast<const T*>(mv.data()), n, cnt, row, m + b0 * row);
    lanes::scatter_lanes<T>(reinterpret_cast<const T*>(pv.data()), n, cnt, row, p + b0 * row);
  }
};

}  // namespace

template <typename T>
StepStats mbf_step_tiles(T* p, const T* g, T* m, T* F, T* factor, int64_t n_blocks, int d,
                         int64_t tile_begin, int64_t tile_end, const StepConfig& cfg) {
  StepStats stats;
  const int64_t tri = int64_t(d) * (d + 1) / 2;
  constexpr int W = Ln<T>::W;
  static_assert(kCompactTile % W == 0, "a compact tile must hold whole vectors");
  const int64_t tile_bytes = tri * kCompactTile * int64_t(sizeof(T));
  const int64_t rows_bytes = int64_t(kCompactTile) * d * int64_t(sizeof(T));
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    StepTile<T, kD> tile(d);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      T* Ft = F + t * tri * kCompactTile;
      T* Lt = factor + t * tri * kCompactTile;
      // Prefetch the next tile of every stream the step reads, so that memory traffic
      // overlaps this tile's arithmetic (worth 10-15% here, like in the dense kernels).
      if (t + 1 < tile_end) {
        const int64_t next_row = (t + 1) * kCompactTile * int64_t(d);
        prefetch_bytes(Lt + tri * kCompactTile, tile_bytes);
        if (cfg.update_curvature || cfg.refactor) prefetch_bytes(Ft + tri * kCompactTile, tile_bytes);
        prefetch_bytes(g + next_row, rows_bytes);
        prefetch_bytes(m + next_row, rows_bytes);
        prefetch_bytes(p + next_row, rows_bytes);
      }
      for (int u = 0; u < kCompactTile; u += W) {
        const int64_t b0 = t * kCompactTile + u;
        const int cnt = static_cast<int>(std::clamp<int64_t>(n_blocks - b0, 0, W));
        tile.run(p, g, m, Ft + u, Lt + u, b0, cnt, cfg, stats);
      }
    }
  });
  return stats;
}

template StepStats mbf_step_tiles<float>(float*, const float*, float*, float*, float*, int64_t,
                                         int, int64_t, int64_t, const StepConfig&);
template StepStats mbf_step_tiles<double>(double*, const double*, double*, double*, double*,
                                          int64_t, int, int64_t, int64_t, const StepConfig&);

}  // namespace cpu
}  // namespace mbf
