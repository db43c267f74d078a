// CUDA batched block kernels: one thread per block over the per-block
// numerics of small_spd.h, hot sizes as compile-time constants.
// Torch-free (launchers take a raw stream), so the CMake build compiles this
// file with plain nvcc on machines without a GPU or a CUDA build of torch.
#include <cuda_runtime.h>

#include "launch.cuh"
#include "mbf/batched.h"
#include "mbf/small_spd.h"

namespace mbf {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, int D>
__global__ void cholesky_kernel(const T* __restrict__ A, T* __restrict__ L,
                                int32_t* __restrict__ info, int64_t n, int d,
                                T damping) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n) return;
  const int64_t dd = int64_t(d) * d;
  info[b] = cholesky_block<T, D>(A + b * dd, L + b * dd, d, damping);
}

template <typename T, int D>
__global__ void cholesky_solve_kernel(const T* __restrict__ L,
                                      T* __restrict__ X, int64_t n, int d,
                                      int k) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n) return;
  cholesky_solve_block<T, D>(L + b * int64_t(d) * d, X + b * int64_t(d) * k, d,
                             k);
}

template <typename T, int D>
__global__ void cholesky_inverse_kernel(const T* __restrict__ L,
                                        T* __restrict__ Ainv, int64_t n,
                                        int d) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n) return;
  const int64_t dd = int64_t(d) * d;
  cholesky_inverse_block<T, D>(L + b * dd, Ainv + b * dd, d);
}

template <typename T, int D>
__global__ void outer_ema_kernel(T* __restrict__ F, const T* __restrict__ G,
                                 int64_t n, int d, int S, T beta) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n) return;
  outer_ema_block<T, D>(F + b * int64_t(d) * d, G + b * int64_t(S) * d, d, S,
                        beta);
}

}  // namespace

template <typename T>
int cholesky_batched(const T* A, T* L, int32_t* info, int64_t n, int d,
                     T damping, void* stream) {
  if (n == 0) return cudaSuccess;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    cholesky_kernel<T, kD><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(
        A, L, info, n, d, damping);
  });
  return cudaGetLastError();
}

template <typename T>
int cholesky_solve_batched(const T* L, T* X, int64_t n, int d, int k,
                           void* stream) {
  if (n == 0) return cudaSuccess;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    cholesky_solve_kernel<T, kD>
        <<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(L, X, n, d, k);
  });
  return cudaGetLastError();
}

template <typename T>
int cholesky_inverse_batched(const T* L, T* Ainv, int64_t n, int d,
                             void* stream) {
  if (n == 0) return cudaSuccess;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    cholesky_inverse_kernel<T, kD>
        <<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(L, Ainv, n, d);
  });
  return cudaGetLastError();
}

template <typename T>
int outer_ema_batched(T* F, const T* G, int64_t n, int d, int S, T beta,
                      void* stream) {
  if (n == 0) return cudaSuccess;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    outer_ema_kernel<T, kD>
        <<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(F, G, n, d, S, beta);
  });
  return cudaGetLastError();
}

#define MBF_INSTANTIATE(T)                                                   \
  template int cholesky_batched<T>(const T*, T*, int32_t*, int64_t, int, T,  \
                                   void*);                                   \
  template int cholesky_solve_batched<T>(const T*, T*, int64_t, int, int,    \
                                         void*);                             \
  template int cholesky_inverse_batched<T>(const T*, T*, int64_t, int,       \
                                           void*);                           \
  template int outer_ema_batched<T>(T*, const T*, int64_t, int, int, T,      \
                                    void*);

MBF_INSTANTIATE(float)
MBF_INSTANTIATE(double)
#undef MBF_INSTANTIATE

}  // namespace cuda
}  // namespace mbf
