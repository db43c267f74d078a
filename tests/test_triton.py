"""The Triton kernels against the plain-PyTorch reference: compact outer-product EMA, damped
Cholesky, solve with a cached factor, the fused step (every branch) and the bucket step through
the optimizer. Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), so sizes stay small; with one, the same tests run on CUDA tensors."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import mbf_kernels as mk  # noqa: E402
from mbf_kernels import compact, reference  # noqa: E402
from mbf_kernels import triton as mt  # noqa: E402
from mbf_kernels.packed import pack_tril  # noqa: E402
from conftest import STEP_TOL as TOL, StepBucket, randn  # noqa: E402
from test_optimizer import OPTIONS, batches, flat, make_net, train  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

# d = 1, a non-power of two on each side of 8, and a hot size; N = 0, one partial tile, and
# more than one program of 64 blocks with a ragged end.
CASES = [(d, n) for d in (1, 2, 9, 10) for n in (0, 7, 37)] + [(9, 70)]


def spd_rows(n, d, dtype, seed=0):
    G = randn(n, d + 2, d, dtype=torch.float64, seed=seed)
    return pack_tril(G.mT @ G / (d + 2)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, n", CASES)
def test_compact_ops_match_reference(d, n, dtype):
    F = compact.to_compact(spd_rows(n, d, dtype)).to(DEVICE)
    g = randn(n, d, dtype=dtype, seed=2).to(DEVICE)
    F_ref, F_tri = F.clone(), F.clone()
    reference.compact_outer_ema_(F_ref, g, 0.9)
    mt.compact_outer_ema_(F_tri, g, 0.9)
    torch.testing.assert_close(F_tri, F_ref, **TOL[dtype])
    L_ref, info_ref = reference.compact_cholesky_ex(F_ref, n, 0.05)
    L, info = mt.compact_cholesky_ex(F_ref, n, 0.05)
    assert torch.equal(info.cpu(), info_ref.cpu()) and not info.any()
    torch.testing.assert_close(compact.from_compact(L, n), compact.from_compact(L_ref, n),
                               **TOL[dtype])
    B = randn(n, d, dtype=dtype, seed=3).to(DEVICE)
    torch.testing.assert_close(mt.compact_solve(L, B), reference.compact_solve(L_ref, B),
                               **TOL[dtype])


def test_cholesky_reports_each_failing_block_and_zeroes_it():
    d, n = 4, 20
    rows = spd_rows(n, d, torch.float64)
    dense = mk.packed.unpack_tril(rows)
    dense[3, 2, 2] = -5.0  # indefinite at pivot 3
    dense[7, 0, 0] = float("nan")  # not finite at pivot 1
    dense[11] = 0.0  # singular at damping 0: pivot 1
    F = compact.to_compact(pack_tril(dense)).to(DEVICE)
    L, info = mt.compact_cholesky_ex(F, n, 0.0)
    L_ref, info_ref = reference.compact_cholesky_ex(F, n, 0.0)
    assert info.cpu().tolist() == info_ref.cpu().tolist()
    assert {i: v for i, v in enumerate(info.tolist()) if v} == {3: 3, 7: 1, 11: 1}
    rows_out = compact.from_compact(L, n)
    assert not rows_out[[3, 7, 11]].any()
    torch.testing.assert_close(rows_out, compact.from_compact(L_ref, n), rtol=1e-12, atol=0)


def Pair(n, d, dtype):
    """A bucket stepped by the reference and by the Triton fused step."""
    return StepBucket(n, d, dtype, mt.mbf_step_, device=DEVICE, seed=4)


# Steps 1-4 with T1 = 2, T2 = 3: first refresh + refactor, cached, refresh, refactor only...
SCHEDULE = [dict(update_curvature=True, first_curvature=True, refactor=True),
            dict(update_curvature=False, first_curvature=False, refactor=False),
            dict(update_curvature=True, first_curvature=False, refactor=False),
            dict(update_curvature=False, first_curvature=False, refactor=True),
            dict(update_curvature=True, first_curvature=False, refactor=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, n, decoupled", [(1, 7, False), (9, 37, False), (9, 37, True),
                                             (10, 16, True), (2, 0, False)])
def test_fused_step_matches_reference_on_every_branch(d, n, decoupled, dtype):
    pair = Pair(n, d, dtype)
    exact = Pair(n, d, torch.float64)  # the float64 reference: what float32 is judged against
    hyper = dict(lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.01,
                 decoupled_weight_decay=decoupled)
    for k, flags in enumerate(SCHEDULE):
        g = randn(n, d, dtype=torch.float64, seed=10 + k).to(DEVICE)
        pair.step(g.to(dtype), **hyper, **flags)
        exact.step(g, **hyper, **flags)
        if dtype == torch.float64:
            pair.assert_matches(dtype, f"step {k + 1} {flags}")
        elif n:
            # float32 after a rank-deficient first curvature is ill-conditioned; as
            # flash-attention does, Triton must be no worse than 2x torch's own float32 error.
            ours = (pair.p.double() - exact.p_ref).abs().max()
            torchs = (pair.p_ref.double() - exact.p_ref).abs().max()
            assert ours <= 2 * torchs + 1e-6, (k, float(ours), float(torchs))
            assert pair.stats.tolist() == pair.stats_ref.tolist()


def test_fused_step_non_finite_gradient_and_failed_factor():
    """A NaN gradient skips only its block's curvature refresh; a block whose factor fails at
    damping 0 gets the diagonal preconditioner; both are counted, as in the reference."""
    d, n = 3, 20
    pair = Pair(n, d, torch.float64)
    hyper = dict(lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.0, weight_decay=0.0,
                 decoupled_weight_decay=False)
    g = randn(n, d, dtype=torch.float64, seed=5).to(DEVICE)
    g[4, 1] = float("nan")
    pair.step(g, **hyper, **SCHEDULE[0])  # rank-1 blocks at damping 0: every factor fails
    pair.assert_matches(torch.float64, "first step")
    assert pair.stats.tolist() == [1, n]  # the NaN block kept F = 0: its factor fails too
    g2 = randn(n, d, dtype=torch.float64, seed=6).to(DEVICE)
    pair.step(g2, **dict(hyper, damping=0.1), **SCHEDULE[4])
    pair.assert_matches(torch.float64, "second step")


def test_optimizer_triton_backend_matches_torch_backend():
    """backend='triton' through the bucket op (strided rows, bias tails, per-segment flags) on
    the optimizer test net: the same trajectory as the torch bucket step."""
    out = []
    for backend in ("torch", "triton"):
        model = make_net().to(DEVICE)
        train(model, mk.MBF.from_model(model, backend=backend, **OPTIONS),
              [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches(4)])
        out.append(flat(model))
    torch.testing.assert_close(out[1], out[0], rtol=1e-9, atol=1e-11)


def test_triton_backend_refuses_a_device_it_cannot_run_on():
    w = torch.nn.Parameter(torch.randn(2, 1, 3, 3, device="meta"))
    w.grad = torch.zeros_like(w)
    with pytest.raises(RuntimeError, match="backend 'triton' runs on CUDA tensors"):
        mk.MBF([w], backend="triton").step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_step_on_cuda_large_bucket():
    pair = Pair(100_000, 9, torch.float32)
    hyper = dict(lr=0.01, momentum_coef=0.9, beta=0.9, damping=0.1, weight_decay=0.0,
                 decoupled_weight_decay=False)
    for k, flags in enumerate(SCHEDULE):
        pair.step(randn(100_000, 9, dtype=torch.float32, seed=k).cuda(), **hyper, **flags)
    pair.assert_matches(torch.float32, "cuda")
