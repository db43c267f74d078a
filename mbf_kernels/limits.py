"""Backend limits and environment facts: a leaf module, so that the dispatcher, the Triton
kernels and their compile check read them without importing each other."""

from __future__ import annotations

import os
import re

#: Largest block size of the Triton kernels. They unroll everything over d at compile time, and
#: Triton's compile time grows faster than d^3: at d = 16 a kernel compiles in at most ~15 s
#: (sm_90, the dev VM), at d = 25 the refactor kernel takes 106 s and at d = 27 the dense
#: inverse 190 s, per dtype and tile config (`python -m mbf_kernels.triton.compile_check`).
#: Larger blocks go to the CUDA kernels, compiled ahead of time.
TRITON_MAX_D = 16
#: Largest block size of the CUDA kernels' fused step and compact ops (their generic path keeps
#: vectors in local arrays of this size: csrc/include/mbf/compact_block.h kMaxGenericDim).
CUDA_STEP_MAX_D = 64


#: Oldest Triton whose CPU interpreter runs these kernels (measured with 3.6 to 3.9, the
#: kernels' tests in the interpreter): 3.6 and 3.7's autotuner benchmarks even a single config,
#: which asks for a GPU driver the interpreter lacks, and 3.6 hands a scalar argument to
#: `range()` as a one-element array, which numpy 2 refuses to convert. Compiled for a GPU
#: (`python -m mbf_kernels.triton.compile_check`), 3.6 takes every kernel.
TRITON_INTERPRETER_MIN = (3, 8)


def version_tuple(version: str) -> tuple[int, ...]:
    """The release numbers a version string starts with: "3.6.0+git1" -> (3, 6, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def triton_interpreted() -> bool:
    """Whether Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


#: Set to 0 to run every Triton kernel with its first tile config instead of tuning (the
#: correctness tests on a GPU: tuning compiles each kernel once per config, minutes in all).
TRITON_AUTOTUNE_ENV = "MBF_TRITON_AUTOTUNE"


def triton_autotune() -> bool:
    """Whether the Triton kernels tune their tiles (off in the interpreter, or when
    MBF_TRITON_AUTOTUNE=0)."""
    return not triton_interpreted() and os.environ.get(TRITON_AUTOTUNE_ENV, "1") != "0"
