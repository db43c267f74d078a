"""The fused MBF step kernel against the plain-PyTorch reference step (MBF_SPEC section 3, 4)."""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
from mbf_kernels import compact, dispatch
from mbf_kernels.packed import pack_tril
from conftest import STEP_TOL as TOL, StepBucket, randn

pytestmark = pytest.mark.skipif(
    not mk._extension.AVAILABLE, reason=f"C++ kernels not built: {mk._extension.LOAD_ERROR}"
)


def Bucket(n, d, dtype):
    """A bucket stepped by the reference and by the compiled C++ fused step."""
    return StepBucket(n, d, dtype, mk._extension.mbf_step_)


def schedule(k, t1, t2):
    """Flags of step k (1-based) for curvature every t1 and refactor every t2 steps."""
    return dict(update_curvature=(k - 1) % t1 == 0, first_curvature=k == 1, refactor=(k - 1) % t2 == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 4, 9, 10, 27, 33])
@pytest.mark.parametrize("n", [1, 7, 16, 37])
@pytest.mark.parametrize("decoupled", [False, True])
def test_steps_match_reference(n, d, dtype, decoupled):
    bucket = Bucket(n, d, dtype)
    hyper = dict(lr=0.05, momentum_coef=0.9, beta=0.9, damping=0.1, weight_decay=0.01,
                 decoupled_weight_decay=decoupled)
    for k in range(1, 8):  # T1 = 2, T2 = 3: neither divides the other
        grad = randn(n, d, dtype=dtype, seed=100 + k)
        bucket.step(grad, **hyper, **schedule(k, 2, 3))
        bucket.assert_matches(dtype, f"after step {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_step_is_exact_preconditioned_gradient(dtype):
    """Step 1: F = g g^T, m = g, p -= lr (g g^T + lambda I)^{-1} g  (known closed form)."""
    n, d, lam, lr = 20, 9, 0.5, 0.1
    bucket = Bucket(n, d, dtype)
    p0 = bucket.p.clone()
    g = randn(n, d, dtype=dtype, seed=7)
    bucket.step(g, lr=lr, momentum_coef=0.9, beta=0.9, damping=lam, weight_decay=0.0,
                decoupled_weight_decay=False, **schedule(1, 10, 100))
    # Sherman-Morrison: (g g^T + lam I)^{-1} g = g / (lam + |g|^2)
    expected = p0 - lr * g / (lam + (g * g).sum(-1, keepdim=True))
    torch.testing.assert_close(bucket.p, expected, **TOL[dtype])
    torch.testing.assert_close(compact.from_compact(bucket.F, n), pack_tril(g[:, :, None] * g[:, None, :]), **TOL[dtype])


def test_non_finite_gradient_skips_that_blocks_curvature_only():
    n, d = 20, 9
    bucket = Bucket(n, d, torch.float32)
    hyper = dict(lr=0.01, momentum_coef=0.9, beta=0.5, damping=0.1, weight_decay=0.0,
                 decoupled_weight_decay=False)
    bucket.step(randn(n, d, dtype=torch.float32, seed=1), **hyper, **schedule(1, 1, 1))
    F_before = compact.from_compact(bucket.F, n).clone()
    grad = randn(n, d, dtype=torch.float32, seed=2)
    grad[3, 4] = float("nan")
    grad[17, 0] = float("inf")
    bucket.step(grad, **hyper, **schedule(2, 1, 1))
    F_after = compact.from_compact(bucket.F, n)
    assert bucket.stats.tolist() == [2, 0]
    torch.testing.assert_close(F_after[[3, 17]], F_before[[3, 17]], rtol=0, atol=0)
    assert torch.isfinite(F_after).all() and torch.isfinite(compact.from_compact(bucket.L, n)).all()
    changed = (F_after != F_before).any(-1)
    assert changed.sum() == n - 2  # every other block was refreshed
    others = torch.ones(n, dtype=torch.bool)
    others[[3, 17]] = False
    assert torch.isfinite(bucket.p[others]).all()  # the bad gradients touch only their blocks
    bucket.assert_matches(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_failed_factorisation_falls_back_to_the_diagonal(dtype):
    """Blocks whose damped curvature is not PD take 1/sqrt(F_ii + lambda) (or 1/sqrt(lambda))."""
    n, d, lam = 20, 4, 0.01
    bucket = Bucket(n, d, dtype)
    F = torch.eye(d, dtype=dtype).repeat(n, 1, 1) * 2          # SPD neighbours
    F[2] = -torch.eye(d, dtype=dtype)                       # fails at order 1; no usable diagonal
    F[9] = torch.diag(torch.tensor([1.0, -1.0, 3.0, 1.0], dtype=dtype))  # fails at order 2
    F[14, 3, 1] = F[14, 1, 3] = float("nan")                # non-finite entry: fails at order 4
    bucket.F_ref.copy_(pack_tril(F))
    bucket.F.copy_(compact.to_compact(bucket.F_ref))
    grad = randn(n, d, dtype=dtype, seed=4)
    bucket.step(grad, lr=0.1, momentum_coef=0.0, beta=0.9, damping=lam, weight_decay=0.0,
                decoupled_weight_decay=False, update_curvature=False, first_curvature=False,
                refactor=True)
    assert bucket.stats.tolist() == [0, 3]
    bucket.assert_matches(dtype)
    assert torch.isfinite(bucket.p).all()
    L = compact.cholesky_from_factor(compact.from_compact(bucket.L, n))
    expected_diag = {
        2: torch.full((d,), lam ** 0.5, dtype=dtype),           # F_ii + lambda < 0 everywhere
        # per entry: sqrt(F_ii + lambda) where that is positive, else sqrt(lambda)
        9: torch.tensor([1 + lam, lam, 3 + lam, 1 + lam], dtype=dtype).sqrt(),
        14: torch.full((d,), (2 + lam) ** 0.5, dtype=dtype),
    }
    for b, diag in expected_diag.items():
        torch.testing.assert_close(L[b], torch.diag(diag), **TOL[dtype])


def test_compact_round_trip():
    P = randn(37, 45)
    C = compact.to_compact(P)
    assert C.shape == compact.compact_shape(37, 9) == (3, 45, 16)
    assert torch.equal(compact.from_compact(C, 37), P)
    assert torch.equal(C[1, :, 2], P[18])  # block 18 = tile 1, lane 2


# --------------------------------------------------------------------------------------------
# The step's phases as standalone ops on the compact layout, every backend against the torch one.

from conftest import assert_refuses_block_size, compiled_backends, random_spd  # noqa: E402


@pytest.mark.parametrize("backend", compiled_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 4, 9, 10, 27, 33])
@pytest.mark.parametrize("n", [0, 1, 7, 16, 37])
def test_compact_ops_match_reference(backend, n, d, dtype):
    tol = TOL[dtype]
    F = compact.to_compact(pack_tril(random_spd(n, d=d, dtype=dtype, seed=9)))
    G = randn(n, d, dtype=dtype, seed=10)
    if not dispatch.covers(backend, d, step=True):
        return assert_refuses_block_size(
            backend, d, lambda: compact.outer_ema_(F.clone(), G, 0.8, backend=backend))
    ours = compact.outer_ema_(F.clone(), G, 0.8, backend=backend)
    ref = compact.outer_ema_(F.clone(), G, 0.8, backend="torch")
    torch.testing.assert_close(compact.from_compact(ours, n), compact.from_compact(ref, n), **tol)

    factor, info = compact.cholesky_ex(ref, n, 0.05, backend=backend)
    factor_ref, info_ref = compact.cholesky_ex(ref, n, 0.05, backend="torch")
    assert info.dtype == torch.int32 and torch.equal(info, info_ref)
    torch.testing.assert_close(compact.from_compact(factor, n), compact.from_compact(factor_ref, n), **tol)

    B = randn(n, d, dtype=dtype, seed=11)
    X = compact.solve(factor, B, backend=backend)
    torch.testing.assert_close(X, compact.solve(factor_ref, B, backend="torch"), **tol)
    # and it is the solve of the damped curvature itself
    A = mk.packed.unpack_tril(compact.from_compact(ref, n)) + 0.05 * torch.eye(d, dtype=dtype)
    if n:
        torch.testing.assert_close(X, torch.linalg.solve(A, B), **tol)


@pytest.mark.parametrize("backend", compiled_backends())
def test_compact_cholesky_reports_failures(backend):
    n, d = 20, 4
    F = torch.eye(d).repeat(n, 1, 1)
    F[3, 2, 2] = -1.0
    F[11, 0, 0] = float("nan")
    factor, info = compact.cholesky_ex(compact.to_compact(pack_tril(F)), n, 0.0, backend=backend)
    assert info.tolist() == [0] * 3 + [3] + [0] * 7 + [1] + [0] * 8
    rows = compact.from_compact(factor, n)
    assert (rows[[3, 11]] == 0).all() and torch.isfinite(rows).all()


def test_compact_ops_validate():
    F = torch.zeros(compact.compact_shape(20, 4))
    with pytest.raises(ValueError, match=r"F must have the compact shape \(3, 10, 16\) for 33 blocks"):
        compact.outer_ema_(F, torch.zeros(33, 4), 0.5)  # 2 tiles hold at most 32 blocks
    with pytest.raises(TypeError, match="G has dtype torch.float64 but F has dtype torch.float32"):
        compact.outer_ema_(F, torch.zeros(20, 4, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        compact.outer_ema_(F, torch.zeros(20, 4), 2.0)
    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        compact.cholesky_ex(F, 20, -1.0)
    with pytest.raises(ValueError, match="B must have shape"):
        compact.solve(F, torch.zeros(20, 4, 1))
