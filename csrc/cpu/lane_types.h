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

// How many tiles ahead the kernels prefetch their streams: far enough that a tile's lines
// arrive while the tiles before it are computed (about a DRAM latency of work per tile at
// d = 9), near enough that they are still in L2 when used.
inline constexpr int64_t kPrefetchTiles = 4;

// Prefetch [p, p + bytes) for reading into L2 (prefetcht1), one request per 64-byte line, so
// that a stream's memory traffic overlaps the arithmetic of the tiles before it instead of
// alternating with it. Measured on Zen 4 (bench/RESULTS.md, sixteenth session): the cached
// d = 9 step from DRAM took 25-27 ns per block on one thread with the old prefetchnta of the
// next tile and 10-16 with prefetcht1 four tiles ahead; prefetcht0 was as slow as prefetchnta.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

// A tile's prefetch spread over its arithmetic: issue(k) sends the next k of its 64-byte lines.
// A whole tile's lines sent at once, as prefetch_bytes does, fill the core's miss buffers, and
// the loads behind them wait: the dense d = 9 solve from DRAM then took the sum of its memory
// and arithmetic time, 35-39 ns per block on one thread, and 25-26 with the same lines issued
// nine at a time at the factorisation's nine columns (Zen 4, bench/RESULTS.md).
struct SpreadPrefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  void start(const void* p, int64_t bytes) {
    next = static_cast<const char*>(p);
    end = next + bytes;
  }
  int64_t lines() const { return (end - next + 63) / 64; }
  void issue(int64_t k) {
    for (; k > 0 && next < end; --k, next += 64) __builtin_prefetch(next, 0, 2);
  }
  void rest() { issue(lines()); }
};

}  // namespace cpu
}  // namespace mbf
