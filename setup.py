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
  MBF_CPU_LEVELS=...    the CPU kernels' ISA levels to build, comma-separated (default: all of
                        scalar, avx2, avx512 on x86-64; "default" elsewhere). Each level is a
                        library of its own, compiled with its -m flags (csrc/include/mbf/
                        cpu_kernels.h says why), and the extension picks one at run time from
                        the CPU's features (MBF_CPU_CAPABILITY=<level> forces a lower one): no
                        -march=native, so a build runs on any host of its architecture.
  MBF_DEBUG=1           -O0 -g instead of -O3.
  MAX_JOBS=N            parallel compile jobs (torch's ninja builder reads it).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _flag(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _log(msg: str) -> None:
    print(f"mbf_kernels setup: {msg}", file=sys.stderr)


#: The torch-free CPU kernels, compiled once per ISA level into mbf_kernels._cpu_<level>.
CPU_KERNEL_SOURCES = ["csrc/cpu/block_kernels.cpp", "csrc/cpu/step_kernels.cpp",
                      "csrc/cpu/kernel_table.cpp"]
#: Compiler flags of each level (x86-64; "default" is the compiler's baseline elsewhere). The
#: runtime check of each level's CPU features is csrc/include/mbf/cpu_features.h.
X86_LEVELS = {
    "scalar": ["-march=x86-64", "-mtune=generic"],
    "avx2": ["-march=x86-64", "-mavx2", "-mfma", "-mtune=generic"],
    "avx512": ["-march=x86-64", "-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq",
               "-mavx512vl", "-mtune=generic"],
}
CPU_LEVELS = {**X86_LEVELS, "default": []}


def _cpu_levels() -> list[str]:
    known = list(X86_LEVELS) if platform.machine() in ("x86_64", "AMD64") else ["default"]
    wanted = [s.strip() for s in _flag("MBF_CPU_LEVELS").split(",") if s.strip()] or known
    bad = [level for level in wanted if level not in known]
    if bad:
        raise SystemExit(f"MBF_CPU_LEVELS: unknown level(s) {bad} on {platform.machine()}; "
                         f"choose from {', '.join(known)}")
    return wanted


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
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-math-errno: lets sqrt compile to one vector instruction (we never read errno).
    warnings = ["-Wall", "-Wextra", "-Wno-unused-parameter"]
    cxx = [*opt, "-fopenmp", "-fno-math-errno", *warnings]
    sources = [
        "csrc/registration.cpp",
        "csrc/cpu/ops.cpp",
        "csrc/cpu/dispatch.cpp",
    ]
    include_dirs = [str(CSRC / "include")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _flag("MBF_CUDA_ARCHS", "8.0;9.0"))
        sources += ["csrc/cuda/ops.cu", "csrc/cuda/block_kernels.cu"] + [
            f"csrc/cuda/step_kernels_{t}.cu" for t in ("f32", "f64", "bf16")]
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
    levels = _cpu_levels()
    _log(f"building mbf_kernels._C (CUDA: {'yes' if with_cuda else 'no'}) and the CPU kernels "
         f"for {', '.join(levels)}")
    kernels = [Extension(f"mbf_kernels._cpu_{level}", CPU_KERNEL_SOURCES,
                         include_dirs=include_dirs, language="c++",
                         define_macros=[("MBF_CPU_ISA", f'"{level}"')],
                         extra_compile_args={"cxx": [*opt, "-std=c++20", "-fno-math-errno",
                                                     "-fvisibility=hidden", *warnings,
                                                     *CPU_LEVELS[level]]})
               for level in levels]
    return [ext, *kernels], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
