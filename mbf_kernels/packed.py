"""The canonical packed layout of symmetric / lower-triangular blocks.

A d x d block is stored as its lower triangle, row-major: (0,0), (1,0), (1,1), (2,0), ...,
d(d+1)/2 numbers (MBF_SPEC section 4). Optimizer state is saved in this layout whatever the
backend or device, so a run saved on one resumes on another.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["tril_size", "tril_dim", "tril_indices", "pack_tril", "unpack_tril"]


def tril_size(d: int) -> int:
    """Number of packed entries of a d x d block: d(d+1)/2."""
    if d < 0:
        raise ValueError(f"tril_size: d must be >= 0, got {d}")
    return d * (d + 1) // 2


def tril_dim(n: int) -> int:
    """The block size d whose packed triangle has n entries; ValueError if n is not triangular."""
    d = (math.isqrt(8 * n + 1) - 1) // 2
    if n < 0 or tril_size(d) != n:
        raise ValueError(f"tril_dim: {n} is not a triangular number d(d+1)/2")
    return d


@functools.lru_cache(maxsize=64)
def _tril_indices_cpu(d: int) -> tuple[Tensor, Tensor]:
    rows, cols = torch.tril_indices(d, d)
    return rows, cols


def tril_indices(d: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(rows, cols) of the packed order, each of length d(d+1)/2."""
    rows, cols = _tril_indices_cpu(d)
    return rows.to(device), cols.to(device)


def pack_tril(A: Tensor) -> Tensor:
    """(..., d, d) -> (..., d(d+1)/2): the lower triangle, row-major (the upper one is ignored)."""
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"pack_tril: A must have shape (..., d, d), got {tuple(A.shape)}")
    rows, cols = tril_indices(A.shape[-1], A.device)
    return A[..., rows, cols]


def unpack_tril(P: Tensor, *, symmetric: bool = True) -> Tensor:
    """(..., d(d+1)/2) -> (..., d, d): symmetric (mirrored) or lower-triangular (zero upper)."""
    if P.ndim < 1:
        raise ValueError("unpack_tril: P must have at least one dimension (..., d(d+1)/2)")
    d = tril_dim(P.shape[-1])
    rows, cols = tril_indices(d, P.device)
    out = P.new_zeros(*P.shape[:-1], d, d)
    out[..., rows, cols] = P
    if symmetric:
        out[..., cols, rows] = P
    return out
