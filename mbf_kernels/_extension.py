"""Loads the compiled extension ``mbf_kernels._C`` defensively and wraps its ops.

The package must import and work on a machine where the extension was not built (or fails to
load): the torch reference backend then serves every call, and a one-line warning says why.
The wrappers below are typed one-liners over ``torch.ops.mbf_kernels.*``; the fake (meta)
implementations let ``torch.compile`` trace them without running them.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .layout import check_bucket_step_fake

#: Set MBF_KERNELS_QUIET=1 to silence the warning when the extension is missing on purpose.
_QUIET_ENV = "MBF_KERNELS_QUIET"

try:
    from . import _C  # type: ignore[attr-defined]  # runs the TORCH_LIBRARY registrations

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not os.environ.get(_QUIET_ENV):
        warnings.warn(
            f"mbf_kernels: compiled kernels unavailable ({LOAD_ERROR}); "
            "using the torch reference backend",
            RuntimeWarning,
            stacklevel=2,
        )

#: Forces the CPU kernels' ISA level (scalar, avx2 or avx512 on x86-64) below the best this CPU
#: runs: one machine then tests every path, and a user can rule out a level.
CPU_CAPABILITY_ENV = "MBF_CPU_CAPABILITY"
_KERNEL_DIR = str(Path(__file__).parent)


def set_cpu_capability(level: str | None = None) -> str:
    """Run the CPU kernels of ISA ``level`` from now on (None: the best this CPU runs); returns
    it. ValueError, naming the problem, for a level this build or this CPU does not have."""
    if _C is None:
        raise RuntimeError(f"mbf_kernels: the compiled extension is not loaded ({LOAD_ERROR})")
    try:
        return _C.use_cpu_level(_KERNEL_DIR, level or "")
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


def cpu_capability() -> str | None:
    """The ISA level of the active CPU kernels (None without the extension)."""
    return _C.cpu_level() if _C is not None else None


if _C is not None:
    try:
        set_cpu_capability(os.environ.get(CPU_CAPABILITY_ENV) or None)
    except ValueError as exc:  # a bad MBF_CPU_CAPABILITY: say so, and run the best level
        warnings.warn(f"{CPU_CAPABILITY_ENV}: {exc}; using the best level this CPU runs",
                      RuntimeWarning, stacklevel=2)
        set_cpu_capability()

AVAILABLE: bool = _C is not None
_BUILD_INFO: dict = dict(_C.build_info()) if _C is not None else {}


def build_info() -> dict:
    """Compiler, CPU ISA levels and CUDA facts of the loaded extension (empty when it is not
    loaded), with the active CPU level and the size from which shared blocks' GEMMs take
    oneDNN."""
    if _C is None:
        return {}
    return dict(_BUILD_INFO, cpu_level=cpu_capability(),
                onednn_gemm_min_flops=onednn_gemm_min_flops(),
                onednn_gemm_min_flops_side_by_side=onednn_gemm_min_flops(side_by_side=True))


def onednn_gemm_min_flops(side_by_side: bool = False) -> float:
    """FLOPs from which the C++ ``apply_inverse_`` runs a shared block's GEMM on oneDNN rather
    than MKL's mm (inf without the extension), on all threads or (``side_by_side``) on one
    beside other blocks' GEMMs. It depends on the CPU (csrc/cpu/ops.cpp): 8 MFLOP where AVX-512
    runs, 1 GFLOP elsewhere and side by side on AMD's family 25 (Zen 3 and 4)."""
    return _C.onednn_gemm_min_flops(side_by_side) if _C is not None else math.inf


def set_onednn_gemm_min_flops(flops: float | None) -> None:
    """Override :func:`onednn_gemm_min_flops` (0: every GEMM on oneDNN, ``math.inf``: none);
    None restores this CPU's default. For tests and measurements: the results agree to float32
    rounding either way."""
    if _C is None:
        raise RuntimeError("mbf_kernels: the C++ extension is not loaded")
    _C.set_onednn_gemm_min_flops(-1.0 if flops is None else float(flops))


def cholesky_ex(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """A: (N, d, d) contiguous -> (L (N, d, d), info (N,) int32)."""
    return torch.ops.mbf_kernels.cholesky_ex.default(A, damping)


def cholesky_solve(B: Tensor, L: Tensor) -> Tensor:
    """B: (N, d, k), L: (N, d, d) -> X: (N, d, k)."""
    return torch.ops.mbf_kernels.cholesky_solve.default(B, L)


def solve_spd_ex(A: Tensor, B: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """A: (N, d, d), B: (N, d, k) -> (X (N, d, k), info (N,) int32)."""
    return torch.ops.mbf_kernels.solve_spd_ex.default(A, B, damping)


def inv_spd_ex(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """A: (N, d, d) -> (Ainv (N, d, d), info (N,) int32)."""
    return torch.ops.mbf_kernels.inv_spd_ex.default(A, damping)


def outer_ema_(F: Tensor, G: Tensor, beta: float) -> None:
    """In place on F: (N, d, d) contiguous; G: (N, S, d)."""
    torch.ops.mbf_kernels.outer_ema_.default(F, G, beta)


def mbf_step_(param: Tensor, grad: Tensor, momentum: Tensor, curvature: Tensor, factor: Tensor,
              stats: Tensor, *, lr: float, momentum_coef: float, beta: float, damping: float,
              weight_decay: float, decoupled_weight_decay: bool, update_curvature: bool,
              first_curvature: bool, refactor: bool) -> None:
    """The fused step: param/grad/momentum (N, d); curvature/factor compact (see layout.py)."""
    torch.ops.mbf_kernels.mbf_step_.default(
        param, grad, momentum, curvature, factor, stats, lr, momentum_coef, beta, damping,
        weight_decay, decoupled_weight_decay, update_curvature, first_curvature, refactor)


def mbf_bucket_step_(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor],
                     curvature: Tensor, factor: Tensor, stats: Tensor, segments: list[int], *,
                     lr: float, momentum_coef: float, beta: float, damping: float,
                     weight_decay: float, decoupled_weight_decay: bool,
                     second_moments: list[Tensor] = (), tile_damping: Tensor | None = None,
                     tile_scale: Tensor | None = None, tile_norms: Tensor | None = None,
                     directions: Tensor | None = None, beta2: float = 0.999, eps: float = 1e-8,
                     mode: int = 1, block_second_moment: Tensor | None = None) -> None:
    """The fused step for a bucket of segments (layout: csrc/registration.cpp; the definition
    of every argument: mbf_kernels.reference.mbf_bucket_step_)."""
    torch.ops.mbf_kernels.mbf_bucket_step_.default(
        params, grads, momenta, curvature, factor, stats, segments, lr, momentum_coef, beta,
        damping, weight_decay, decoupled_weight_decay, list(second_moments), tile_damping,
        tile_scale, tile_norms, directions, beta2, eps, int(mode), block_second_moment)


def compact_outer_ema_(F: Tensor, G: Tensor, beta: float) -> None:
    """F compact (in place), G (N, d): F = beta F + (1 - beta) g g^T."""
    torch.ops.mbf_kernels.compact_outer_ema_.default(F, G, beta)


def compact_cholesky_ex(F: Tensor, n_blocks: int, damping: float) -> tuple[Tensor, Tensor]:
    """F compact -> (factor compact with inverted diagonal, info (N,) int32)."""
    return torch.ops.mbf_kernels.compact_cholesky_ex.default(F, n_blocks, damping)


def compact_solve(factor: Tensor, B: Tensor) -> Tensor:
    """factor compact, B (N, d) -> X (N, d)."""
    return torch.ops.mbf_kernels.compact_solve.default(factor, B)


if AVAILABLE:
    # The fake kernels check what the C++ ops check (csrc/ops_common.h) with torch._check, so
    # that torch.compile rejects a bad call while tracing, not at run time.

    def _square_batch(name: str, A: Tensor) -> None:
        torch._check(A.dim() == 3 and A.shape[1] == A.shape[2],
                     lambda: f"{name} must have shape (N, d, d), got {tuple(A.shape)}")

    def _rhs_of(B: Tensor, A: Tensor) -> None:
        torch._check(B.dim() == 3 and B.shape[:2] == A.shape[:2],
                     lambda: f"B must have shape ({A.shape[0]}, {A.shape[1]}, k), got "
                     f"{tuple(B.shape)}")

    def _compact_rows(F: Tensor, G: Tensor, name: str) -> None:
        torch._check(F.dim() == 3 and F.shape[2] == 16,
                     lambda: f"the compact state must have shape (tiles, T, 16), got "
                     f"{tuple(F.shape)}")
        torch._check(G.dim() == 2 and G.shape[0] <= F.shape[0] * 16,
                     lambda: f"{name} must have shape (N, d) with N <= 16 tiles, got "
                     f"{tuple(G.shape)}")

    def _info_like(A: Tensor) -> Tensor:
        return A.new_empty(A.shape[:1], dtype=torch.int32)

    @torch.library.register_fake("mbf_kernels::cholesky_ex")
    def _(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        _square_batch("A", A)
        return torch.empty_like(A), _info_like(A)

    @torch.library.register_fake("mbf_kernels::cholesky_solve")
    def _(B: Tensor, L: Tensor) -> Tensor:
        _square_batch("L", L)
        _rhs_of(B, L)
        return torch.empty_like(B)

    @torch.library.register_fake("mbf_kernels::solve_spd_ex")
    def _(A: Tensor, B: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        _square_batch("A", A)
        _rhs_of(B, A)
        return torch.empty_like(B), _info_like(A)

    @torch.library.register_fake("mbf_kernels::inv_spd_ex")
    def _(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        _square_batch("A", A)
        return torch.empty_like(A), _info_like(A)

    @torch.library.register_fake("mbf_kernels::outer_ema_")
    def _(F: Tensor, G: Tensor, beta: float) -> None:
        _square_batch("F", F)
        torch._check(G.dim() == 3 and G.shape[0] == F.shape[0] and G.shape[2] == F.shape[1],
                     lambda: f"G must have shape ({F.shape[0]}, S, {F.shape[1]}), got "
                     f"{tuple(G.shape)}")

    @torch.library.register_fake("mbf_kernels::compact_outer_ema_")
    def _(F: Tensor, G: Tensor, beta: float) -> None:
        _compact_rows(F, G, "G")

    @torch.library.register_fake("mbf_kernels::compact_cholesky_ex")
    def _(F: Tensor, n_blocks: int, damping: float) -> tuple[Tensor, Tensor]:
        torch._check(F.dim() == 3 and F.shape[2] == 16 and n_blocks <= F.shape[0] * 16,
                     lambda: f"F must be compact (tiles, T, 16) holding {n_blocks} blocks, got "
                     f"{tuple(F.shape)}")
        return torch.empty_like(F), F.new_empty((n_blocks,), dtype=torch.int32)

    @torch.library.register_fake("mbf_kernels::compact_solve")
    def _(factor: Tensor, B: Tensor) -> Tensor:
        _compact_rows(factor, B, "B")
        return torch.empty_like(B)

    @torch.library.register_fake("mbf_kernels::mbf_bucket_step_")
    def _(params, grads, momenta, curvature, factor, stats, segments, lr, momentum_coef, beta,
          damping, weight_decay, decoupled_weight_decay, second_moments, tile_damping,
          tile_scale, tile_norms, directions, beta2, eps, step_mode,
          block_second_moment=None) -> None:
        check_bucket_step_fake(params, grads, momenta, curvature, factor, stats, segments)

    @torch.library.register_fake("mbf_kernels::mbf_step_")
    def _(param, grad, momentum, curvature, factor, stats, lr, momentum_coef, beta, damping,
          weight_decay, decoupled_weight_decay, update_curvature, first_curvature,
          refactor) -> None:
        check_bucket_step_fake([param], [grad], [momentum], curvature, factor, stats,
                               [0, -1, 0, 0, 1, 1, 0, 0, 1])
