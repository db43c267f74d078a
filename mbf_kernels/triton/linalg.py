"""Dense (N, d, d) batches in Triton: the kernels and host launchers behind
:mod:`mbf_kernels.linalg` with ``backend="triton"`` (cholesky_ex, cholesky_solve,
solve_spd_ex, inv_spd_ex, outer_ema_), registered as ``mbf_kernels::triton_*`` ops.

The factor of ``A + damping I`` is zero where it failed, with ``info`` the 1-based order of the
first pivot that is not a finite positive number (MBF_SPEC section 4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (autotune, check_like, grid, launch, nbin, register_op, rhs_columns,
                      square_blocks)
from ._tuples import (cholesky, ema, inverse, lane_range, load_tri, load_vec, outer, recip,
                      scalar, solve, store_dense, store_vec, tri, zero_where)

__all__ = ["cholesky_ex", "cholesky_solve", "solve_spd_ex", "inv_spd_ex", "outer_ema_"]


@triton.jit
def _dense_factor(A, lanes, mask, damping, D: tl.constexpr):
    """The factor of each lane's dense block of A plus damping I: (packed L with its diagonal
    inverted, info)."""
    return cholesky(load_tri(A, lanes * (D * D), mask, D, False),
                     scalar(damping, A.dtype.element_ty), D)


@triton.jit
def _invert_diagonal(l, mask, D: tl.constexpr):
    """Packed L with its diagonal replaced by its reciprocal (either direction between a dense
    factor and the kernels' form). Lanes past the batch invert 1, not the 0 they read, so that
    the interpreter does not warn of a division by 0."""
    out = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            if i == j:
                out = out + (recip(tl.where(mask, l[tri(i, i)], 1.0)),)
            else:
                out = out + (l[tri(i, j)],)
    return out


@autotune()
@triton.jit
def _dense_cholesky_kernel(A, L, info_ptr, n, damping: tl.float64, NBIN,
                           D: tl.constexpr, BLOCK: tl.constexpr):
    """L (N, D, D) lower = chol(A + damping I), zero where it failed; info (N,) int32."""
    lanes, mask = lane_range(n, BLOCK)
    l, info = _dense_factor(A, lanes, mask, damping, D)
    dense = _invert_diagonal(l, mask, D)  # the dense factor holds L_jj itself
    store_dense(L, lanes * (D * D), mask, zero_where(info != 0, dense, D * (D + 1) // 2), D,
                 False)
    tl.store(info_ptr + lanes, info, mask=mask)


@autotune()
@triton.jit
def _dense_cholesky_solve_kernel(L, B, X, n, k, NBIN, D: tl.constexpr, BLOCK: tl.constexpr):
    """X (N, D, k) = (L L^T)^{-1} B for a dense lower factor L (N, D, D)."""
    lanes, mask = lane_range(n, BLOCK)
    l = _invert_diagonal(load_tri(L, lanes * (D * D), mask, D, False), mask, D)
    for c in range(k):
        base = lanes * (D * k) + c
        x = solve(l, load_vec(B, base, k, mask, D), D)
        store_vec(X, base, k, mask, x, D)


@autotune()
@triton.jit
def _dense_solve_spd_kernel(A, B, X, info_ptr, n, k, damping: tl.float64, NBIN,
                            D: tl.constexpr, BLOCK: tl.constexpr):
    """X = (A + damping I)^{-1} B, factor and solves fused; X = 0 where the factor failed."""
    lanes, mask = lane_range(n, BLOCK)
    l, info = _dense_factor(A, lanes, mask, damping, D)
    failed = info != 0
    for c in range(k):
        base = lanes * (D * k) + c
        x = solve(l, load_vec(B, base, k, mask, D), D)
        store_vec(X, base, k, mask, zero_where(failed, x, D), D)
    tl.store(info_ptr + lanes, info, mask=mask)


@autotune()
@triton.jit
def _dense_inv_spd_kernel(A, Ainv, info_ptr, n, damping: tl.float64, NBIN,
                          D: tl.constexpr, BLOCK: tl.constexpr):
    """Ainv = (A + damping I)^{-1} (symmetric, dense); zero where the factor failed."""
    lanes, mask = lane_range(n, BLOCK)
    l, info = _dense_factor(A, lanes, mask, damping, D)
    inv = zero_where(info != 0, inverse(l, D), D * (D + 1) // 2)
    store_dense(Ainv, lanes * (D * D), mask, inv, D, True)
    tl.store(info_ptr + lanes, info, mask=mask)


@autotune(restore=("F",))
@triton.jit
def _dense_outer_ema_kernel(F, G, n, S, beta: tl.float64, NBIN, D: tl.constexpr,
                            BLOCK: tl.constexpr):
    """In place: F = beta F + (1 - beta)/S sum_s g_s g_s^T, G (N, S, D); F's lower triangle is
    read and written mirrored, so F stays exactly symmetric."""
    lanes, mask = lane_range(n, BLOCK)
    T: tl.constexpr = D * (D + 1) // 2
    dt = F.dtype.element_ty
    c = ()
    for e in tl.static_range(T):
        c = c + (tl.zeros([BLOCK], dtype=dt),)
    for s in range(S):
        g = load_vec(G, (lanes * S + s) * D, 1, mask, D)
        gg = outer(g, D)
        nc = ()
        for e in tl.static_range(T):
            nc = nc + (c[e] + gg[e],)
        c = nc
    base = lanes * (D * D)
    f = load_tri(F, base, mask, D, False)
    f = ema(f, c, scalar(beta, dt), scalar((1 - tl.full([], beta, tl.float64)) / S, dt), T)
    store_dense(F, base, mask, f, D, True)


# ---------------------------------------------------------------------------------------------
# Host launchers


def _factor_op(kernel, A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Launch a kernel that factors each damped block of A into an (N, d, d) output and info."""
    n, d = square_blocks("A", A)
    A = A.contiguous()
    out = torch.empty_like(A)
    info = torch.zeros(n, dtype=torch.int32, device=A.device)
    if n:
        launch(kernel, grid(n), A, out, info, n, damping, nbin(n), D=d)
    return out, info


@register_op("mbf_kernels::triton_cholesky_ex", mutates_args=())
def cholesky_ex(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """A (N, d, d) -> (L (N, d, d) lower, zero where info != 0; info (N,) int32)."""
    return _factor_op(_dense_cholesky_kernel, A, damping)


@register_op("mbf_kernels::triton_cholesky_solve", mutates_args=())
def cholesky_solve(B: Tensor, L: Tensor) -> Tensor:
    """B (N, d, k), L (N, d, d) lower -> X (N, d, k) = (L L^T)^{-1} B."""
    n, d = square_blocks("L", L)
    k = rhs_columns(B, L, "L")
    L, B = L.contiguous(), B.contiguous()
    X = torch.empty_like(B)
    if n and k:
        launch(_dense_cholesky_solve_kernel, grid(n), L, B, X, n, k, nbin(n), D=d)
    return X


@register_op("mbf_kernels::triton_solve_spd_ex", mutates_args=())
def solve_spd_ex(A: Tensor, B: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """A (N, d, d), B (N, d, k) -> (X (N, d, k), zero where info != 0; info (N,) int32)."""
    n, d = square_blocks("A", A)
    k = rhs_columns(B, A, "A")
    A, B = A.contiguous(), B.contiguous()
    X = torch.zeros_like(B)
    info = torch.zeros(n, dtype=torch.int32, device=A.device)
    if n:
        # k = 0 still factors: info reports the failures.
        launch(_dense_solve_spd_kernel, grid(n), A, B, X, info, n, k, damping, nbin(n),
                D=d)
    return X, info


@register_op("mbf_kernels::triton_inv_spd_ex", mutates_args=())
def inv_spd_ex(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """A (N, d, d) -> ((A + damping I)^{-1}, zero where info != 0; info (N,) int32)."""
    return _factor_op(_dense_inv_spd_kernel, A, damping)


@register_op("mbf_kernels::triton_outer_ema_", mutates_args={"F"})
def outer_ema_(F: Tensor, G: Tensor, beta: float) -> None:
    """In place on F (N, d, d) contiguous: F = beta F + (1 - beta) mean_s g_s g_s^T, G (N, S, d)."""
    n, d = square_blocks("F", F)
    if G.ndim != 3 or G.shape[0] != n or G.shape[2] != d or G.shape[1] < 1:
        raise ValueError(f"mbf_kernels triton: G must have shape ({n}, S, {d}) with S >= 1, got "
                         f"{tuple(G.shape)}")
    check_like("G", G, "F", F)
    if not F.is_contiguous():
        raise ValueError("mbf_kernels triton: F is updated in place and must be contiguous")
    G = G.contiguous()
    if n:
        launch(_dense_outer_ema_kernel, grid(n), F, G, n, G.shape[1], beta, nbin(n), D=d)
