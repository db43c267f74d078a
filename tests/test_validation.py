"""Bad input at the public boundary raises a clear error that names the argument."""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
from conftest import randn, random_spd

L = mk.linalg
A = random_spd(3, d=4)


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
