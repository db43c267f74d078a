// CUDA kernels of the fused MBF bucket step and of its phases on the compact layout: one thread
// per block running the per-block code of mbf/compact_block.h (the same code the C++ unit tests
// run on the host), hot sizes as template parameters, the generic path up to kMaxGenericDim.
// Consecutive threads own consecutive blocks, so every compact state access of a warp is two
// 64-byte rows. Torch-free (launchers take a raw stream): the CMake build compiles the files
// that include this with plain nvcc on machines without a GPU or a CUDA build of torch.
//
// The templates live here and each step_kernels_*.cu instantiates one storage type: nvcc took
// 50-80 s over all three in one file, the critical path of the extension's parallel build.
#pragma once

#include <cuda_runtime.h>

#include "launch.cuh"
#include "mbf/batched.h"
#include "mbf/compact_block.h"

namespace mbf {
namespace cuda {
namespace {

// The segment served by CUDA block `cta`: the last s with first_cta[s] <= cta.
__device__ __forceinline__ int find_segment(const int64_t* __restrict__ first_cta,
                                            int n_segments, int64_t cta) {
  int lo = 0, hi = n_segments - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_cta[mid] <= cta) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ BlockVector<T> block_vector(T* main, T* tail, int64_t b,
                                                       int64_t row_stride, int width) {
  return {main + b * row_stride, tail != nullptr ? tail + b : nullptr, width};
}

template <typename T, int D, typename FT>
__global__ void __launch_bounds__(kStepThreads)
    bucket_step_kernel(const StepSegment<T>* __restrict__ segments,
                       const int64_t* __restrict__ first_cta, int n_segments, T* F, FT* L, int d,
                       StepScalars<T> c, StepTiles<T> tiles, unsigned long long* stats) {
  const int64_t cta = blockIdx.x;
  const int s = find_segment(first_cta, n_segments, cta);
  const StepSegment<T> seg = segments[s];
  const int64_t b = (cta - first_cta[s]) * kStepThreads + threadIdx.x;
  BlockCounts counts;
  if (b < seg.n_blocks) {
    const int64_t state_block = seg.tile_offset * kCompactTile + b;
    const int64_t tile = state_block / kCompactTile;
    const BlockExtras<T> ex{
        tiles.damping != nullptr ? tiles.damping[tile] : c.damping,
        block_vector<T>(seg.v, seg.v_tail, b, seg.row_stride, seg.width), seg.graft_c1,
        seg.graft_s2, tiles.scale != nullptr ? tiles.scale[tile] : T(1),
        tiles.norms != nullptr ? tiles.norms + tile * 2 * kCompactTile + state_block % kCompactTile
                               : nullptr,
        compact_vector<T>(tiles.directions, state_block, d),
        tiles.block_v != nullptr ? tiles.block_v + state_block : nullptr};
    counts = step_block<T, D, FT>(
        block_vector<T>(seg.p, seg.p_tail, b, seg.row_stride, seg.width),
        block_vector<const T>(seg.g, seg.g_tail, b, seg.row_stride, seg.width),
        block_vector<T>(seg.m, seg.m_tail, b, seg.row_stride, seg.width),
        compact_entries<T>(F, state_block, d), compact_entries<FT>(L, state_block, d), d, c,
        seg.flags.update_curvature, seg.flags.first_curvature, seg.flags.refactor, ex);
  } else if (c.graft && (!c.write || c.lagged) && b < ((seg.n_blocks + kCompactTile - 1) /
                                                       kCompactTile) * kCompactTile) {
    // Padding blocks of the segment's last tile: zero norms, as on the other backends.
    const int64_t state_block = seg.tile_offset * kCompactTile + b;
    T* out = tiles.norms + (state_block / kCompactTile) * 2 * kCompactTile +
             state_block % kCompactTile;
    out[0] = T(0);
    out[kCompactTile] = T(0);
  }
  // One atomic per CUDA block, and only when something happened (the common case is none).
  const int skipped = __syncthreads_count(counts.skipped_curvature);
  const int failed = __syncthreads_count(counts.failed_factor);
  if (threadIdx.x == 0) {
    if (skipped) atomicAdd(stats, static_cast<unsigned long long>(skipped));
    if (failed) atomicAdd(stats + 1, static_cast<unsigned long long>(failed));
  }
}

template <typename T, int D>
__global__ void compact_outer_ema_kernel(T* F, const T* __restrict__ G, int64_t n, int d,
                                         T beta) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n) return;
  compact_outer_ema_block<T, D>(compact_entries<T>(F, b, d), G + b * d, d, beta);
}

template <typename T, int D>
__global__ void compact_cholesky_kernel(const T* __restrict__ F, T* L, int32_t* info, int64_t n,
                                        int d, T damping) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n) return;
  info[b] = compact_cholesky_block<T, D>(compact_entries<const T>(F, b, d),
                                         compact_entries<T>(L, b, d), d, damping);
}

template <typename T, int D>
__global__ void compact_solve_kernel(const T* __restrict__ L, const T* __restrict__ B, T* X,
                                     int64_t n, int d) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n) return;
  compact_solve_block<T, D>(compact_entries<const T>(L, b, d), B + b * d, X + b * d,
                            d);
}

// The generic path holds vectors in arrays of kMaxGenericDim.
inline bool supported(int d) { return d >= 1 && d <= kMaxGenericDim; }

}  // namespace

template <typename T, typename FT>
int bucket_step(const StepSegment<T>* segments, const int64_t* first_cta, int n_segments,
                int64_t n_ctas, T* F, FT* factor, int d, const StepConfig& cfg,
                const StepTiles<T>& tiles, unsigned long long* stats, void* stream) {
  if (n_ctas == 0) return cudaSuccess;
  if (!supported(d) || n_segments < 1) return cudaErrorInvalidValue;
  const StepScalars<T> c = step_scalars<T>(cfg);
  bool launched = false;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    if constexpr (kD > 0 || std::is_same_v<FT, T>) {  // a bfloat16 factor: hot sizes only
      bucket_step_kernel<T, kD, FT><<<static_cast<unsigned>(n_ctas), kStepThreads, 0,
                                      as_stream(stream)>>>(segments, first_cta, n_segments, F,
                                                           factor, d, c, tiles, stats);
      launched = true;
    }
  });
  return launched ? cudaGetLastError() : cudaErrorInvalidValue;
}

template <typename T>
int compact_outer_ema(T* F, const T* G, int64_t n, int d, T beta, void* stream) {
  if (n == 0) return cudaSuccess;
  if (!supported(d)) return cudaErrorInvalidValue;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    compact_outer_ema_kernel<T, kD>
        <<<grid_for(n, kStepThreads), kStepThreads, 0, as_stream(stream)>>>(F, G, n, d, beta);
  });
  return cudaGetLastError();
}

template <typename T>
int compact_cholesky(const T* F, T* factor, int32_t* info, int64_t n, int d, T damping,
                     void* stream) {
  if (n == 0) return cudaSuccess;
  if (!supported(d)) return cudaErrorInvalidValue;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    compact_cholesky_kernel<T, kD><<<grid_for(n, kStepThreads), kStepThreads, 0,
                                     as_stream(stream)>>>(F, factor, info, n, d, damping);
  });
  return cudaGetLastError();
}

template <typename T>
int compact_solve(const T* factor, const T* B, T* X, int64_t n, int d, void* stream) {
  if (n == 0) return cudaSuccess;
  if (!supported(d)) return cudaErrorInvalidValue;
  MBF_DISPATCH_BLOCK_DIM(d, [&] {
    compact_solve_kernel<T, kD>
        <<<grid_for(n, kStepThreads), kStepThreads, 0, as_stream(stream)>>>(factor, B, X, n, d);
  });
  return cudaGetLastError();
}

// Explicit instantiations of the launchers for one storage type T (one step_kernels_*.cu each).
#define MBF_INSTANTIATE_STEP_KERNELS(T)                                                       \
  template int bucket_step<T, T>(const StepSegment<T>*, const int64_t*, int, int64_t, T*, T*, int, \
                              const StepConfig&, const StepTiles<T>&, unsigned long long*,    \
                              void*);                                                         \
  template int compact_outer_ema<T>(T*, const T*, int64_t, int, T, void*);                     \
  template int compact_cholesky<T>(const T*, T*, int32_t*, int64_t, int, T, void*);            \
  template int compact_solve<T>(const T*, const T*, T*, int64_t, int, void*);

}  // namespace cuda
}  // namespace mbf
