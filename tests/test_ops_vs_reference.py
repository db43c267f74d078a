"""Every compiled backend against the torch reference, anchored to an fp64 computation.

Each backend's error against an fp64 reference must be no worse than 2x what plain PyTorch
gets at the same precision. Failure handling (info, isolation of bad blocks) must match too.
"""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
from conftest import (
    BLOCK_DIMS,
    DTYPES,
    assert_close_fp64_anchored,
    assert_refuses_block_size,
    batch_sizes_for,
    compiled_backends,
    non_contiguous,
    randn,
    random_spd,
)
from mbf_kernels import dispatch

CASES = [(n, d) for d in BLOCK_DIMS for n in batch_sizes_for(d)]
pytestmark = pytest.mark.parametrize("backend", compiled_backends())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
def test_cholesky_ex(backend, n, d, dtype):
    A64 = random_spd(n, d=d)
    A = A64.to(dtype)
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(backend, d,
                                         lambda: mk.linalg.cholesky_ex(A, backend=backend))
    L, info = mk.linalg.cholesky_ex(A, 0.05, backend=backend)
    L_torch, info_torch = mk.linalg.cholesky_ex(A, 0.05, backend="torch")
    L_exact, _ = mk.linalg.cholesky_ex(A64, 0.05, backend="torch")
    assert L.dtype == dtype and info.dtype == torch.int32 and L.shape == A.shape
    assert torch.equal(info, info_torch)
    assert torch.equal(L, torch.tril(L))
    assert_close_fp64_anchored(L, L_torch, L_exact, what=f"cholesky {backend}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
@pytest.mark.parametrize("k", [None, 3])
def test_solve_spd(backend, n, d, dtype, k):
    A64 = random_spd(n, d=d)
    B64 = randn(n, d) if k is None else randn(n, d, k)
    A, B = A64.to(dtype), B64.to(dtype)
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(backend, d,
                                         lambda: mk.linalg.solve_spd(A, B, backend=backend))
    X = mk.linalg.solve_spd(A, B, 0.01, backend=backend)
    assert X.shape == B.shape and X.dtype == dtype
    assert_close_fp64_anchored(
        X,
        mk.linalg.solve_spd(A, B, 0.01, backend="torch"),
        mk.linalg.solve_spd(A64, B64, 0.01, backend="torch"),
        what=f"solve_spd {backend}",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
def test_cholesky_solve(backend, n, d, dtype):
    A64 = random_spd(n, d=d)
    L64 = torch.linalg.cholesky(A64)
    B64 = randn(n, d, 2)
    L, B = L64.to(dtype), B64.to(dtype)
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(backend, d,
                                         lambda: mk.linalg.cholesky_solve(B, L, backend=backend))
    assert_close_fp64_anchored(
        mk.linalg.cholesky_solve(B, L, backend=backend),
        mk.linalg.cholesky_solve(B, L, backend="torch"),
        torch.cholesky_solve(B64, L64),
        what=f"cholesky_solve {backend}",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
def test_inv_spd(backend, n, d, dtype):
    A64 = random_spd(n, d=d)
    A = A64.to(dtype)
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(backend, d, lambda: mk.linalg.inv_spd(A, backend=backend))
    damped = A64 + 0.1 * torch.eye(d, dtype=torch.float64)
    assert_close_fp64_anchored(
        mk.linalg.inv_spd(A, 0.1, backend=backend),
        mk.linalg.inv_spd(A, 0.1, backend="torch"),
        mk.linalg.inv_spd(A64, 0.1, backend="torch"),
        what=f"inv_spd {backend}",
        cond=float(torch.linalg.cond(damped).max()) if n else 1.0,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
@pytest.mark.parametrize("S", [None, 4])
def test_outer_ema(backend, n, d, S, dtype):
    F64 = random_spd(n, d=d, seed=5)
    G64 = randn(n, d) if S is None else randn(n, S, d)
    F, G = F64.to(dtype), G64.to(dtype)
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(
            backend, d, lambda: mk.linalg.outer_ema_(F.clone(), G, 0.9, backend=backend))
    ours = mk.linalg.outer_ema_(F.clone(), G, 0.9, backend=backend)
    assert torch.equal(ours, ours.mT)  # exactly symmetric
    assert_close_fp64_anchored(
        ours,
        mk.linalg.outer_ema_(F.clone(), G, 0.9, backend="torch"),
        mk.linalg.outer_ema_(F64.clone(), G64, 0.9, backend="torch"),
        what=f"outer_ema_ {backend}",
    )


def test_broadcast_and_non_contiguous(backend):
    A = random_spd(2, 3, d=9, dtype=torch.float32)
    B = randn(9, 2, dtype=torch.float32)
    expected = mk.linalg.solve_spd(A, B, backend="torch")
    torch.testing.assert_close(mk.linalg.solve_spd(non_contiguous(A), B, backend=backend), expected)
    F = non_contiguous(random_spd(5, d=9, dtype=torch.float32))
    G = non_contiguous(randn(5, 9, dtype=torch.float32))
    expected = mk.linalg.outer_ema_(F.clone(), G, 0.5, backend="torch")
    torch.testing.assert_close(mk.linalg.outer_ema_(F, G, 0.5, backend=backend), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_failed_blocks_are_reported_and_isolated(backend, dtype):
    A = random_spd(6, d=9, dtype=dtype)
    A[1, 4, 4] = -5.0             # not positive definite at order 5
    A[3, 6, 2] = float("nan")      # NaN below the diagonal: fails at row 7
    A[4, 0, 0] = float("inf")      # +Inf pivot: accepted by LAPACK, rejected by us
    L, info = mk.linalg.cholesky_ex(A, backend=backend)
    _, info_ref = mk.linalg.cholesky_ex(A, backend="torch")
    assert info.tolist() == info_ref.tolist() == [0, 5, 0, 7, 1, 0]
    good = info == 0
    L_ref, _ = mk.linalg.cholesky_ex(A[good], backend="torch")
    torch.testing.assert_close(L[good], L_ref)  # neighbours of bad blocks are untouched

    B = randn(6, 9, dtype=dtype)
    X, info_s = dispatch.module(backend).solve_spd_ex(A, B.unsqueeze(-1), 0.0)
    assert info_s.tolist() == info.tolist()
    assert torch.isfinite(X).all()
    assert (X[~good] == 0).all()  # failed blocks come back as zeros, never NaN
    torch.testing.assert_close(
        X[good].squeeze(-1), mk.linalg.solve_spd(A[good], B[good], backend="torch")
    )
    with pytest.raises(torch.linalg.LinAlgError, match="Batch element 1"):
        mk.linalg.solve_spd(A, B, backend=backend)


def test_damping_rescues_indefinite(backend):
    A = torch.diag_embed(torch.tensor([[1.0, -0.5, 2.0]]))
    _, info = mk.linalg.cholesky_ex(A, 0.0, backend=backend)
    assert info.tolist() == [2]
    L = mk.linalg.cholesky(A, 1.0, backend=backend)
    torch.testing.assert_close(L, torch.diag_embed(torch.tensor([[2.0, 0.5, 3.0]]).sqrt()))
