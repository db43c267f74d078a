// Launch helpers shared by the CUDA kernel files (torch-free).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mbf {
namespace cuda {

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// CUDA blocks of `threads` threads covering n items, one per thread.
inline unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

}  // namespace cuda
}  // namespace mbf
