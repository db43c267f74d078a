"""The CUDA-tensor backends (Triton's compiled kernels and the CUDA extension) against the torch
reference on a GPU: the linalg ops, the compact ops, the fused step on every branch, the
optimizer with backend='auto' choosing per block size, and moving a saved run between CPU and
GPU. Every test here needs a CUDA device (marker `gpu`) and skips cleanly without one; the
Triton kernels' own tests (test_triton.py) also run on the GPU when there is one."""

from __future__ import annotations

import pytest
import torch

import mbf_kernels as mk
from mbf_kernels import compact, dispatch, reference
from mbf_kernels.packed import pack_tril
from conftest import STEP_TOL, StepBucket, assert_close_fp64_anchored, randn, random_spd
from test_optimizer import OPTIONS, batches, flat, make_net, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cuda_backends():
    status = mk.backends()
    return [pytest.param(name, marks=pytest.mark.skipif(not status[name].available,
                                                        reason=status[name].detail), id=name)
            for name in ("triton", "cuda")]


BACKENDS = _cuda_backends()
DIMS = (1, 2, 9, 10, 16, 25, 33)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", [0, 7, 1000, 70_001])
def test_linalg_ops_match_reference(backend, d, n, dtype):
    if not dispatch.covers(backend, d):
        pytest.skip(f"{backend} takes d <= {dispatch.max_block_size(backend)}")
    A64 = random_spd(n, d=d).cuda()
    A, B64 = A64.to(dtype), randn(n, d, 3).cuda()
    B = B64.to(dtype)
    L, info = mk.linalg.cholesky_ex(A, 0.05, backend=backend)
    L_t, info_t = mk.linalg.cholesky_ex(A, 0.05, backend="torch")
    assert torch.equal(info, info_t)
    assert_close_fp64_anchored(L, L_t, mk.linalg.cholesky_ex(A64, 0.05, backend="torch")[0],
                               what=f"cholesky {backend}")
    assert_close_fp64_anchored(mk.linalg.solve_spd(A, B, 0.01, backend=backend),
                               mk.linalg.solve_spd(A, B, 0.01, backend="torch"),
                               mk.linalg.solve_spd(A64, B64, 0.01, backend="torch"),
                               what=f"solve_spd {backend}")
    assert_close_fp64_anchored(mk.linalg.inv_spd(A, 0.1, backend=backend),
                               mk.linalg.inv_spd(A, 0.1, backend="torch"),
                               mk.linalg.inv_spd(A64, 0.1, backend="torch"),
                               what=f"inv_spd {backend}")
    G64 = randn(n, 4, d).cuda()
    ours = mk.linalg.outer_ema_(A.clone(), G64.to(dtype), 0.9, backend=backend)
    assert torch.equal(ours, ours.mT)
    assert_close_fp64_anchored(ours, mk.linalg.outer_ema_(A.clone(), G64.to(dtype), 0.9,
                                                          backend="torch"),
                               mk.linalg.outer_ema_(A64.clone(), G64, 0.9, backend="torch"),
                               what=f"outer_ema_ {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", DIMS + (64,))
def test_compact_ops_and_fused_step_match_reference(backend, d, dtype):
    if not dispatch.covers(backend, d, step=True):
        pytest.skip(f"{backend} step takes d <= {dispatch.max_block_size(backend, step=True)}")
    n = 5000
    F = compact.to_compact(pack_tril(random_spd(n, d=d, dtype=dtype))).cuda()
    G = randn(n, d, dtype=dtype).cuda()
    ours = compact.outer_ema_(F.clone(), G, 0.8, backend=backend)
    ref = compact.outer_ema_(F.clone(), G, 0.8, backend="torch")
    tol = STEP_TOL[dtype]
    torch.testing.assert_close(compact.from_compact(ours, n), compact.from_compact(ref, n), **tol)
    factor, info = compact.cholesky_ex(ref, n, 0.05, backend=backend)
    factor_ref, info_ref = compact.cholesky_ex(ref, n, 0.05, backend="torch")
    assert torch.equal(info, info_ref)
    torch.testing.assert_close(compact.from_compact(factor, n),
                               compact.from_compact(factor_ref, n), **tol)
    torch.testing.assert_close(compact.solve(factor, G, backend=backend),
                               compact.solve(factor_ref, G, backend="torch"), **tol)
    pair = StepBucket(n, d, dtype, dispatch.module(backend).mbf_step_, device="cuda", seed=4)
    schedule = [(True, True, True), (False, False, False), (True, False, False),
                (False, False, True), (True, False, True)]
    for k, (refresh, first, refactor) in enumerate(schedule):
        g = randn(n, d, dtype=dtype, seed=10 + k).cuda()
        g[3, 0] = float("nan")
        pair.step(g, lr=0.01, momentum_coef=0.9, beta=0.8, damping=0.1, weight_decay=0.01,
                  decoupled_weight_decay=k % 2 == 1, update_curvature=refresh,
                  first_curvature=first, refactor=refactor)
    pair.assert_matches(dtype, backend)


def test_auto_picks_per_block_size():
    dev = torch.device("cuda")
    status = mk.backends()
    small = dispatch.select("auto", dev, differentiable=False, fn="t", d=9, step=True)
    large = dispatch.select("auto", dev, differentiable=False, fn="t", d=33, step=True)
    huge = dispatch.select("auto", dev, differentiable=False, fn="t", d=65, step=True)
    if status["triton"].available:
        assert small is dispatch.module("triton")
    if status["cuda"].available:
        assert large is dispatch.module("cuda")
    assert huge is reference


def test_optimizer_auto_on_gpu_matches_torch_backend():
    """make_net mixes every block kind: d = 9, 25, 21, 1 and a shared block. On the GPU 'auto'
    takes each bucket to the backend that covers it; the trajectory is the torch one."""
    out = []
    for backend in ("torch", "auto"):
        model = make_net().cuda()
        opt = mk.MBF.from_model(model, backend=backend, **OPTIONS)
        train(model, opt, [(x.cuda(), y.cuda()) for x, y in batches(5)])
        out.append((flat(model), opt.stats))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-9, atol=1e-11)
    assert out[1][1] == out[0][1]


def test_state_dict_moves_between_cpu_and_gpu():
    """A run saved on the CPU resumes on the GPU with the same next steps (and back)."""
    data = batches(6)
    results = {}
    for route in ("cpu", "cpu->cuda", "cuda->cpu"):
        first, second = route.split("->") if "->" in route else (route, route)
        model = make_net().to(first)
        opt = mk.MBF.from_model(model, **OPTIONS)
        train(model, opt, [(x.to(first), y.to(first)) for x, y in data[:3]])
        saved_model, saved_opt = model.state_dict(), opt.state_dict()
        model = make_net().to(second)
        model.load_state_dict(saved_model)
        opt = mk.MBF.from_model(model, **OPTIONS)
        opt.load_state_dict(saved_opt)
        train(model, opt, [(x.to(second), y.to(second)) for x, y in data[3:]])
        results[route] = flat(model).cpu()
    torch.testing.assert_close(results["cpu->cuda"], results["cpu"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(results["cuda->cpu"], results["cpu"], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_never_syncs_with_the_host(backend):
    """A whole optimizer step is queued without a device synchronisation (the segment tables
    come from pinned memory or a cache)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10)).cuda()
    opt = mk.MBF.from_model(model, backend=backend, **OPTIONS)
    x = torch.randn(4, 3, 8, 8, device="cuda")
    for _ in range(2):  # compile, tune and cache first
        model(x).square().mean().backward()
        opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).square().mean().backward()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
