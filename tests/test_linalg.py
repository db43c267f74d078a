"""The dense linalg ops (cholesky_ex, cholesky_solve, solve_spd, inv_spd, outer_ema_): the torch
reference against torch.linalg and known mathematics; every compiled backend, on every device it
runs on here, against the reference, anchored to an fp64 computation (each backend's error
against fp64 no worse than 2x plain PyTorch's at the same precision, failure handling alike);
and bad input at the public boundary, which raises a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
import samples
from conftest import (BLOCK_DIMS, DTYPES, assert_close_fp64_anchored, assert_refuses_block_size,
                      batch_sizes_for, non_contiguous, randn, random_spd, targets)
from mbf_kernels import dispatch

CASES = [(n, d) for d in BLOCK_DIMS for n in batch_sizes_for(d)]
L = mk.linalg
A = random_spd(3, d=4)


# ---------------------------------------------------------------------------------------------
# The torch reference against torch.linalg and known mathematics




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


# ---------------------------------------------------------------------------------------------
# Every compiled backend, on its device, against the reference

# A batch past one program's tiles on a GPU (70,001 blocks); the CPU targets skip it (the
# interpreter would take minutes, and the C++ kernels meet 1000 already).
GPU_CASES = [(70_001, d) for d in (1, 9, 16, 25, 33)]


def _case(target, n, d):
    """The (n, d) case on ``target``: None to run it, else the reason it is skipped."""
    if n > 1000 and target.device != "cuda":
        return "large batches run on GPU targets only"
    return None


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES + GPU_CASES)
def test_cholesky_ex(target, n, d, dtype):
    if why := _case(target, n, d):
        pytest.skip(why)
    backend = target.backend
    A64, damping = target.to(samples.cholesky_ex(n, d, torch.float64)[0]), 0.05
    A = A64.to(dtype)
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(backend, d,
                                         lambda: mk.linalg.cholesky_ex(A, backend=backend))
    L, info = mk.linalg.cholesky_ex(A, damping, backend=backend)
    L_torch, info_torch = mk.linalg.cholesky_ex(A, damping, backend="torch")
    L_exact, _ = mk.linalg.cholesky_ex(A64, damping, backend="torch")
    assert L.dtype == dtype and info.dtype == torch.int32 and L.shape == A.shape
    assert torch.equal(info, info_torch)
    assert torch.equal(L, torch.tril(L))
    assert_close_fp64_anchored(L, L_torch, L_exact, what=f"cholesky {backend}")


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES + GPU_CASES)
@pytest.mark.parametrize("k", [None, 3])
def test_solve_spd(target, n, d, dtype, k):
    if why := _case(target, n, d):
        pytest.skip(why)
    backend = target.backend
    A64, B64, damping = samples.solve_spd_ex(n, d, torch.float64, target.device, k=k or 1)
    if k is None:
        B64 = B64[..., 0]
    A, B = A64.to(dtype), B64.to(dtype)
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(backend, d,
                                         lambda: mk.linalg.solve_spd(A, B, backend=backend))
    X = mk.linalg.solve_spd(A, B, damping, backend=backend)
    assert X.shape == B.shape and X.dtype == dtype
    assert_close_fp64_anchored(
        X,
        mk.linalg.solve_spd(A, B, damping, backend="torch"),
        mk.linalg.solve_spd(A64, B64, damping, backend="torch"),
        what=f"solve_spd {backend}",
    )


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES)
@pytest.mark.parametrize("layout", ["column_major", "row_major"])
def test_cholesky_solve(target, n, d, dtype, layout):
    """torch.linalg.cholesky's factors are column-major (the cpu kernels read them in place);
    mk.linalg.cholesky's are row-major: both layouts on every backend."""
    backend = target.backend
    B64, L64 = samples.cholesky_solve(n, d, torch.float64, target.device)
    assert L64.mT.is_contiguous()  # as torch.linalg.cholesky returns it
    L, B = L64.to(dtype), B64.to(dtype)
    if layout == "row_major":
        L = L.contiguous()
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(backend, d,
                                         lambda: mk.linalg.cholesky_solve(B, L, backend=backend))
    assert_close_fp64_anchored(
        mk.linalg.cholesky_solve(B, L, backend=backend),
        mk.linalg.cholesky_solve(B, L, backend="torch"),
        torch.cholesky_solve(B64, L64),
        what=f"cholesky_solve {backend}",
    )


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES + GPU_CASES)
def test_inv_spd(target, n, d, dtype):
    if why := _case(target, n, d):
        pytest.skip(why)
    backend = target.backend
    A64, damping = samples.inv_spd_ex(n, d, torch.float64, target.device)
    A = A64.to(dtype)
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(backend, d, lambda: mk.linalg.inv_spd(A, backend=backend))
    damped = A64 + damping * torch.eye(d, dtype=torch.float64, device=A64.device)
    assert_close_fp64_anchored(
        mk.linalg.inv_spd(A, damping, backend=backend),
        mk.linalg.inv_spd(A, damping, backend="torch"),
        mk.linalg.inv_spd(A64, damping, backend="torch"),
        what=f"inv_spd {backend}",
        cond=float(torch.linalg.cond(damped).max()) if n else 1.0,
    )


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", CASES + GPU_CASES)
@pytest.mark.parametrize("S", [None, 4])
def test_outer_ema(target, n, d, S, dtype):
    if why := _case(target, n, d):
        pytest.skip(why)
    backend = target.backend
    F64, G64, beta = samples.outer_ema_(n, d, torch.float64, target.device, S=S or 1)
    if S is None:
        G64 = G64[:, 0]
    F, G = F64.to(dtype), G64.to(dtype)
    if not dispatch.covers(backend, d):
        return assert_refuses_block_size(
            backend, d, lambda: mk.linalg.outer_ema_(F.clone(), G, beta, backend=backend))
    ours = mk.linalg.outer_ema_(F.clone(), G, beta, backend=backend)
    assert torch.equal(ours, ours.mT)  # exactly symmetric
    assert_close_fp64_anchored(
        ours,
        mk.linalg.outer_ema_(F.clone(), G, beta, backend="torch"),
        mk.linalg.outer_ema_(F64.clone(), G64, beta, backend="torch"),
        what=f"outer_ema_ {backend}",
    )


@pytest.mark.parametrize("target", targets())
def test_broadcast_and_non_contiguous(target):
    backend = target.backend
    A = target.to(random_spd(2, 3, d=9, dtype=torch.float32))
    B = target.to(randn(9, 2, dtype=torch.float32))
    expected = mk.linalg.solve_spd(A, B, backend="torch")
    torch.testing.assert_close(mk.linalg.solve_spd(non_contiguous(A), B, backend=backend), expected)
    F = non_contiguous(target.to(random_spd(5, d=9, dtype=torch.float32)))
    G = non_contiguous(target.to(randn(5, 9, dtype=torch.float32)))
    expected = mk.linalg.outer_ema_(F.clone(), G, 0.5, backend="torch")
    torch.testing.assert_close(mk.linalg.outer_ema_(F, G, 0.5, backend=backend), expected)


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", DTYPES)
def test_failed_blocks_are_reported_and_isolated(target, dtype):
    backend = target.backend
    A = random_spd(6, d=9, dtype=dtype)
    A[1, 4, 4] = -5.0             # not positive definite at order 5
    A[3, 6, 2] = float("nan")      # NaN below the diagonal: fails at row 7
    A[4, 0, 0] = float("inf")      # +Inf pivot: accepted by LAPACK, rejected by us
    A = target.to(A)
    L, info = mk.linalg.cholesky_ex(A, backend=backend)
    _, info_ref = mk.linalg.cholesky_ex(A, backend="torch")
    assert info.tolist() == info_ref.tolist() == [0, 5, 0, 7, 1, 0]
    good = info == 0
    L_ref, _ = mk.linalg.cholesky_ex(A[good], backend="torch")
    torch.testing.assert_close(L[good], L_ref)  # neighbours of bad blocks are untouched

    B = target.to(randn(6, 9, dtype=dtype))
    X, info_s = dispatch.module(backend).solve_spd_ex(A, B.unsqueeze(-1), 0.0)
    assert info_s.tolist() == info.tolist()
    assert torch.isfinite(X).all()
    assert (X[~good] == 0).all()  # failed blocks come back as zeros, never NaN
    torch.testing.assert_close(
        X[good].squeeze(-1), mk.linalg.solve_spd(A[good], B[good], backend="torch")
    )
    with pytest.raises(torch.linalg.LinAlgError, match="Batch element 1"):
        mk.linalg.solve_spd(A, B, backend=backend)


@pytest.mark.parametrize("target", targets())
def test_damping_rescues_indefinite(target):
    backend = target.backend
    A = target.to(torch.diag_embed(torch.tensor([[1.0, -0.5, 2.0]])))
    _, info = mk.linalg.cholesky_ex(A, 0.0, backend=backend)
    assert info.tolist() == [2]
    L = mk.linalg.cholesky(A, 1.0, backend=backend)
    torch.testing.assert_close(L.cpu(), torch.diag_embed(torch.tensor([[2.0, 0.5, 3.0]]).sqrt()))


# ---------------------------------------------------------------------------------------------
# Bad input at the public boundary


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: L.cholesky(torch.zeros(3, 4)), ValueError, r"cholesky_ex: A must be a square"),
        (lambda: L.cholesky(torch.zeros(4)), ValueError, r"A must be a square.*\(4,\)"),
        (lambda: L.solve_spd(torch.zeros(2, 3, 4), randn(2, 3)), ValueError, "solve_spd: A must be a square"),
        (lambda: L.inv_spd(torch.zeros(5, 2)), ValueError, "inv_spd: A must be a square"),
        (lambda: L.cholesky_solve(randn(3, 4), torch.zeros(3, 4, 5)), ValueError, "cholesky_solve: L must be a square"),
        (lambda: L.outer_ema_(torch.zeros(3, 2), randn(3, 2), 0.5), ValueError, "outer_ema_: F must be a square"),
        (lambda: L.cholesky([[1.0]]), TypeError, "A must be a torch.Tensor, got list"),
    ],
)
def test_non_square(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize(
    "B, pattern",
    [
        (randn(3, 5), r"B must have shape.*d = 4.*got \(3, 5\)"),   # vector of the wrong length
        (randn(3, 5, 2), r"B must have shape.*got \(3, 5, 2\)"),     # matrix with the wrong d
        (randn(2, 4), r"batch dimensions of A \(3,\) and B \(2,\) do not broadcast"),
        (randn(2, 4, 1), r"batch dimensions of A \(3,\) and B \(2,\) do not broadcast"),
    ],
)
def test_mismatched_rhs(B, pattern):
    with pytest.raises(ValueError, match=pattern):
        L.solve_spd(A, B)


def test_mismatched_outer_ema_vectors():
    F = random_spd(3, d=4)
    with pytest.raises(ValueError, match=r"G must end in \(S, 4\)"):
        L.outer_ema_(F, randn(3, 5), 0.5)
    with pytest.raises(ValueError, match=r"G must end in \(S, 4\) with S >= 1"):
        L.outer_ema_(F, torch.zeros(3, 0, 4, dtype=F.dtype), 0.5)
    with pytest.raises(ValueError, match="G must have shape"):
        L.outer_ema_(F, randn(4), 0.5)
    with pytest.raises(ValueError, match=r"batch dimensions of G \(2, 3\) must broadcast"):
        # (2, 3) and (1, 3) broadcast, but not to F's (1, 3): F is updated in place.
        L.outer_ema_(random_spd(1, 3, d=4), randn(2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="batch dimensions of F"):
        L.outer_ema_(F, randn(2, 1, 4), 0.5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dtype(dtype):
    with pytest.raises(TypeError, match=f"A must be float32 or float64, got integer {dtype}|got {dtype}"):
        L.cholesky(torch.eye(3).to(dtype))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_dtype(dtype):
    with pytest.raises(TypeError, match=f"A must be float32 or float64, got complex {dtype}"):
        L.solve_spd(torch.eye(3, dtype=dtype), torch.ones(3, dtype=dtype))
    with pytest.raises(TypeError, match="G must be float32 or float64, got complex"):
        L.outer_ema_(torch.eye(3), torch.ones(3, dtype=dtype), 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtype(dtype):
    with pytest.raises(TypeError, match=f"A must be float32 or float64, got {dtype}"):
        L.inv_spd(torch.eye(3, dtype=dtype))


def test_mixed_dtypes():
    with pytest.raises(TypeError, match="B has dtype torch.float32 but A has dtype torch.float64"):
        L.solve_spd(A, randn(3, 4, dtype=torch.float32))
    with pytest.raises(TypeError, match="G has dtype torch.float32 but F has dtype torch.float64"):
        L.outer_ema_(A.clone(), randn(3, 4, dtype=torch.float32), 0.5)


def test_mixed_devices():
    meta_b = torch.empty(3, 4, dtype=A.dtype, device="meta")
    with pytest.raises(ValueError, match="B is on device meta but A is on device cpu"):
        L.solve_spd(A, meta_b)
    with pytest.raises(ValueError, match="B is on device meta but L is on device cpu"):
        L.cholesky_solve(meta_b, A)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), -float("inf")])
def test_bad_damping(bad):
    for call in (
        lambda: L.cholesky(A, damping=bad),
        lambda: L.cholesky_ex(A, damping=bad),
        lambda: L.solve_spd(A, randn(3, 4), damping=bad),
        lambda: L.inv_spd(A, damping=bad),
    ):
        with pytest.raises(ValueError, match="damping must be finite and >= 0"):
            call()


@pytest.mark.parametrize("bad", [None, "0.1", True, torch.tensor(0.1)])
def test_damping_type(bad):
    with pytest.raises(TypeError, match="damping must be a real number"):
        L.cholesky(A, damping=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_beta(bad):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        L.outer_ema_(A.clone(), randn(3, 4), bad)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of .*got 'lapack'"):
        L.cholesky(A, backend="lapack")


def test_unavailable_backend_explains_why():
    status = mk.backends()["cuda"]
    assert not status.available or torch.cuda.is_available()
    if not status.available:
        with pytest.raises(RuntimeError, match=f"backend 'cuda' is not available: .*{status.detail[:20]}"):
            L.cholesky(A, backend="cuda")


@pytest.mark.skipif(not mk.backends()["cpu"].available, reason="C++ kernels not built")
def test_compiled_backend_refuses_autograd():
    Ag = A.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="backend 'cpu' is not differentiable"):
        L.cholesky(Ag, backend="cpu")
    with torch.no_grad():
        L.cholesky(Ag, backend="cpu")  # fine without autograd


def test_sparse_input():
    with pytest.raises(TypeError, match="A must be a dense"):
        L.cholesky(torch.eye(3).to_sparse())


def test_meta_tensors_give_shapes_as_torch_linalg_does():
    """On meta tensors (shape inference, deferred init) the ops return the shapes and dtypes
    torch.linalg would, with no values to check."""
    A = torch.empty(2, 5, 9, 9, device="meta")
    B = torch.empty(2, 5, 9, 3, device="meta")
    assert L.solve_spd(A, B).shape == (2, 5, 9, 3)
    assert L.cholesky(A).shape == torch.linalg.cholesky(A).shape
    assert L.inv_spd(A.double()).dtype == torch.float64
    factor, info = L.cholesky_ex(A)
    assert factor.shape == A.shape and info.shape == (2, 5)
