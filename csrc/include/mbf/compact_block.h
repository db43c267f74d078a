// The fused MBF step (MBF_SPEC section 3) and its phases for ONE block of the compact layout
// (see batched.h): what one CUDA thread does in csrc/cuda/step_kernels.cuh. Torch-free and
// MBF_HD, so the C++ unit tests run this very code on the host over every block and compare it
// with the CPU kernels: the device math is tested on machines without a GPU, and only the
// launch (grid, segment lookup, counters) is left to the GPU tests.
//
// D > 0, a hot size: the block's triangles live in register arrays and every loop unrolls, so
// each packed index is a constant. D == 0, the generic path (d <= kMaxGenericDim): the factor
// is built in place in its output rows (a thread only reads back what it wrote itself) and the
// vectors live in local arrays of kMaxGenericDim.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mbf/batched.h"
#include "mbf/small_spd.h"

namespace mbf {

// Block entry e of a compact tensor is kCompactStride elements after entry e - 1 (the 16
// blocks of a tile are interleaved entry by entry: batched.h's kCompactTile).
inline constexpr int kCompactStride = 16;
// Largest d of the generic (non-hot) path of the per-block step.
inline constexpr int kMaxGenericDim = 64;

MBF_HD constexpr int packed_index(int i, int j) { return i * (i + 1) / 2 + j; }

// The packed triangle of one block, read and written in place in a compact tensor.
template <typename T>
struct CompactEntries {
  T* p;  // entry 0 of the block
  MBF_HD T& operator[](int e) const { return p[int64_t(e) * kCompactStride]; }
};

// A triangle in registers (hot sizes) or, for the generic path, a view of compact memory.
template <typename T, int D>
struct Triangle {
  T v[D * (D + 1) / 2];
  MBF_HD T& operator[](int e) { return v[e]; }
  MBF_HD const T& operator[](int e) const { return v[e]; }
};

// One block's vector: `width` values at main[0..width), then tail[0] when there is a tail (a
// Linear bias joined to its weight row), so d = width + (tail ? 1 : 0).
// T is const for the gradient.
template <typename T>
struct BlockVector {
  T* main;
  T* tail;
  int width;
  MBF_HD T& operator[](int i) const { return i < width ? main[i] : *tail; }
};

// Hyper-parameters in the data's precision (StepConfig holds doubles).
template <typename T>
struct StepScalars {
  T lr, momentum, beta, one_minus_beta, damping, weight_decay, floor;
  bool decoupled;
  T beta2, one_minus_beta2, eps;
  bool write, graft, lagged;
};

template <typename T>
inline StepScalars<T> step_scalars(const StepConfig& c) {
  const double floor = c.damping > 0 ? 1.0 / std::sqrt(c.damping) : 1.0;
  return {T(c.lr),          T(c.momentum),     T(c.beta), T(1.0 - c.beta),
          T(c.damping),     T(c.weight_decay), T(floor),  c.decoupled_weight_decay,
          T(c.beta2),       T(1.0 - c.beta2),  T(c.eps),  c.write, c.graft, c.lagged};
}

// What a block's step takes beyond the paper (StepConfig::graft, StepTiles): its damping at a
// refactor, and when grafting its second moment, its unit's bias corrections, the update's lr
// multiplier, where its [|u|^2, |a|^2] go (norms[0] and norms[kCompactStride]) and its
// direction u (entry e at direction[e]: StepTiles::directions, compact); `v_block` (non-null:
// StepTiles::block_v) its one second moment, which replaces v per entry.
template <typename T>
struct BlockExtras {
  T damping;
  BlockVector<T> v;
  T c1, s2, scale;
  T* norms;
  CompactEntries<T> direction;
  T* v_block = nullptr;
};

// Entry 0 of block b of a compact tensor of blocks of size d.
template <typename T>
MBF_HD CompactEntries<T> compact_entries(T* C, int64_t b, int d) {
  const int64_t tri = int64_t(d) * (d + 1) / 2;
  return {C + (b / kCompactStride) * tri * kCompactStride + b % kCompactStride};
}

// Entry 0 of block b of a compact tensor of d-vectors (StepTiles::directions); none for null.
template <typename T>
MBF_HD CompactEntries<T> compact_vector(T* C, int64_t b, int d) {
  if (C == nullptr) return {nullptr};
  return {C + (b / kCompactStride) * int64_t(d) * kCompactStride + b % kCompactStride};
}

// Factor A + damping I row by row (as the Triton kernels do) into l, diagonal stored inverted.
// Returns 0, or the 1-based order of the first pivot that is not a finite positive number (a
// failed pivot is replaced by 1 so that the rest of the block stays finite; the caller
// replaces failed blocks).
template <typename T, int D, typename Src, typename Dst>
MBF_HD int32_t factor_packed(const Src& a, Dst& l, int d, T damping) {
  const int n = block_dim<D>(d);
  int32_t info = 0;
MBF_UNROLL
  for (int i = 0; i < (D > 0 ? D : n); ++i) {
MBF_UNROLL
    for (int j = 0; j <= i; ++j) {
      T s = a[packed_index(i, j)];
      if (i == j) s += damping;
MBF_UNROLL
      for (int k = 0; k < j; ++k) s -= l[packed_index(i, k)] * l[packed_index(j, k)];
      if (i == j) {
        const bool ok = pivot_ok(s);
        if (!ok && info == 0) info = i + 1;
        l[packed_index(i, i)] = T(1) / std::sqrt(ok ? s : T(1));
      } else {
        l[packed_index(i, j)] = s * l[packed_index(j, j)];
      }
    }
  }
  return info;
}

// MBF_SPEC section 4: a block whose factor failed gets the diagonal preconditioner
// 1 / sqrt(A_ii + damping), or `floor` (1 / sqrt(damping), or 1) where that is not a finite
// positive number.
template <typename T, int D, typename Src, typename Dst>
MBF_HD void diagonal_fallback(const Src& a, Dst& l, int d, T damping, T floor) {
  const int n = block_dim<D>(d);
MBF_UNROLL
  for (int i = 0; i < (D > 0 ? D : n); ++i) {
MBF_UNROLL
    for (int j = 0; j < i; ++j) l[packed_index(i, j)] = T(0);
    const T s = a[packed_index(i, i)] + damping;
    l[packed_index(i, i)] = pivot_ok(s) ? T(1) / std::sqrt(s) : floor;
  }
}

// x = (L L^T)^{-1} x in place, L packed with its diagonal inverted.
template <typename T, int D, typename Fac, typename Vec>
MBF_HD void solve_packed(const Fac& l, Vec& x, int d) {
  const int n = block_dim<D>(d);
MBF_UNROLL
  for (int i = 0; i < (D > 0 ? D : n); ++i) {
    T s = x[i];
MBF_UNROLL
    for (int k = 0; k < i; ++k) s -= l[packed_index(i, k)] * x[k];
    x[i] = s * l[packed_index(i, i)];
  }
MBF_UNROLL
  for (int r = 0; r < (D > 0 ? D : n); ++r) {
    const int i = n - 1 - r;
    T s = x[i];
MBF_UNROLL
    for (int k = i + 1; k < (D > 0 ? D : n); ++k) s -= l[packed_index(k, i)] * x[k];
    x[i] = s * l[packed_index(i, i)];
  }
}

// F = beta F + (1 - beta) g g^T, or g g^T when `first`.
template <typename T, int D, typename Tri, typename Vec>
MBF_HD void refresh_packed(Tri& f, const Vec& g, int d, T beta, T one_minus_beta, bool first) {
  const int n = block_dim<D>(d);
MBF_UNROLL
  for (int i = 0; i < (D > 0 ? D : n); ++i) {
MBF_UNROLL
    for (int j = 0; j <= i; ++j) {
      const T c = g[i] * g[j];
      T& e = f[packed_index(i, j)];
      e = first ? c : beta * e + one_minus_beta * c;
    }
  }
}

// Counts a step adds (0 or 1 for one block).
struct BlockCounts {
  int skipped_curvature = 0;
  int failed_factor = 0;
};

// Triangles of a hot-size block are copied into registers and back; the generic path works on
// the compact entries in place.
template <typename T, int D, typename Src>
MBF_HD void load_triangle(Triangle<T, D>& t, const Src& c) {
MBF_UNROLL
  for (int e = 0; e < D * (D + 1) / 2; ++e) t[e] = c[e];
}
template <typename T, int D>
MBF_HD void store_triangle(const Triangle<T, D>& t, const CompactEntries<T>& c) {
MBF_UNROLL
  for (int e = 0; e < D * (D + 1) / 2; ++e) c[e] = t[e];
}

// The factor in its storage FT (factor_dtype): T, or Bf16 beside float, widened as read and
// rounded to nearest as written. At a hot size the stored values are read back into registers,
// so that the solve of the refactoring step uses the factor as stored, as later steps do.
MBF_HD float widen(Bf16 x) { return bf16_to_float(x); }
template <typename T>
MBF_HD T widen(T x) { return x; }
template <typename T, int D, typename FT>
MBF_HD void load_factor(Triangle<T, D>& t, const CompactEntries<FT>& c) {
MBF_UNROLL
  for (int e = 0; e < D * (D + 1) / 2; ++e) t[e] = widen(c[e]);
}
template <typename T, int D, typename FT>
MBF_HD void store_factor(Triangle<T, D>& t, const CompactEntries<FT>& c) {
  if constexpr (std::is_same_v<FT, T>) {
    store_triangle<T, D>(t, c);
  } else {
MBF_UNROLL
    for (int e = 0; e < D * (D + 1) / 2; ++e) {
      c[e] = bf16_from_float(t[e]);
      t[e] = widen(c[e]);
    }
  }
}

// p moved by lr_u x and the decoupled decay.
template <typename T, int D, typename Vec>
MBF_HD void move_block(const BlockVector<T>& p, const Vec& x, int d, const StepScalars<T>& c,
                       T lr_u) {
MBF_UNROLL
  for (int i = 0; i < (D > 0 ? D : block_dim<D>(d)); ++i) {
    const T pi = p[i];
    p[i] = c.decoupled ? pi - (lr_u * x[i] + c.lr * c.weight_decay * pi) : pi - lr_u * x[i];
  }
}

// The update once u = x holds (F + damping I)^{-1} m: m and p (the paper's pass), or, when
// grafting (the measuring pass), Adam's direction, both norms, m, v and u stored (lagged: m, v
// and the norms stored, p moved by u scaled by the previous step's ratio). mv and vv are the
// new momentum and second moment (with ex.v_block, the squared directions: the block's v is
// their mean's EMA).
template <typename T, int D, typename Vec>
MBF_HD void finish_block(const BlockVector<T>& p, const BlockVector<T>& m, const Vec& mv,
                         const Vec& vv, const Vec& x, int d, const StepScalars<T>& c,
                         const BlockExtras<T>& ex) {
  const int n = block_dim<D>(d);
  if (c.graft) {
    T su = T(0), sa = T(0);
    T scale = T(0);  // with v per block, one denominator for the block
    if (ex.v_block != nullptr) {
      T squares = T(0);
MBF_UNROLL
      for (int i = 0; i < (D > 0 ? D : n); ++i) squares += vv[i];
      const T v = c.beta2 * *ex.v_block + c.one_minus_beta2 * (squares / T(n));
      *ex.v_block = v;
      scale = ex.c1 / (ex.s2 * std::sqrt(v) + c.eps);
    }
MBF_UNROLL
    for (int i = 0; i < (D > 0 ? D : n); ++i) {
      const T a = ex.v_block != nullptr ? scale * mv[i]
                                        : ex.c1 * mv[i] / (ex.s2 * std::sqrt(vv[i]) + c.eps);
      su += x[i] * x[i];
      sa += a * a;
    }
    // A block whose norms are not finite (a NaN gradient) is left out of its unit's norms.
    const bool ok = std::isfinite(su) && std::isfinite(sa);
    ex.norms[0] = ok ? su : T(0);
    ex.norms[kCompactStride] = ok ? sa : T(0);
  }
MBF_UNROLL
  for (int i = 0; i < (D > 0 ? D : n); ++i) {
    m[i] = mv[i];
    if (c.graft) {
      if (ex.v_block == nullptr) ex.v[i] = vv[i];
      if (!c.lagged) ex.direction[i] = x[i];
    }
  }
  // The paper's pass, or the lagged grafted pass, scaled by the previous step's ratio.
  if (!c.graft || c.lagged) move_block<T, D>(p, x, d, c, c.graft ? c.lr * ex.scale : c.lr);
}

// One MBF step of one block: p, g, m its vectors (d values each), F and L its compact entries.
// FT, the factor's storage: T, or Bf16 beside float at a hot size only (D > 0; the generic
// path builds the factor in place in its entries, which bfloat16 would round as it goes).
template <typename T, int D, typename FT = T>
MBF_HD BlockCounts step_block(const BlockVector<T>& p, const BlockVector<const T>& g,
                              const BlockVector<T>& m, const CompactEntries<T>& F,
                              const CompactEntries<FT>& L, int d, const StepScalars<T>& c,
                              bool update_curvature, bool first_curvature, bool refactor,
                              const BlockExtras<T>& ex) {
  constexpr int kVec = D > 0 ? D : kMaxGenericDim;
  const int n = block_dim<D>(d);
  // A grafted step's writing pass moves p by the stored direction: no g, m, v or factor read.
  const bool apply = c.write && c.graft && !c.lagged;
  BlockCounts counts;
  T gv[kVec] = {};  // read below only where loaded; the compiler cannot tell
  bool finite = true;
  if (!apply || update_curvature) {
MBF_UNROLL
    for (int i = 0; i < (D > 0 ? D : n); ++i) {
      gv[i] = g[i];
      finite = finite && std::isfinite(gv[i]);
    }
  }
  const T floor = ex.damping > T(0) ? T(1) / std::sqrt(ex.damping) : T(1);
  T x[kVec], mv[kVec];
  T vv[kVec] = {};  // set and read under c.graft only; GCC cannot tell through the lagged branch
  if constexpr (D > 0) {
    Triangle<T, D> f, l;
    if (update_curvature || refactor) load_triangle<T, D>(f, F);
    if (update_curvature) {
      if (finite) {
        refresh_packed<T, D>(f, gv, d, c.beta, c.one_minus_beta, first_curvature);
        store_triangle<T, D>(f, F);
      } else {
        counts.skipped_curvature = 1;
      }
    }
    if (refactor) {
      if (factor_packed<T, D>(f, l, d, ex.damping) != 0) {
        diagonal_fallback<T, D>(f, l, d, ex.damping, floor);
        counts.failed_factor = 1;
      }
      store_factor<T, D>(l, L);
    } else if ((c.write || c.graft) && !apply) {
      load_factor<T, D>(l, L);
    }
    if (!c.write && !c.graft) return counts;  // the refresh/refactor-only pass
    if (apply) {
MBF_UNROLL
      for (int i = 0; i < D; ++i) x[i] = ex.direction[i];
      move_block<T, D>(p, x, d, c, c.lr * ex.scale);
      return counts;
    }
MBF_UNROLL
    for (int i = 0; i < D; ++i) {
      const T dir = c.decoupled ? gv[i] : gv[i] + c.weight_decay * p[i];
      mv[i] = c.momentum * m[i] + dir;
      x[i] = mv[i];
      if (c.graft)
        vv[i] = ex.v_block != nullptr ? dir * dir
                                      : c.beta2 * ex.v[i] + c.one_minus_beta2 * dir * dir;
    }
    solve_packed<T, D>(l, x, d);
  } else if constexpr (std::is_same_v<FT, T>) {
    if (update_curvature) {
      if (finite) {
        CompactEntries<T> f = F;
        refresh_packed<T, 0>(f, gv, d, c.beta, c.one_minus_beta, first_curvature);
      } else {
        counts.skipped_curvature = 1;
      }
    }
    if (refactor) {
      CompactEntries<T> l = L;
      if (factor_packed<T, 0>(F, l, d, ex.damping) != 0) {
        diagonal_fallback<T, 0>(F, l, d, ex.damping, floor);
        counts.failed_factor = 1;
      }
    }
    if (!c.write && !c.graft) return counts;
    if (apply) {
      for (int i = 0; i < n; ++i) x[i] = ex.direction[i];
      move_block<T, D>(p, x, d, c, c.lr * ex.scale);
      return counts;
    }
    for (int i = 0; i < n; ++i) {
      const T dir = c.decoupled ? gv[i] : gv[i] + c.weight_decay * p[i];
      mv[i] = c.momentum * m[i] + dir;
      x[i] = mv[i];
      if (c.graft)
        vv[i] = ex.v_block != nullptr ? dir * dir
                                      : c.beta2 * ex.v[i] + c.one_minus_beta2 * dir * dir;
    }
    solve_packed<T, 0>(L, x, d);
  } else {
    static_assert(D > 0 || std::is_same_v<FT, T>, "a bfloat16 factor needs a hot block size");
  }
  finish_block<T, D>(p, m, mv, vv, x, d, c, ex);
  return counts;
}

// The step's phases alone, per block (the compact ops).

// F = beta F + (1 - beta) g g^T, g the block's d values.
template <typename T, int D>
MBF_HD void compact_outer_ema_block(const CompactEntries<T>& F, const T* g, int d, T beta) {
  if constexpr (D > 0) {
    Triangle<T, D> f;
    load_triangle<T, D>(f, F);
    refresh_packed<T, D>(f, g, d, beta, T(1) - beta, false);
    store_triangle<T, D>(f, F);
  } else {
    CompactEntries<T> f = F;
    refresh_packed<T, 0>(f, g, d, beta, T(1) - beta, false);
  }
}

// L = chol(F + damping I), diagonal inverted; zeros where it failed. Returns info.
template <typename T, int D>
MBF_HD int32_t compact_cholesky_block(const CompactEntries<const T>& F,
                                      const CompactEntries<T>& L, int d, T damping) {
  const int n = block_dim<D>(d);
  int32_t info;
  if constexpr (D > 0) {
    Triangle<T, D> f, l;
    load_triangle<T, D>(f, F);
    info = factor_packed<T, D>(f, l, d, damping);
    store_triangle<T, D>(l, L);
  } else {
    CompactEntries<T> l = L;
    info = factor_packed<T, 0>(F, l, d, damping);
  }
  if (info != 0)
    for (int e = 0; e < n * (n + 1) / 2; ++e) L[e] = T(0);
  return info;
}

// x = (L L^T)^{-1} b, b and x the block's d values (x may alias b).
template <typename T, int D>
MBF_HD void compact_solve_block(const CompactEntries<const T>& L, const T* b, T* x, int d) {
  const int n = block_dim<D>(d);
  constexpr int kVec = D > 0 ? D : kMaxGenericDim;
  T v[kVec];
MBF_UNROLL
  for (int i = 0; i < (D > 0 ? D : n); ++i) v[i] = b[i];
  if constexpr (D > 0) {
    Triangle<T, D> l;
    load_triangle<T, D>(l, L);
    solve_packed<T, D>(l, v, d);
  } else {
    solve_packed<T, 0>(L, v, d);
  }
MBF_UNROLL
  for (int i = 0; i < (D > 0 ? D : n); ++i) x[i] = v[i];
}

}  // namespace mbf
