// The CUDA fused step and compact ops (step_kernels.cuh) for float32 state.
#include "step_kernels.cuh"

namespace mbf {
namespace cuda {

MBF_INSTANTIATE_STEP_KERNELS(float)

}  // namespace cuda
}  // namespace mbf
