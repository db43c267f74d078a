// The kernel table of this build of the CPU kernels (mbf/cpu_kernels.h), compiled into each
// ISA level's library with that level's flags; MBF_CPU_ISA names the level.
#include "mbf/cpu_kernels.h"
#include "mbf/lanes.h"

#ifndef MBF_CPU_ISA
#define MBF_CPU_ISA "default"
#endif

namespace mbf {
namespace cpu {
namespace {

template <typename T>
constexpr KernelTable<T> table() {
  return {&cholesky_batched<T>,        &cholesky_solve_batched<T>, &solve_spd_batched<T>,
          &inv_spd_batched<T>,         &outer_ema_batched<T>,      &mbf_step_tiles<T>,
          &mbf_bucket_step_tiles<T>,   &compact_outer_ema_tiles<T>,
          &compact_cholesky_tiles<T>,  &compact_solve_tiles<T>,
          &graft_rows<T>,              &project_rows<T>,
          &scaled_add_rows<T>,         &sketch_rows<T>};
}

const CpuKernels kKernels{kCpuKernelsVersion, MBF_CPU_ISA, lanes::kVectorBytes, table<float>(),
                          table<double>(), &mbf_bucket_step_tiles<float, Bf16>,
                          &mbf_bucket_step_tiles<float, UnitI8>};

}  // namespace

const CpuKernels& kernels_of_this_build() { return kKernels; }

}  // namespace cpu
}  // namespace mbf

extern "C" __attribute__((visibility("default"))) const mbf::cpu::CpuKernels* mbf_cpu_kernels() {
  return &mbf::cpu::kKernels;
}
