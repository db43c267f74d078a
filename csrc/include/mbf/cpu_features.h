// What each CPU ISA level of the kernels needs from the CPU (and its OS), torch-free: the one
// check behind the extension's choice of level (cpu/dispatch.cpp) and ctest's skips.
#pragma once

#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

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

// Whether this is an AMD CPU of family 25 (0x19: Zen 3 and Zen 4). Zen 4 runs AVX-512 on 256-bit
// units, so a 512-bit kernel gains no arithmetic over an AVX2 one there (ops.cpp's choice of
// GEMM library follows from it).
inline bool amd_family_25() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  // "AuthenticAMD" in ebx, edx, ecx
  const bool amd = ebx == 0x68747541u && edx == 0x69746e65u && ecx == 0x444d4163u;
  if (!amd || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const unsigned family = ((eax >> 8) & 0xf) + ((eax >> 20) & 0xff);
  return family == 0x19;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace mbf
