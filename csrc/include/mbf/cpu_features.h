// What each CPU ISA level of the kernels needs from the CPU (and its OS), torch-free: the one
// check behind the extension's choice of level (cpu/dispatch.cpp) and ctest's skips.
#pragma once

#include <string>

namespace mbf {
namespace cpu {

// Whether this CPU runs the kernels of ISA `level` ("scalar", "avx2", "avx512" on x86-64,
// "default" elsewhere; setup.py and CMakeLists.txt hold each level's compiler flags).
inline bool cpu_runs_level(const std::string& level) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (level == "scalar") return true;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (level == "avx2") return avx2;
  if (level == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return false;
#else
  return level == "default";
#endif
}

}  // namespace cpu
}  // namespace mbf
