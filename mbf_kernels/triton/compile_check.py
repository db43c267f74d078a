"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, without a GPU.

Triton's interpreter (how CI runs the kernels on CPU tensors) executes the Python body and never
meets the compiler, so a kernel can pass every interpreted test and still fail to compile (a
non-constexpr global, a reassigned constexpr), or compile into something that spills. This
module runs Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the ptxas that
Triton ships) for a chosen ``sm_XX`` target and reads the cubin's resource usage, so both are
checked on any machine::

    python -m mbf_kernels.triton.compile_check --d 9 16 --arch 90      # a table of every kernel

It needs Triton's compiler, so TRITON_INTERPRET must not be set (under the interpreter,
``triton.jit`` gives interpreted functions that carry nothing to compile).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..limits import triton_interpreted
from . import compact, linalg, step
from ._common import CONFIGS

#: The step kernels' variants worth compiling: flags (constexpr name -> value).
VARIANTS = {
    "_bucket_step_kernel": {
        "cached factor": dict(DECOUPLED=False, UPDATE_CURVATURE=False, FIRST_CURVATURE=False,
                              WRITE=True, GRAFT=False, LAGGED=False, BLOCK_V=False),
        "first refresh": dict(DECOUPLED=False, UPDATE_CURVATURE=True, FIRST_CURVATURE=True,
                              WRITE=True, GRAFT=False, LAGGED=False, BLOCK_V=False),
        "refresh, decoupled": dict(DECOUPLED=True, UPDATE_CURVATURE=True, FIRST_CURVATURE=False,
                                   WRITE=True, GRAFT=False, LAGGED=False, BLOCK_V=False),
        "graft measure": dict(DECOUPLED=False, UPDATE_CURVATURE=True, FIRST_CURVATURE=False,
                              WRITE=False, GRAFT=True, LAGGED=False, BLOCK_V=False),
        "graft write": dict(DECOUPLED=True, UPDATE_CURVATURE=False, FIRST_CURVATURE=False,
                            WRITE=True, GRAFT=True, LAGGED=False, BLOCK_V=False),
        "graft measure, bf16 factor": dict(DECOUPLED=True, UPDATE_CURVATURE=False,
                                           FIRST_CURVATURE=False, WRITE=False, GRAFT=True,
                                           LAGGED=False, BLOCK_V=False, _pointers={"L": "*bf16"}),
        "graft lagged, bf16 factor": dict(DECOUPLED=True, UPDATE_CURVATURE=False,
                                          FIRST_CURVATURE=False, WRITE=True, GRAFT=True,
                                          LAGGED=True, BLOCK_V=False, _pointers={"L": "*bf16"}),
        "graft lagged, bf16 factor, v per block": dict(
            DECOUPLED=True, UPDATE_CURVATURE=False, FIRST_CURVATURE=False, WRITE=True,
            GRAFT=True, LAGGED=True, BLOCK_V=True, _pointers={"L": "*bf16"}),
    },
    "_bucket_refactor_kernel": {
        "refresh + refactor": dict(UPDATE_CURVATURE=True, FIRST_CURVATURE=False,
                                   TILE_DAMPING=False, BF16_FACTOR=False),
        "refactor only": dict(UPDATE_CURVATURE=False, FIRST_CURVATURE=False, TILE_DAMPING=False,
                              BF16_FACTOR=False),
        "relative damping": dict(UPDATE_CURVATURE=False, FIRST_CURVATURE=False,
                                 TILE_DAMPING=True, BF16_FACTOR=False),
        "relative damping, bf16 factor": dict(UPDATE_CURVATURE=False, FIRST_CURVATURE=False,
                                              TILE_DAMPING=True, BF16_FACTOR=True,
                                              _pointers={"L": "*bf16"}),
    },
}
#: Every kernel, by name, in its op family's module.
_FAMILIES = {
    linalg: ("_dense_cholesky_kernel", "_dense_cholesky_solve_kernel", "_dense_solve_spd_kernel",
             "_dense_inv_spd_kernel", "_dense_outer_ema_kernel"),
    compact: ("_compact_outer_ema_kernel", "_compact_cholesky_kernel", "_compact_solve_kernel"),
    step: ("_bucket_refactor_kernel", "_bucket_step_kernel"),
}
_MODULE_OF = {name: module for module, names in _FAMILIES.items() for name in names}
KERNELS = tuple(_MODULE_OF)

_FIXED_POINTERS = {"info_ptr": "*i32", "table": "*i64", "stats": "*i64", "hyper": "*fp64"}
_INTS = {"n", "k", "S", "NBIN", "n_seg"}
_FLOAT64 = {"damping", "beta"}


@dataclass
class Compiled:
    kernel: str
    variant: str
    d: int
    dtype: str
    arch: int
    block: int
    num_warps: int
    seconds: float
    registers: int
    stack_bytes: int  # per-thread stack frame: register spills and local arrays


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through the Autotuner
    return kernel


def _signature(fn, dtype: str, constexprs: dict, pointers: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in pointers:  # a variant's own pointer types (a bfloat16 factor)
            sig[name] = pointers[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name in _FIXED_POINTERS:
            sig[name] = _FIXED_POINTERS[name]
        elif name in _INTS:
            sig[name] = "i32"
        elif name in _FLOAT64:
            sig[name] = "fp64"
        else:
            sig[name] = f"*{dtype}"
    return sig


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes per thread) of the cubin's kernel, read with Triton's cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


def compile_kernel(name: str, d: int, *, dtype: str = "fp32", arch: int = 90,
                   variant: str = "", block: int | None = None,
                   num_warps: int | None = None) -> Compiled:
    """Compile one kernel for ``sm_{arch}`` and report what the cubin uses."""
    fn = _jit_function(getattr(_MODULE_OF[name], name))
    cfg_block, cfg_warps = CONFIGS[0]
    block, num_warps = block or cfg_block, num_warps or cfg_warps
    constexprs = dict(D=d, BLOCK=block, **(VARIANTS[name][variant] if variant else {}))
    pointers = constexprs.pop("_pointers", {})
    if pointers and dtype != "fp32":
        raise ValueError(f"{name} {variant!r}: a bfloat16 factor goes with float32 state only")
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs, pointers),
                  constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 1})
    seconds = time.perf_counter() - start
    regs, stack = _resource_usage(compiled.asm["cubin"])
    return Compiled(name, variant, d, dtype, arch, block, num_warps, seconds, regs, stack)


def variants(name: str, dtype: str = "fp32") -> list[str]:
    """The kernel's variants that compile for ``dtype`` (a bfloat16 factor: float32 only)."""
    return [v for v, flags in VARIANTS.get(name, {"": {}}).items()
            if dtype == "fp32" or "_pointers" not in flags]


def _parse_case(text: str) -> dict:
    """``kernel:d:dtype:arch[:variant]``, e.g. ``_bucket_step_kernel:9:fp32:90:cached factor``."""
    name, d, dtype, arch, *variant = text.split(":")
    return dict(name=name, d=int(d), dtype=dtype, arch=int(arch), variant=":".join(variant))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[9])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "fp64"])
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--case", action="append", type=_parse_case, default=[],
                        help="kernel:d:dtype:arch[:variant] instead of the grid above; repeatable")
    parser.add_argument("--json", type=Path, help="also write the results (or errors) here")
    args = parser.parse_args(argv)
    if triton_interpreted():
        parser.error("TRITON_INTERPRET=1 is set: unset it to run Triton's compiler")
    cases = args.case or [dict(name=name, d=d, dtype=dtype, arch=arch, variant=variant)
                          for arch in args.arch for dtype in args.dtype for d in args.d
                          for name in args.kernel for variant in variants(name, dtype)]
    print("| kernel | variant | d | dtype | sm | BLOCK x warps | compile s | registers | "
          "stack bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for case in cases:
        try:
            c = compile_kernel(case["name"], case["d"], dtype=case["dtype"], arch=case["arch"],
                               variant=case["variant"])
        except Exception as exc:  # reported per case, so that one failure hides no other
            results.append(dict(case, error=f"{type(exc).__name__}: {exc}"))
            print(f"| {case['name']} | {case['variant'] or '-'} | {case['d']} | {case['dtype']} "
                  f"| {case['arch']} | FAILED: {type(exc).__name__} | | | |", flush=True)
            continue
        results.append(dict(case, **asdict(c)))
        print(f"| {c.kernel} | {c.variant or '-'} | {c.d} | {c.dtype} | {c.arch} | "
              f"{c.block} x {c.num_warps} | {c.seconds:.1f} | {c.registers} | "
              f"{c.stack_bytes} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return int(any("error" in r for r in results))


if __name__ == "__main__":
    raise SystemExit(main())
