"""Ops on the compact layout of per-block optimizer state (:mod:`mbf_kernels.layout`).

The phases of the fused step, one at a time, each with ``backend=`` like
:mod:`mbf_kernels.linalg` ("torch" goes through the canonical layout and the reference). The
layout itself (tiles, conversions, the factor's representation) is :mod:`mbf_kernels.layout`;
its names are re-exported here, the public home they have always had.
"""

from __future__ import annotations

from torch import Tensor

from . import _validation as v
from .dispatch import select
from .layout import (COMPACT_TILE, cholesky_from_factor, compact_shape, factor_from_cholesky,
                     from_compact, identity_factor, n_tiles, to_compact)
from .packed import tril_dim

__all__ = [
    "COMPACT_TILE",
    "outer_ema_",
    "cholesky_ex",
    "solve",
    "compact_shape",
    "n_tiles",
    "to_compact",
    "from_compact",
    "identity_factor",
    "factor_from_cholesky",
    "cholesky_from_factor",
]


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
    fn = "mbf_kernels.compact.solve"
    _check_rows(fn, "B", B, "factor", factor)
    _check_compact(fn, "factor", factor, B.shape[0], B.shape[1])
    return select(backend, factor.device, differentiable=False, fn=fn, d=B.shape[1],
                  step=True).compact_solve(factor, B)
