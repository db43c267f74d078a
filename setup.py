"""Build of the compiled extension ``mbf_kernels._C`` (package metadata is in pyproject.toml).

The C++ CPU kernels are always built; the CUDA kernels only when torch is a CUDA build and
nvcc is found. Build against the torch you run with, so install without build isolation:

    pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test]"

Environment switches (all optional):

  MBF_NO_EXTENSION=1    skip the compiled extension: a pure-Python install that runs every op
                        through the torch reference backend.
  MBF_CUDA=auto|1|0     CUDA kernels: auto (default) builds them when torch has CUDA and nvcc
                        exists; 1 requires them (the build fails if impossible); 0 skips them.
  MBF_CUDA_ARCHS=...    compute capabilities for nvcc, e.g. "8.0;9.0" (sets TORCH_CUDA_ARCH_LIST;
                        default "8.0;9.0").
  MBF_CPU_ARCH=native   value for -march (default "native": the fast build for this machine;
                        set it to "" for a portable build, e.g. x86-64-v3).
  MBF_DEBUG=1           -O0 -g instead of -O3.
  MAX_JOBS=N            parallel compile jobs (torch's ninja builder reads it).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _flag(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _log(msg: str) -> None:
    print(f"mbf_kernels setup: {msg}", file=sys.stderr)


def _extensions():
    if _flag("MBF_NO_EXTENSION") == "1":
        _log("MBF_NO_EXTENSION=1: building without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # An isolated build environment has no torch; building one in would download a
        # multi-GB CUDA wheel, so install pure-Python and let the import-time warning say so.
        _log("torch is not importable here: building WITHOUT the compiled extension. "
             "Install torch first and use `pip install --no-build-isolation`.")
        return [], {}

    cuda_mode = _flag("MBF_CUDA", "auto").lower()
    if cuda_mode not in {"auto", "1", "0"}:
        raise SystemExit(f"MBF_CUDA must be auto, 1 or 0, got {cuda_mode!r}")
    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    cuda_possible = torch.version.cuda is not None and has_nvcc
    if cuda_mode == "1" and not cuda_possible:
        raise SystemExit(
            "MBF_CUDA=1 but the CUDA kernels cannot be built: "
            + ("torch is a CPU build" if torch.version.cuda is None else "nvcc not found")
        )
    with_cuda = cuda_possible and cuda_mode != "0"

    debug = _flag("MBF_DEBUG") == "1"
    march = _flag("MBF_CPU_ARCH", "native")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-math-errno: lets sqrt compile to one vector instruction (we never read errno).
    cxx = [*opt, "-fopenmp", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if march:
        cxx.append(f"-march={march}")
    sources = [
        "csrc/registration.cpp",
        "csrc/cpu/ops.cpp",
        "csrc/cpu/block_kernels.cpp",
        "csrc/cpu/step_kernels.cpp",
    ]
    include_dirs = [str(CSRC / "include")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _flag("MBF_CUDA_ARCHS", "8.0;9.0"))
        sources += ["csrc/cuda/ops.cu", "csrc/cuda/block_kernels.cu", "csrc/cuda/step_kernels.cu"]
        ext = CUDAExtension(
            "mbf_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("MBF_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": [*opt, "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "mbf_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    _log(f"building mbf_kernels._C (CUDA: {'yes' if with_cuda else 'no'}, -march={march or 'default'})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
