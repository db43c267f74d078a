"""The compact in-memory layout of per-block optimizer state, and its canonical form.

Kernels keep a bucket's packed triangles (curvature F, factor) in tiles of
:data:`COMPACT_TILE` blocks, block index fastest: shape ``(ceil(N/16), d(d+1)/2, 16)``. Each
row of a tile is one vector register (or two, or a coalesced GPU load), so the kernels read
whole rows with no shuffles. The canonical form, used by ``state_dict`` and by the reference,
is ``(N, d(d+1)/2)``: one packed lower triangle per block, row-major (:mod:`mbf_kernels.packed`).
Padding blocks (N up to a multiple of 16) hold finite values and are dropped on conversion.

The factor stores L with its diagonal inverted (1 / L_ii), an exact representation that makes
the solve multiplication-only; :func:`factor_from_cholesky` and :func:`cholesky_from_factor`
convert to and from a plain Cholesky factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as v
from .packed import pack_tril, tril_dim, tril_size, unpack_tril

#: Blocks per compact tile (csrc/include/mbf/batched.h: kCompactTile).
COMPACT_TILE = 16

__all__ = [
    "COMPACT_TILE",
    "outer_ema_",
    "cholesky_ex",
    "solve",
    "compact_shape",
    "to_compact",
    "from_compact",
    "identity_factor",
    "factor_from_cholesky",
    "cholesky_from_factor",
]


def compact_shape(n_blocks: int, d: int) -> tuple[int, int, int]:
    return (-(-n_blocks // COMPACT_TILE), tril_size(d), COMPACT_TILE)


def to_compact(P: Tensor, *, pad: Tensor | None = None) -> Tensor:
    """(N, T) canonical packed rows -> (ceil(N/16), T, 16). ``pad`` (T,) fills padding blocks (zeros)."""
    n, t = P.shape
    tiles = -(-n // COMPACT_TILE)
    padded = P.new_zeros(tiles * COMPACT_TILE, t) if pad is None else pad.expand(tiles * COMPACT_TILE, t).clone()
    padded[:n] = P
    return padded.view(tiles, COMPACT_TILE, t).transpose(1, 2).contiguous()


def from_compact(C: Tensor, n_blocks: int) -> Tensor:
    """(ceil(N/16), T, 16) -> (N, T) canonical packed rows."""
    tiles, t, width = C.shape
    if width != COMPACT_TILE or tiles * COMPACT_TILE < n_blocks:
        raise ValueError(f"from_compact: shape {tuple(C.shape)} cannot hold {n_blocks} blocks")
    return C.transpose(1, 2).reshape(tiles * COMPACT_TILE, t)[:n_blocks].contiguous()


def identity_factor(d: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The packed factor of the identity (also the padding value of factor state): (T,)."""
    return pack_tril(torch.eye(d, dtype=dtype, device=device))


def factor_from_cholesky(L: Tensor) -> Tensor:
    """(..., d, d) lower Cholesky factor -> (..., T) packed with the diagonal inverted."""
    L = L.clone()
    L.diagonal(dim1=-2, dim2=-1).reciprocal_()
    return pack_tril(L)


def cholesky_from_factor(P: Tensor) -> Tensor:
    """(..., T) packed factor with inverted diagonal -> (..., d, d) lower Cholesky factor."""
    L = unpack_tril(P, symmetric=False)
    L.diagonal(dim1=-2, dim2=-1).reciprocal_()
    return L


# ---------------------------------------------------------------------------------------------
# Ops on the compact layout: the phases of the fused step, one at a time. Each takes backend=
# like mbf_kernels.linalg ("torch" goes through the canonical layout and the reference).


def _check_compact(fn: str, name: str, C: Tensor, n_blocks: int, d: int) -> None:
    v.check_float_dtype(fn, name, C)
    if tuple(C.shape) != compact_shape(n_blocks, d):
        raise ValueError(f"{fn}: {name} must have the compact shape {compact_shape(n_blocks, d)} "
                         f"for {n_blocks} blocks of size {d}, got {tuple(C.shape)}")


def _check_rows(fn: str, name: str, X: Tensor, ref_name: str, ref: Tensor) -> Tensor:
    v.check_same_kind(fn, name, X, ref_name, ref)
    if X.ndim != 2:
        raise ValueError(f"{fn}: {name} must have shape (N, d), got {tuple(X.shape)}")
    return X


def outer_ema_(F: Tensor, G: Tensor, beta: float, *, backend: str = "auto") -> Tensor:
    """In place on the compact curvature F: F = beta F + (1 - beta) g g^T, G (N, d); returns F."""
    from .dispatch import select

    fn = "mbf_kernels.compact.outer_ema_"
    _check_rows(fn, "G", G, "F", F)
    _check_compact(fn, "F", F, G.shape[0], G.shape[1])
    beta = v.check_unit_interval(fn, "beta", beta)
    if not F.is_contiguous():
        raise ValueError(f"{fn}: F is updated in place and must be contiguous")
    select(backend, F.device, differentiable=False, fn=fn, d=G.shape[1],
           step=True).compact_outer_ema_(F, G, beta)
    return F


def cholesky_ex(F: Tensor, n_blocks: int, damping: float = 0.0, *,
                backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Factor of every damped block of the compact curvature F.

    Returns the compact factor (L with its diagonal inverted; zero where info != 0) and info
    (N,) int32 with the :mod:`mbf_kernels.reference` convention.
    """
    from .dispatch import select

    fn = "mbf_kernels.compact.cholesky_ex"
    if F.ndim != 3:
        raise ValueError(f"{fn}: F must be a compact tensor (tiles, T, 16), got {tuple(F.shape)}")
    d = tril_dim(F.shape[1])
    _check_compact(fn, "F", F, n_blocks, d)
    damping = v.check_nonnegative(fn, "damping", damping)
    return select(backend, F.device, differentiable=False, fn=fn, d=d,
                  step=True).compact_cholesky_ex(F, n_blocks, damping)


def solve(factor: Tensor, B: Tensor, *, backend: str = "auto") -> Tensor:
    """X = (L L^T)^{-1} B for the compact factor and B (N, d): the solve with a cached factor."""
    from .dispatch import select

    fn = "mbf_kernels.compact.solve"
    _check_rows(fn, "B", B, "factor", factor)
    _check_compact(fn, "factor", factor, B.shape[0], B.shape[1])
    return select(backend, factor.device, differentiable=False, fn=fn, d=B.shape[1],
                  step=True).compact_solve(factor, B)
