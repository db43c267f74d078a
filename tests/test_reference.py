"""The torch reference backend against torch.linalg and against known mathematics."""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
from conftest import BLOCK_DIMS, DTYPES, batch_sizes_for, non_contiguous, randn, random_spd

CASES = [(n, d) for d in BLOCK_DIMS for n in batch_sizes_for(d)]


def tol(dtype):
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
def test_cholesky_matches_torch_and_reconstructs(n, d, dtype):
    A = random_spd(n, d=d, dtype=dtype)
    L = mk.linalg.cholesky(A, damping=0.25, backend="torch")
    Ad = A + 0.25 * torch.eye(d, dtype=dtype)
    torch.testing.assert_close(L, torch.linalg.cholesky(Ad))
    torch.testing.assert_close(L @ L.mT, Ad, **tol(dtype))
    assert torch.equal(L, torch.tril(L))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
def test_solve_spd_solves(n, d, dtype):
    A = random_spd(n, d=d, dtype=dtype)
    b = randn(n, d, dtype=dtype)
    x = mk.linalg.solve_spd(A, b, damping=0.01, backend="torch")
    Ad = A + 0.01 * torch.eye(d, dtype=dtype)
    torch.testing.assert_close((Ad @ x.unsqueeze(-1)).squeeze(-1), b, **tol(dtype))
    torch.testing.assert_close(x, torch.linalg.solve(Ad, b), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
def test_inv_spd_is_inverse(n, d, dtype):
    A = random_spd(n, d=d, dtype=dtype)
    Ainv = mk.linalg.inv_spd(A, damping=0.5, backend="torch")
    Ad = A + 0.5 * torch.eye(d, dtype=dtype)
    eye = torch.eye(d, dtype=dtype).expand_as(A)
    torch.testing.assert_close(Ad @ Ainv, eye, **tol(dtype))
    torch.testing.assert_close(Ainv, torch.linalg.inv(Ad), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
def test_cholesky_solve_matrix_rhs(n, d, dtype):
    A = random_spd(n, d=d, dtype=dtype)
    L = torch.linalg.cholesky(A)
    B = randn(n, d, 3, dtype=dtype)
    X = mk.linalg.cholesky_solve(B, L, backend="torch")
    torch.testing.assert_close(X, torch.cholesky_solve(B, L))
    torch.testing.assert_close(A @ X, B, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [None, 1, 5])
@pytest.mark.parametrize("n,d", [(0, 3), (1, 1), (7, 9), (64, 27)])
def test_outer_ema_matches_definition(n, d, S, dtype):
    F0 = random_spd(n, d=d, dtype=dtype, seed=3)
    G = randn(n, d, dtype=dtype) if S is None else randn(n, S, d, dtype=dtype)
    F = F0.clone()
    out = mk.linalg.outer_ema_(F, G, 0.9, backend="torch")
    assert out is F
    Gs = G.unsqueeze(-2) if S is None else G
    expected = 0.9 * F0 + 0.1 * torch.einsum("nsi,nsj->nij", Gs, Gs) / Gs.shape[-2]
    torch.testing.assert_close(F, expected, **tol(dtype))
    assert torch.equal(F, F.mT)


def test_outer_ema_beta_edges():
    F0 = random_spd(4, d=3)
    G = randn(4, 3)
    F = mk.linalg.outer_ema_(F0.clone(), G, 1.0, backend="torch")
    torch.testing.assert_close(F, F0)
    F = mk.linalg.outer_ema_(F0.clone(), G, 0.0, backend="torch")
    torch.testing.assert_close(F, G.unsqueeze(-1) * G.unsqueeze(-2))


def test_leading_batch_dims_and_broadcasting():
    A = random_spd(2, 3, d=4)
    # B.ndim == A.ndim - 1 makes B a vector batch (MBF_SPEC 5); its batch (1, 3) broadcasts
    # against A's (2, 3).
    b = randn(1, 3, 4)
    x = mk.linalg.solve_spd(A, b, backend="torch")
    assert x.shape == (2, 3, 4)
    torch.testing.assert_close(x, torch.linalg.solve(A, b.expand(2, 3, 4)))
    B = randn(4, 2)  # one (d, k) matrix for every A
    X = mk.linalg.solve_spd(A, B, backend="torch")
    assert X.shape == (2, 3, 4, 2)
    torch.testing.assert_close(X, torch.linalg.solve(A, B))
    single = mk.linalg.solve_spd(A[0, 0], randn(4), backend="torch")  # unbatched
    assert single.shape == (4,)


def test_non_contiguous_inputs():
    A = random_spd(5, d=6)
    b = randn(5, 6)
    An, bn = non_contiguous(A), non_contiguous(b)
    torch.testing.assert_close(mk.linalg.solve_spd(An, bn, backend="torch"),
                               torch.linalg.solve(A, b))
    F = non_contiguous(A.clone())
    mk.linalg.outer_ema_(F, b, 0.5, backend="torch")
    torch.testing.assert_close(F, 0.5 * A + 0.5 * b.unsqueeze(-1) * b.unsqueeze(-2))


def test_only_lower_triangle_is_read():
    A = random_spd(3, d=5)
    garbage = A + torch.triu(torch.full_like(A, 7.0), diagonal=1)
    torch.testing.assert_close(mk.linalg.cholesky(garbage, backend="torch"),
                               torch.linalg.cholesky(A))


def test_not_positive_definite_matches_torch():
    A = random_spd(4, d=5)
    A[2, 3, 3] = -10.0  # leading minor of order 4 of batch element 2 fails
    _, info_torch = torch.linalg.cholesky_ex(A)
    L, info = mk.linalg.cholesky_ex(A, backend="torch")
    assert info.dtype == torch.int32
    assert info.tolist() == info_torch.tolist() == [0, 0, 4, 0]
    with pytest.raises(torch.linalg.LinAlgError, match=r"Batch element 2.*order 4"):
        mk.linalg.cholesky(A, backend="torch")
    with pytest.raises(torch.linalg.LinAlgError, match="Batch element 2"):
        mk.linalg.cholesky_ex(A, check_errors=True, backend="torch")
    with pytest.raises(torch.linalg.LinAlgError, match="solve_spd"):
        mk.linalg.solve_spd(A, randn(4, 5), backend="torch")
    with pytest.raises(torch.linalg.LinAlgError, match="inv_spd"):
        mk.linalg.inv_spd(A, backend="torch")
    # Enough damping makes the same matrices positive definite.
    mk.linalg.cholesky(A, damping=20.0, backend="torch")


def test_non_finite_input_is_reported_in_info():
    A = random_spd(3, d=4)
    A[0, 2, 2] = float("inf")  # LAPACK accepts +Inf pivots; the reference must not
    A[1, 3, 1] = float("nan")
    _, info = mk.linalg.cholesky_ex(A, backend="torch")
    assert info.tolist() == [3, 4, 0]


def test_reference_is_differentiable():
    A = random_spd(2, d=3).requires_grad_()
    b = randn(2, 3)
    mk.linalg.solve_spd(A, b, damping=0.1).sum().backward()  # auto -> torch under autograd
    assert A.grad is not None and torch.isfinite(A.grad).all()
