// CPU batched block kernels: a loop over blocks around the per-block numerics
// of small_spd.h, with the hot block sizes as compile-time constants.
// Torch-free: built into the extension and into the CMake library alike.
#include "mbf/batched.h"

#include <vector>

#include "mbf/small_spd.h"

namespace mbf {
namespace cpu {

template <typename T>
void cholesky_batched(const T* A, T* L, int32_t* info, int64_t begin,
                      int64_t end, int d, T damping) {
  const int64_t dd = int64_t(d) * d;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    for (int64_t b = begin; b < end; ++b)
      info[b] = cholesky_block<T, kD>(A + b * dd, L + b * dd, d, damping);
  });
}

template <typename T>
void cholesky_solve_batched(const T* L, T* X, int64_t begin, int64_t end,
                            int d, int k) {
  const int64_t dd = int64_t(d) * d, dk = int64_t(d) * k;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    for (int64_t b = begin; b < end; ++b)
      cholesky_solve_block<T, kD>(L + b * dd, X + b * dk, d, k);
  });
}

template <typename T>
void solve_spd_batched(const T* A, T* X, int32_t* info, int64_t begin,
                       int64_t end, int d, int k, T damping) {
  const int64_t dd = int64_t(d) * d, dk = int64_t(d) * k;
  // One factor buffer per call (per parallel chunk), reused for every block.
  std::vector<T> L(static_cast<size_t>(dd));
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    for (int64_t b = begin; b < end; ++b) {
      info[b] = cholesky_block<T, kD>(A + b * dd, L.data(), d, damping);
      T* x = X + b * dk;
      if (info[b] == 0) {
        cholesky_solve_block<T, kD>(L.data(), x, d, k);
      } else {
        for (int64_t i = 0; i < dk; ++i) x[i] = T(0);
      }
    }
  });
}

template <typename T>
void inv_spd_batched(const T* A, T* Ainv, int32_t* info, int64_t begin,
                     int64_t end, int d, T damping) {
  const int64_t dd = int64_t(d) * d;
  std::vector<T> L(static_cast<size_t>(dd));
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    for (int64_t b = begin; b < end; ++b) {
      info[b] = cholesky_block<T, kD>(A + b * dd, L.data(), d, damping);
      T* out = Ainv + b * dd;
      if (info[b] == 0) {
        cholesky_inverse_block<T, kD>(L.data(), out, d);
      } else {
        for (int64_t i = 0; i < dd; ++i) out[i] = T(0);
      }
    }
  });
}

template <typename T>
void outer_ema_batched(T* F, const T* G, int64_t begin, int64_t end, int d,
                       int S, T beta) {
  const int64_t dd = int64_t(d) * d, sd = int64_t(S) * d;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    for (int64_t b = begin; b < end; ++b)
      outer_ema_block<T, kD>(F + b * dd, G + b * sd, d, S, beta);
  });
}

#define MBF_INSTANTIATE(T)                                                    \
  template void cholesky_batched<T>(const T*, T*, int32_t*, int64_t, int64_t, \
                                    int, T);                                  \
  template void cholesky_solve_batched<T>(const T*, T*, int64_t, int64_t, int, \
                                          int);                               \
  template void solve_spd_batched<T>(const T*, T*, int32_t*, int64_t, int64_t, \
                                     int, int, T);                            \
  template void inv_spd_batched<T>(const T*, T*, int32_t*, int64_t, int64_t,  \
                                   int, T);                                   \
  template void outer_ema_batched<T>(T*, const T*, int64_t, int64_t, int, int, \
                                     T);

MBF_INSTANTIATE(float)
MBF_INSTANTIATE(double)
#undef MBF_INSTANTIATE

}  // namespace cpu
}  // namespace mbf
