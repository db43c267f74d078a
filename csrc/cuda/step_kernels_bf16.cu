// The CUDA fused step and compact ops (step_kernels.cuh) for float32 state with a bfloat16 factor (factor_dtype; the bucket step only).
#include "step_kernels.cuh"

namespace mbf {
namespace cuda {

template int bucket_step<float, Bf16>(const StepSegment<float>*, const int64_t*, int, int64_t,
                                      float*, Bf16*, int, const StepConfig&,
                                      const StepTiles<float>&, unsigned long long*, void*);

}  // namespace cuda
}  // namespace mbf
