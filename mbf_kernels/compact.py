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

from .packed import pack_tril, tril_size, unpack_tril

#: Blocks per compact tile (csrc/include/mbf/batched.h: kCompactTile).
COMPACT_TILE = 16

__all__ = [
    "COMPACT_TILE",
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

