// Batched entry points over contiguous arrays of blocks, torch-free.
//
// Each CPU function processes blocks [begin, end) of a batch so that the
// caller chooses the parallel split (at::parallel_for in the extension, a
// plain loop in the unit tests). Layouts, for N blocks of size d:
//   A, L, Ainv, F : N x d x d, row-major, contiguous
//   B (right-hand sides), X (solutions) : N x d x k; X may alias B
//   G : N x S x d (S vectors per block)
//   info : N int32, 0 on success, else the failing leading-minor order
//
// The CUDA launchers take whole batches and a stream; they are declared only
// when compiling with a CUDA-aware compiler or with MBF_WITH_CUDA defined.
#pragma once

#include <cstdint>

namespace mbf {
namespace cpu {

template <typename T>
void cholesky_batched(const T* A, T* L, int32_t* info, int64_t begin,
                      int64_t end, int d, T damping);

template <typename T>
void cholesky_solve_batched(const T* L, const T* B, T* X, int64_t begin,
                            int64_t end, int d, int k);

// Fused factor + solve of (A + damping I) X = B; blocks whose factorisation
// fails get X = 0 and a non-zero info.
template <typename T>
void solve_spd_batched(const T* A, const T* B, T* X, int32_t* info,
                       int64_t begin, int64_t end, int d, int k, T damping);

// (A + damping I)^{-1}; blocks whose factorisation fails get Ainv = 0.
template <typename T>
void inv_spd_batched(const T* A, T* Ainv, int32_t* info, int64_t begin,
                     int64_t end, int d, T damping);

template <typename T>
void outer_ema_batched(T* F, const T* G, int64_t begin, int64_t end, int d,
                       int S, T beta);

}  // namespace cpu

#if defined(__CUDACC__) || defined(MBF_WITH_CUDA)
namespace cuda {

// `stream` is a cudaStream_t passed as void* so that this header needs no
// CUDA include; every launcher returns the cudaError_t of its launch as int.
template <typename T>
int cholesky_batched(const T* A, T* L, int32_t* info, int64_t n, int d,
                     T damping, void* stream);
template <typename T>
int cholesky_solve_batched(const T* L, T* X, int64_t n, int d, int k,
                           void* stream);
// (L L^T)^{-1} from a factor; the fused solve/inverse ops are composed from
// these by the caller, which owns the factor buffer.
template <typename T>
int cholesky_inverse_batched(const T* L, T* Ainv, int64_t n, int d,
                             void* stream);
template <typename T>
int outer_ema_batched(T* F, const T* G, int64_t n, int d, int S, T beta,
                      void* stream);

}  // namespace cuda
#endif

}  // namespace mbf
