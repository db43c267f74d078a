// Runtime choice of the CPU kernels' ISA level (mbf/cpu_kernels.h), in the torch extension.
#pragma once

#include <string>
#include <vector>

#include "mbf/cpu_kernels.h"

namespace mbf {
namespace cpu {

// The active level's kernels. Raises (TORCH_CHECK) if none was loaded.
const CpuKernels& kernels();

// The ISA levels this build knows, lowest first ("scalar", "avx2", "avx512" on x86-64).
std::vector<std::string> known_levels();
// Those this CPU (and its OS) can run.
std::vector<std::string> supported_levels();

// Load the level `requested` ("" for the best this CPU supports) from the libraries
// _cpu_<level>*.so in `dir` and make it active; returns its name. Raises, naming the problem,
// for an unknown level, one this CPU cannot run, or a library that is missing or stale.
std::string use_level(const std::string& dir, const std::string& requested);

}  // namespace cpu
}  // namespace mbf
