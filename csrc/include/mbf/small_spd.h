// Per-block numerics for small symmetric positive definite (SPD) matrices.
//
// Everything here works on ONE d x d block through raw pointers and is free of
// torch, so the same code compiles into the torch extension (CPU and CUDA), into
// the plain C++ library that CMake builds, and into its unit tests.
//
// Template parameter D: a compile-time block size for the hot sizes (the loops
// then unroll fully), or 0 for the generic path where the runtime `d` is used.
// Every function takes the runtime `d` too and ignores it when D > 0.
//
// Storage: a dense block is row-major d x d; a right-hand side is row-major
// d x k (k columns). Only the lower triangle of an SPD input is read, as
// torch.linalg.cholesky does.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MBF_HD __host__ __device__ __forceinline__
#else
#define MBF_HD inline
#endif

// Full unrolling of the per-block loops in device code (constant bounds for the hot sizes
// turn every packed index into a constant, so the block stays in registers); the host
// compiler, which warns on the pragma, unrolls on its own.
#if defined(__CUDA_ARCH__)
#define MBF_UNROLL _Pragma("unroll")
#else
#define MBF_UNROLL
#endif

namespace mbf {

// Compile-time size when known, else the runtime one.
template <int D>
MBF_HD int block_dim(int d) {
  return D > 0 ? D : d;
}

// A pivot is accepted only when it is a finite positive number: `!(p > 0)`
// also rejects NaN, and isfinite rejects +Inf, so a non-finite input can never
// produce a factor that reports success.
template <typename T>
MBF_HD bool pivot_ok(T p) {
  return p > T(0) && std::isfinite(p);
}

// Cholesky factor of (A + damping * I), row by row (Cholesky-Banachiewicz).
// Writes the lower factor into L (the strict upper triangle is zeroed) and
// returns 0 on success, else i + 1 where i is the first row whose pivot is not
// a finite positive number: the order of the first leading minor that is not
// positive definite, which is LAPACK's (and torch's) `info` convention.
// On failure the rows from i on are zeroed.
template <typename T, int D>
MBF_HD int32_t cholesky_block(const T* A, T* L, int d, T damping) {
  const int n = block_dim<D>(d);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) {
      // Damping is added before the updates, in the order the torch
      // reference rounds (A + damping * I, then factor).
      T s = (i == j) ? A[i * n + j] + damping : A[i * n + j];
      for (int k = 0; k < j; ++k) s -= L[i * n + k] * L[j * n + k];
      if (i == j) {
        if (!pivot_ok(s)) {
          for (int r = i; r < n; ++r)
            for (int c = 0; c < n; ++c) L[r * n + c] = T(0);
          return i + 1;
        }
        L[i * n + i] = std::sqrt(s);
      } else {
        L[i * n + j] = s / L[j * n + j];
      }
    }
    for (int j = i + 1; j < n; ++j) L[i * n + j] = T(0);
  }
  return 0;
}

// Solve (L L^T) X = B in place: X holds B (d x k, row-major) on entry and the
// solution on exit. L is a lower Cholesky factor as written above.
template <typename T, int D>
MBF_HD void cholesky_solve_block(const T* L, T* X, int d, int k) {
  const int n = block_dim<D>(d);
  for (int c = 0; c < k; ++c) {
    // Forward substitution: L y = b.
    for (int i = 0; i < n; ++i) {
      T s = X[i * k + c];
      for (int j = 0; j < i; ++j) s -= L[i * n + j] * X[j * k + c];
      X[i * k + c] = s / L[i * n + i];
    }
    // Back substitution: L^T x = y.
    for (int i = n - 1; i >= 0; --i) {
      T s = X[i * k + c];
      for (int j = i + 1; j < n; ++j) s -= L[j * n + i] * X[j * k + c];
      X[i * k + c] = s / L[i * n + i];
    }
  }
}

// (L L^T)^{-1} into Ainv (d x d), as the solve against the identity.
template <typename T, int D>
MBF_HD void cholesky_inverse_block(const T* L, T* Ainv, int d) {
  const int n = block_dim<D>(d);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) Ainv[i * n + j] = (i == j) ? T(1) : T(0);
  cholesky_solve_block<T, D>(L, Ainv, n, n);
}

// In place: F = beta * F + (1 - beta) * (1/S) * sum_s g_s g_s^T, where G holds
// S vectors of length d, row-major (S x d). The full symmetric block is
// written; each product is formed once and mirrored so F stays exactly
// symmetric.
template <typename T, int D>
MBF_HD void outer_ema_block(T* F, const T* G, int d, int S, T beta) {
  const int n = block_dim<D>(d);
  const T w = (T(1) - beta) / T(S);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) {
      T c = T(0);
      for (int s = 0; s < S; ++s) c += G[s * n + i] * G[s * n + j];
      const T v = beta * F[i * n + j] + w * c;
      F[i * n + j] = v;
      F[j * n + i] = v;
    }
  }
}

}  // namespace mbf

// Calls BODY with `constexpr int kD` bound to the block size when it is one of
// the hot sizes (3x3, 5x5 and 3x3x3 kernels, small linear rows, ...), else
// with kD = 0 (generic path). Shared by the CPU and CUDA dispatchers so the
// list of specialised sizes lives in one place.
#define MBF_DISPATCH_BLOCK_DIM(d, ...)            \
  [&] {                                           \
    switch (d) {                                  \
      case 1: { constexpr int kD = 1; return __VA_ARGS__(); }   \
      case 4: { constexpr int kD = 4; return __VA_ARGS__(); }   \
      case 9: { constexpr int kD = 9; return __VA_ARGS__(); }   \
      case 10: { constexpr int kD = 10; return __VA_ARGS__(); } \
      case 16: { constexpr int kD = 16; return __VA_ARGS__(); } \
      case 25: { constexpr int kD = 25; return __VA_ARGS__(); } \
      case 27: { constexpr int kD = 27; return __VA_ARGS__(); } \
      default: { constexpr int kD = 0; return __VA_ARGS__(); }  \
    }                                             \
  }()

namespace mbf {

// Whether MBF_DISPATCH_BLOCK_DIM has a specialised path for d (read from the macro itself, so
// the list of hot sizes stays in one place).
inline bool is_hot_block_dim(int d) {
  return MBF_DISPATCH_BLOCK_DIM(d, [&] { return kD; }) != 0;
}

}  // namespace mbf
