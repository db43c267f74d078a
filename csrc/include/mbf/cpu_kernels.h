// The CPU kernels of one ISA level as a table of function pointers: runtime CPU dispatch.
//
// The torch-free CPU kernels (cpu/block_kernels.cpp, cpu/step_kernels.cpp) are compiled once
// per ISA level, each build with its own -m flags into a library of its own (setup.py: the
// extension modules mbf_kernels._cpu_<isa>; CMakeLists.txt: mbf_cpu_<isa>), which exports one
// symbol, mbf_cpu_kernels(), returning this table. The extension picks a level at run time
// from the CPU's features (csrc/cpu/dispatch.cpp), as ATen's CPU capability dispatch does, so a
// build made on one x86-64 host runs on any other; MBF_CPU_CAPABILITY forces a lower level.
//
// Why whole libraries rather than one library with per-ISA translation units: inline functions
// (std:: templates, our headers) instantiated under different -m flags are merged by the
// linker, which may keep an AVX-512 copy for every caller. Each level's library keeps its
// symbols hidden and is loaded RTLD_LOCAL, so nothing compiled for one level leaks into another.
#pragma once

#include <cstdint>
#include <type_traits>

#include "mbf/batched.h"

namespace mbf {
namespace cpu {

// Bumped whenever the table or the signatures change: a stale library is refused.
inline constexpr int kCpuKernelsVersion = 10;

template <typename T>
struct KernelTable {
  void (*cholesky_batched)(const T*, T*, int32_t*, int64_t, int64_t, int, T);
  void (*cholesky_solve_batched)(const T*, const T*, T*, int64_t, int64_t, int, int, bool);
  void (*solve_spd_batched)(const T*, const T*, T*, int32_t*, int64_t, int64_t, int, int, T);
  void (*inv_spd_batched)(const T*, T*, int32_t*, int64_t, int64_t, int, T);
  void (*outer_ema_batched)(T*, const T*, int64_t, int64_t, int, int, T);
  StepStats (*mbf_step_tiles)(T*, const T*, T*, T*, T*, int64_t, int, int64_t, int64_t,
                              const StepConfig&, const StepFlags&);
  StepStats (*mbf_bucket_step_tiles)(const StepSegment<T>*, int, T*, T*, int, int64_t, int64_t,
                                     const StepConfig&, const StepTiles<T>&);
  void (*compact_outer_ema_tiles)(T*, const T*, int64_t, int, int64_t, int64_t, T);
  void (*compact_cholesky_tiles)(const T*, T*, int32_t*, int64_t, int, int64_t, int64_t, T);
  void (*compact_solve_tiles)(const T*, const T*, T*, int64_t, int, int64_t, int64_t);
  void (*graft_rows)(T*, T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, T, T, T,
                     T*, T*, int64_t);
  void (*project_rows)(const T*, int64_t, int64_t, int64_t, const T*, int64_t, T*);
  void (*scaled_add_rows)(T*, int64_t, const T*, int64_t, const T*, int64_t, const T*, int64_t,
                          int64_t, int64_t, int64_t, T, T);
  T (*sketch_rows)(const T*, const T*, int64_t, int64_t, int64_t, const T*, int64_t, int64_t, T*,
                   T*);
};

struct CpuKernels {
  int version;
  const char* isa;     // "scalar", "avx2", "avx512" (x86-64) or "default" (other machines)
  int vector_bytes;    // the SIMD width the level's kernels use (lanes.h kVectorBytes)
  KernelTable<float> f32;
  KernelTable<double> f64;
  // The float32 bucket step with its factor stored in bfloat16 (factor_dtype="bfloat16").
  StepStats (*f32_bucket_step_bf16)(const StepSegment<float>*, int, float*, Bf16*, int, int64_t,
                                    int64_t, const StepConfig&, const StepTiles<float>&);
  // ... with its factor as a unit factor in int8 (factor_dtype="int8", UnitI8).
  StepStats (*f32_bucket_step_unit_i8)(const StepSegment<float>*, int, float*, UnitI8*, int,
                                       int64_t, int64_t, const StepConfig&,
                                       const StepTiles<float>&);

  template <typename T>
  const KernelTable<T>& of() const {
    if constexpr (std::is_same_v<T, float>) return f32;
    else return f64;
  }
};

// The table of the kernels in the calling library (cpu/kernel_table.cpp).
const CpuKernels& kernels_of_this_build();

}  // namespace cpu
}  // namespace mbf

// Exported by each ISA level's library.
extern "C" const mbf::cpu::CpuKernels* mbf_cpu_kernels();
