// Short names for the SIMD-across-blocks types, and small helpers shared by the CPU kernel
// files.
#pragma once

#include <cstdint>

#include "mbf/lanes.h"

namespace mbf {
namespace cpu {

template <typename T>
using Ln = lanes::Lanes<T>;
template <typename T>
using V = typename Ln<T>::V;  // one value per block (lane)
template <typename T>
using M = typename Ln<T>::M;  // one mask / integer per block (lane)
using lanes::tri_index;

// Prefetch [p, p + bytes) for reading, one request per 64-byte line. The kernels call it for
// the next tile, so that its memory traffic overlaps the current tile's arithmetic instead
// of alternating with it (10-15% on the dev VM).
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 0);
}

}  // namespace cpu
}  // namespace mbf
