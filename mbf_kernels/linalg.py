"""Batched small-SPD linear algebra, a drop-in beside ``torch.linalg``.

Every function takes ``backend=`` (see :mod:`mbf_kernels.dispatch`); ``"torch"`` is the
reference the others are tested against. Shapes follow ``torch.linalg``: ``A`` is (..., d, d);
``B`` is a batch of vectors (..., d) when ``B.ndim == A.ndim - 1`` (or ``B.ndim == 1``), else a
batch of matrices (..., d, k); batch dimensions broadcast as in ``torch.linalg.solve``.

Only the lower triangle of ``A`` is read. ``damping`` adds ``damping * I`` before factoring.
Functions without ``_ex`` raise :class:`torch.linalg.LinAlgError` when a damped matrix is not
positive definite, as ``torch.linalg.cholesky`` does (this inspects ``info`` on the host).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as v
from .dispatch import select

__all__ = ["cholesky", "cholesky_ex", "cholesky_solve", "solve_spd", "inv_spd", "outer_ema_"]


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _raise_if_failed(fn: str, info: Tensor) -> None:
    """Raise like torch.linalg.cholesky when any entry of ``info`` is non-zero (meta tensors
    have no values: shapes only, as torch.linalg's checks skip them)."""
    if info.device.type == "meta":
        return
    failed = info.ne(0)
    if not bool(failed.any()):
        return
    flat = info.reshape(-1)
    first = int(flat.ne(0).nonzero()[0, 0])
    # torch numbers batch elements in the flattened batch, and so do we.
    where = f"(Batch element {first}): " if info.ndim > 0 else ""
    order = int(flat[first])
    raise torch.linalg.LinAlgError(
        f"{fn}: {where}The factorization could not be completed because the input is not "
        f"positive-definite (the leading minor of order {order} is not positive-definite)."
    )


def cholesky_ex(
    A: Tensor, damping: float = 0.0, *, check_errors: bool = False, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Cholesky factor of ``A + damping*I`` and a per-matrix status, like ``torch.linalg.cholesky_ex``.

    A: (..., d, d) -> L: (..., d, d) lower triangular, info: (...) int32, 0 where the factor
    succeeded, else the order of the first leading minor whose pivot was not a finite positive
    number. L is unspecified where info != 0.
    """
    fn = "mbf_kernels.linalg.cholesky_ex"
    v.check_matrix_batch(fn, "A", A)
    damping = v.check_nonnegative(fn, "damping", damping)
    d = A.shape[-1]
    impl = select(backend, A.device, differentiable=_needs_grad(A), fn=fn, d=d)
    L, info = impl.cholesky_ex(A.reshape(-1, d, d).contiguous(), damping)
    L, info = L.reshape(A.shape), info.reshape(A.shape[:-2])
    if check_errors:
        _raise_if_failed(fn, info)
    return L, info


def cholesky(A: Tensor, damping: float = 0.0, *, backend: str = "auto") -> Tensor:
    """``torch.linalg.cholesky(A + damping*I)``: A (..., d, d) -> L (..., d, d) lower.

    Raises :class:`torch.linalg.LinAlgError` if any damped matrix is not positive definite.
    """
    L, info = cholesky_ex(A, damping, backend=backend)
    _raise_if_failed("mbf_kernels.linalg.cholesky", info)
    return L


def _as_rhs(fn: str, B: Tensor, A: Tensor, a_name: str) -> tuple[Tensor, bool]:
    """B as a matrix batch (..., d, k) plus whether it was a vector batch."""
    v.check_same_kind(fn, "B", B, a_name, A)
    d = A.shape[-1]
    vector = B.ndim == 1 or B.ndim == A.ndim - 1
    Bm = B.unsqueeze(-1) if vector else B
    if Bm.ndim < 2 or Bm.shape[-2] != d:
        form = "(..., d) or (..., d, k)"
        raise ValueError(
            f"{fn}: B must have shape {form} with d = {d} to match {a_name} "
            f"{tuple(A.shape)}, got {tuple(B.shape)}"
        )
    return Bm, vector


def _flat_pair(fn: str, A: Tensor, Bm: Tensor, a_name: str, column_major_ok: bool = False):
    """Broadcast the batch dims of A (..., d, d) and Bm (..., d, k), flattened to one. With
    ``column_major_ok`` a batch of column-major matrices (torch.linalg.cholesky's factors) stays
    as it is, for the backends that read it in place, instead of being copied."""
    batch = v.broadcast_batch(fn, (a_name, "B"), A.shape[:-2], Bm.shape[:-2])
    d, k = A.shape[-1], Bm.shape[-1]
    A3 = A.expand(*batch, d, d).reshape(-1, d, d)
    if not (column_major_ok and A3.mT.is_contiguous()):
        A3 = A3.contiguous()
    B3 = Bm.expand(*batch, d, k).reshape(-1, d, k).contiguous()
    return A3, B3, batch


def cholesky_solve(B: Tensor, L: Tensor, *, backend: str = "auto") -> Tensor:
    """Solve ``(L L^T) X = B`` for a lower factor L, like ``torch.cholesky_solve(B, L)``.

    L: (..., d, d); B: (..., d) or (..., d, k) -> X with B's form and the broadcast batch.
    """
    fn = "mbf_kernels.linalg.cholesky_solve"
    v.check_matrix_batch(fn, "L", L)
    Bm, vector = _as_rhs(fn, B, L, "L")
    impl = select(backend, L.device, differentiable=_needs_grad(B, L), fn=fn, d=L.shape[-1])
    L3, B3, batch = _flat_pair(fn, L, Bm, "L", column_major_ok=True)
    X = impl.cholesky_solve(B3, L3).reshape(*batch, *Bm.shape[-2:])
    return X.squeeze(-1) if vector else X


def solve_spd(A: Tensor, B: Tensor, damping: float = 0.0, *, backend: str = "auto") -> Tensor:
    """Fused factor + solve of ``(A + damping*I) X = B`` for SPD A.

    A: (..., d, d); B: (..., d) or (..., d, k) -> X with B's form and the broadcast batch.
    Raises :class:`torch.linalg.LinAlgError` if any damped matrix is not positive definite.
    """
    fn = "mbf_kernels.linalg.solve_spd"
    v.check_matrix_batch(fn, "A", A)
    Bm, vector = _as_rhs(fn, B, A, "A")
    damping = v.check_nonnegative(fn, "damping", damping)
    impl = select(backend, A.device, differentiable=_needs_grad(A, B), fn=fn, d=A.shape[-1])
    A3, B3, batch = _flat_pair(fn, A, Bm, "A")
    X, info = impl.solve_spd_ex(A3, B3, damping)
    _raise_if_failed(fn, info.reshape(batch))
    X = X.reshape(*batch, *Bm.shape[-2:])
    return X.squeeze(-1) if vector else X


def inv_spd(A: Tensor, damping: float = 0.0, *, backend: str = "auto") -> Tensor:
    """``(A + damping*I)^{-1}`` for SPD A (..., d, d), through a Cholesky factor.

    Raises :class:`torch.linalg.LinAlgError` if any damped matrix is not positive definite.
    """
    fn = "mbf_kernels.linalg.inv_spd"
    v.check_matrix_batch(fn, "A", A)
    damping = v.check_nonnegative(fn, "damping", damping)
    d = A.shape[-1]
    impl = select(backend, A.device, differentiable=_needs_grad(A), fn=fn, d=d)
    Ainv, info = impl.inv_spd_ex(A.reshape(-1, d, d).contiguous(), damping)
    _raise_if_failed(fn, info.reshape(A.shape[:-2]))
    return Ainv.reshape(A.shape)


def outer_ema_(F: Tensor, G: Tensor, beta: float, *, backend: str = "auto") -> Tensor:
    """In place: ``F = beta*F + (1-beta) * mean_s g_s g_s^T``; returns F.

    F: (..., d, d). G: (..., d), one vector per block (``G.ndim == F.ndim - 1``), or
    (..., S, d), S >= 1 vectors per block averaged (``G.ndim == F.ndim``). G's batch dims must
    broadcast to F's. F stays exactly symmetric.
    """
    fn = "mbf_kernels.linalg.outer_ema_"
    v.check_matrix_batch(fn, "F", F)
    v.check_same_kind(fn, "G", G, "F", F)
    beta = v.check_unit_interval(fn, "beta", beta)
    d = F.shape[-1]
    if G.ndim == F.ndim - 1:
        G = G.unsqueeze(-2)
    elif G.ndim != F.ndim:
        raise ValueError(
            f"{fn}: G must have shape (..., d) or (..., S, d) for F {tuple(F.shape)}, "
            f"got {tuple(G.shape)}"
        )
    if G.shape[-1] != d or G.shape[-2] < 1:
        raise ValueError(
            f"{fn}: G must end in (S, {d}) with S >= 1 to match F {tuple(F.shape)}, "
            f"got {tuple(G.shape)}"
        )
    batch = F.shape[:-2]
    if v.broadcast_batch(fn, ("F", "G"), batch, G.shape[:-2]) != batch:
        raise ValueError(
            f"{fn}: the batch dimensions of G {tuple(G.shape[:-2])} must broadcast to those "
            f"of F {tuple(batch)} (F is updated in place)"
        )
    impl = select(backend, F.device, differentiable=_needs_grad(F, G), fn=fn, d=d)
    S = G.shape[-2]
    G3 = G.expand(*batch, S, d).reshape(-1, S, d).contiguous()
    if F.is_contiguous():
        impl.outer_ema_(F.view(-1, d, d), G3, beta)
    else:
        F3 = F.reshape(-1, d, d).contiguous()
        impl.outer_ema_(F3, G3, beta)
        F.copy_(F3.view(F.shape))
    return F
