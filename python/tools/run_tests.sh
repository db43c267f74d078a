#!/usr/bin/env bash
# Run every test: the torch-free C++ build and its unit tests under CMake/ctest (which also
# compiles the CUDA kernels with nvcc when nvcc exists), then the Python suite with pytest.
# Expects the environment made by python/tools/bootstrap.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
venv="${MBF_VENV:-.venv}"
export PATH="$PWD/$venv/bin:$PATH"  # ninja (and cmake, if pip had to provide it)

echo "== C++: CMake build + ctest (CUDA compile: $(command -v nvcc >/dev/null && echo yes || echo 'no nvcc'))"
torch_include=$("$venv/bin/python" -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])')
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DMBF_TORCH_INCLUDE="$torch_include" >/dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure

echo "== Python: pytest"
"$venv/bin/python" -m pytest -q "$@"
