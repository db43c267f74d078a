"""The compact-layout phases of the step as standalone ops in Triton (curvature EMA, damped
factor, cached-factor solve): the kernels and host launchers behind :mod:`mbf_kernels.compact`
with ``backend="triton"``, registered as ``mbf_kernels::triton_compact_*`` ops. Layout:
:mod:`mbf_kernels.layout`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..packed import tril_dim
from ._common import (autotune, check_compact, check_like, grid, launch, nbin, register_op,
                      vector_rows)
from ._tuples import (cholesky, compact_base, ema, lane_range, load_tri, load_vec, outer,
                      scalar, solve, store_tri, store_vec, zero_where)

__all__ = ["compact_outer_ema_", "compact_cholesky_ex", "compact_solve"]


@autotune(restore=("F",))
@triton.jit
def _compact_outer_ema_kernel(F, G, n, beta: tl.float64, NBIN, D: tl.constexpr,
                              BLOCK: tl.constexpr):
    """F (compact) = beta F + (1 - beta) g g^T, one gradient row g of G (N, D) per block."""
    lanes, mask = lane_range(n, BLOCK)
    T: tl.constexpr = D * (D + 1) // 2
    dt = F.dtype.element_ty
    base = compact_base(lanes, T)
    f = load_tri(F, base, mask, D, True)
    c = outer(load_vec(G, lanes * D, 1, mask, D), D)
    store_tri(F, base, mask, ema(f, c, scalar(beta, dt), scalar(1 - tl.full([], beta, tl.float64), dt), T), D)


@autotune()
@triton.jit
def _compact_cholesky_kernel(F, L, info_ptr, n, damping: tl.float64, NBIN,
                             D: tl.constexpr, BLOCK: tl.constexpr):
    """L (compact, diagonal inverted; zero for failed blocks), info (N,) int32."""
    lanes, mask = lane_range(n, BLOCK)
    T: tl.constexpr = D * (D + 1) // 2
    base = compact_base(lanes, T)
    l, info = cholesky(load_tri(F, base, mask, D, True), scalar(damping, F.dtype.element_ty), D)
    store_tri(L, base, mask, zero_where(info != 0, l, T), D)
    tl.store(info_ptr + lanes, info, mask=mask)


@autotune()
@triton.jit
def _compact_solve_kernel(L, B, X, n, NBIN, D: tl.constexpr, BLOCK: tl.constexpr):
    """X (N, D) = (L L^T)^{-1} B (N, D), L compact with its diagonal inverted."""
    lanes, mask = lane_range(n, BLOCK)
    l = load_tri(L, compact_base(lanes, D * (D + 1) // 2), mask, D, True)
    x = solve(l, load_vec(B, lanes * D, 1, mask, D), D)
    store_vec(X, lanes * D, 1, mask, x, D)


# ---------------------------------------------------------------------------------------------
# Host launchers


@register_op("mbf_kernels::triton_compact_outer_ema_", mutates_args={"F"})
def compact_outer_ema_(F: Tensor, G: Tensor, beta: float) -> None:
    """F compact (ceil(N/16), T, 16), in place; G (N, d): F = beta F + (1 - beta) g g^T."""
    n, d = vector_rows("G", G)
    check_compact("F", F, n, d)
    check_like("G", G, "F", F)
    if not F.is_contiguous():
        raise ValueError("mbf_kernels triton: F is updated in place and must be contiguous")
    G = G.contiguous()
    if n:
        launch(_compact_outer_ema_kernel, grid(n), F, G, n, beta, nbin(n), D=d)


@register_op("mbf_kernels::triton_compact_cholesky_ex", mutates_args=())
def compact_cholesky_ex(F: Tensor, n_blocks: int, damping: float) -> tuple[Tensor, Tensor]:
    """F compact -> (factor compact, diagonal inverted, zero for failed blocks; info (N,) int32)."""
    if F.ndim != 3:
        raise ValueError(f"mbf_kernels triton: F must be a compact tensor, got {tuple(F.shape)}")
    d = tril_dim(F.shape[1])
    check_compact("F", F, n_blocks, d)
    F = F.contiguous()
    L = torch.zeros_like(F)  # padding blocks: zeros, as the C++ op leaves them finite
    info = torch.zeros(n_blocks, dtype=torch.int32, device=F.device)
    if n_blocks:
        launch(_compact_cholesky_kernel, grid(n_blocks), F, L, info, n_blocks, damping,
                nbin(n_blocks), D=d)
    return L, info


@register_op("mbf_kernels::triton_compact_solve", mutates_args=())
def compact_solve(factor: Tensor, B: Tensor) -> Tensor:
    """factor compact (diagonal inverted), B (N, d) -> X = (L L^T)^{-1} B, (N, d)."""
    n, d = vector_rows("B", B)
    check_compact("factor", factor, n, d)
    check_like("B", B, "factor", factor)
    factor, B = factor.contiguous(), B.contiguous()
    X = torch.empty_like(B)
    if n:
        launch(_compact_solve_kernel, grid(n), factor, B, X, n, nbin(n), D=d)
    return X
