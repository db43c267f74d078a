"""The fused MBF step (``mbf_step_`` on one bucket, ``mbf_bucket_step_`` over segments with
strided rows, bias tails and mixed flags): every compiled backend, on every device it runs on
here, against the plain-PyTorch reference step (MBF_SPEC sections 3, 4), on every branch."""

from __future__ import annotations

import importlib.util
import platform

import pytest
import torch

import samples
from conftest import (STEP_TOL as TOL, StepBucket, Target, assert_refuses_block_size, randn,
                      targets, unit_and_pivots)
from mbf_kernels import compact, dispatch, reference
from mbf_kernels.limits import TRITON_MAX_D as MAX_D
from mbf_kernels.layout import factor_from_unit, from_compact, unit_from_factor
from mbf_kernels.packed import pack_tril

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None
                                  or not dispatch.backends()["triton"].available,
                                  reason="the triton backend is not available")


def Bucket(target, n, d, dtype, seed=0):
    """A bucket stepped by the reference and by the target's fused step."""
    return StepBucket(n, d, dtype, dispatch.module(target.backend).mbf_step_,
                      device=target.device, seed=seed)


def schedule(k, t1, t2):
    """Flags of step k (1-based) for curvature every t1 and refactor every t2 steps."""
    return dict(update_curvature=(k - 1) % t1 == 0, first_curvature=k == 1, refactor=(k - 1) % t2 == 0)


# Triton's interpreter runs these cases (the every-branch test below covers it in full).
_INTERPRETED = {(7, 1), (37, 9), (16, 10)}


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 4, 9, 10, 27, 33])
@pytest.mark.parametrize("n", [1, 7, 16, 37])
@pytest.mark.parametrize("decoupled", [False, True])
def test_steps_match_reference(target, n, d, dtype, decoupled):
    if target.interpreted and (n, d) not in _INTERPRETED:
        pytest.skip("Triton's interpreter runs a subset (and every branch below)")
    if not dispatch.covers(target.backend, d, step=True):
        return assert_refuses_block_size(target.backend, d, lambda: dispatch.select(
            target.backend, torch.device(target.device), differentiable=False, fn="mbf_step_",
            d=d, step=True))
    bucket = Bucket(target, n, d, dtype)
    hyper = dict(lr=0.05, momentum_coef=0.9, beta=0.9, damping=0.1, weight_decay=0.01,
                 decoupled_weight_decay=decoupled)
    for k in range(1, 8):  # T1 = 2, T2 = 3: neither divides the other
        grad = randn(n, d, dtype=dtype, seed=100 + k).to(target.device)
        bucket.step(grad, **hyper, **schedule(k, 2, 3))
        bucket.assert_matches(dtype, f"after step {k}")


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_step_is_exact_preconditioned_gradient(target, dtype):
    """Step 1: F = g g^T, m = g, p -= lr (g g^T + lambda I)^{-1} g  (known closed form)."""
    n, d, lam, lr = 20, 9, 0.5, 0.1
    bucket = Bucket(target, n, d, dtype)
    p0 = bucket.p.clone()
    g = randn(n, d, dtype=dtype, seed=7)
    bucket.step(g, lr=lr, momentum_coef=0.9, beta=0.9, damping=lam, weight_decay=0.0,
                decoupled_weight_decay=False, **schedule(1, 10, 100))
    # Sherman-Morrison: (g g^T + lam I)^{-1} g = g / (lam + |g|^2)
    expected = p0 - lr * g / (lam + (g * g).sum(-1, keepdim=True))
    torch.testing.assert_close(bucket.p, expected, **TOL[dtype])
    torch.testing.assert_close(compact.from_compact(bucket.F, n), pack_tril(g[:, :, None] * g[:, None, :]), **TOL[dtype])


@pytest.mark.parametrize("target", targets())
# (Triton's interpreter computes with the Inf gradient in numpy, which warns: intended here.)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_gradient_skips_that_blocks_curvature_only(target):
    n, d = 20, 9
    bucket = Bucket(target, n, d, torch.float32)
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


@pytest.mark.parametrize("target", targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_failed_factorisation_falls_back_to_the_diagonal(target, dtype):
    """Blocks whose damped curvature is not PD take 1/sqrt(F_ii + lambda) (or 1/sqrt(lambda))."""
    n, d, lam = 20, 4, 0.01
    bucket = Bucket(target, n, d, dtype)
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


# Steps 1-5 with T1 = 2, T2 = 3: first refresh + refactor, cached, refresh, refactor only...
SCHEDULE = [dict(update_curvature=True, first_curvature=True, refactor=True),
            dict(update_curvature=False, first_curvature=False, refactor=False),
            dict(update_curvature=True, first_curvature=False, refactor=False),
            dict(update_curvature=False, first_curvature=False, refactor=True),
            dict(update_curvature=True, first_curvature=False, refactor=True)]


@pytest.mark.parametrize("target", targets(covering=MAX_D, step=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, n, decoupled", [(1, 7, False), (9, 37, False), (9, 37, True),
                                             (10, 16, True), (2, 0, False), (MAX_D, 19, False)])
def test_fused_step_matches_reference_on_every_branch(target, d, n, decoupled, dtype):
    pair = Bucket(target, n, d, dtype, seed=4)
    exact = Bucket(target, n, d, torch.float64, seed=4)  # the float64 reference: what float32 is judged against
    hyper = dict(lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.01,
                 decoupled_weight_decay=decoupled)
    for k, flags in enumerate(SCHEDULE):
        g = randn(n, d, dtype=torch.float64, seed=10 + k).to(target.device)
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


@pytest.mark.parametrize("target", targets())
def test_fused_step_non_finite_gradient_and_failed_factor(target):
    """A NaN gradient skips only its block's curvature refresh; a block whose factor fails at
    damping 0 gets the diagonal preconditioner; both are counted, as in the reference."""
    d, n = 3, 20
    pair = Bucket(target, n, d, torch.float64, seed=4)
    hyper = dict(lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.0, weight_decay=0.0,
                 decoupled_weight_decay=False)
    # Rank-1 blocks g g^T at damping 0, exactly singular in any evaluation order: g_0 a power of
    # two and the rest small integers make every product and the second pivot g_1^2 - g_1^2
    # exact, so it is 0 and every factor fails. (From random g the pivot is rounding noise, of
    # either sign depending on the backend's use of FMA: no backend's answer is the right one.)
    gen = torch.Generator().manual_seed(5)
    g = torch.randint(-3, 4, (n, d), generator=gen).double()
    g[:, 0] = 2.0 ** torch.randint(0, 3, (n,), generator=gen) * (1 - 2 * (torch.arange(n) % 2))
    g[4, 1] = float("nan")
    g = g.to(target.device)
    pair.step(g, **hyper, **SCHEDULE[0])  # every factor fails: the diagonal fallback
    pair.assert_matches(torch.float64, "first step")
    assert pair.stats.tolist() == [1, n]  # the NaN block kept F = 0: its factor fails too
    g2 = randn(n, d, dtype=torch.float64, seed=6).to(target.device)
    pair.step(g2, **dict(hyper, damping=0.1), **SCHEDULE[4])
    pair.assert_matches(torch.float64, "second step")


@pytest.mark.skipif(not dispatch.backends()["cpu"].available, reason="C++ kernels not built")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the flush is x86-64's MXCSR mode")
def test_cpu_step_ops_flush_denormal_state_and_keep_the_callers_mode():
    """A dead unit's momentum (rho m + 0 every step) stalls in the smallest denormals in IEEE
    arithmetic, where Intel cores take a microcode assist per multiply; the C++ step ops
    flush it to exactly zero, on every thread, and leave the caller's floating-point mode as
    they found it."""
    denormal = torch.finfo(torch.float32).tiny / 8
    n, d = 37, 9
    bucket = Bucket(Target("cpu", "cpu"), n, d, torch.float32)
    bucket.m_ref.fill_(denormal)
    bucket.m.fill_(denormal)
    bucket.step(torch.zeros(n, d), lr=0.1, momentum_coef=0.9, beta=0.9, damping=0.1,
                weight_decay=0.0, decoupled_weight_decay=True, update_curvature=False,
                first_curvature=False, refactor=False)
    assert (bucket.m_ref > 0).all()  # IEEE: 0.9 x denormal, still a denormal
    assert (bucket.m == 0).all()
    torch.testing.assert_close(bucket.p, bucket.p_ref)
    # graft_rows_ (the shared and low-rank blocks' row pass): m and Adam's v at g = 0.
    m = torch.full((64, 33), denormal)
    v = torch.full_like(m, denormal)
    torch.ops.mbf_kernels.graft_rows_(m, v, torch.zeros(64, 32), torch.zeros(64), 0.9, 0.999,
                                      1e-8, None)
    assert (m == 0).all() and (v == 0).all()
    assert (torch.tensor([denormal]) * 0.5).item() > 0  # this thread's mode: unchanged


@pytest.mark.parametrize("target", targets(covering=9, step=True))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bucket_op_matches_reference(target, dtype):
    """Segments with tails, strided rows and different flags in one call (one launch per set of
    flags), and tiles no segment owns, which keep their values."""
    results = []
    for fn in (reference.mbf_bucket_step_, dispatch.module(target.backend).mbf_bucket_step_):
        params, grads, momenta, tiles, segments = samples.bucket_step(dtype, target.device)
        F = torch.full((tiles, 45, 16), 0.25, dtype=dtype, device=target.device)
        L = compact.to_compact(compact.identity_factor(9, dtype).expand(tiles * 16, 45)).to(target.device)
        F[6], L[6] = 7.0, 7.0  # S's tile: no segment owns it this step
        stats = torch.zeros(2, dtype=torch.int64, device=target.device)
        for _ in range(2):
            fn(params, grads, momenta, F, L, stats, segments, lr=0.1, momentum_coef=0.9,
               beta=0.8, damping=0.05, weight_decay=0.01, decoupled_weight_decay=False)
        results.append((params, momenta, F, L, stats))
    (p_ref, m_ref, F_ref, L_ref, s_ref), (p, m, F, L, s) = results
    for a, b in zip(p + m, p_ref + m_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])
    # The blocks the segments own (20, 5 and 33 from tiles 0, 2 and 3); the padding lanes of
    # their last tiles only have to stay finite (the C++ kernels step whole tiles).
    owned = torch.zeros(6, 16, dtype=torch.bool, device=F.device)
    owned.view(-1)[:20] = owned[2, :5] = True
    owned.view(-1)[48:81] = True
    for ours, ref in ((F, F_ref), (L, L_ref)):
        torch.testing.assert_close(ours[:6].transpose(1, 2)[owned], ref[:6].transpose(1, 2)[owned],
                                   **TOL[dtype])
        assert torch.isfinite(ours[:6]).all()
    assert (F[6] == 7).all() and (L[6] == 7).all()
    assert torch.equal(p[4], p_ref[4]) and torch.equal(s.cpu(), s_ref.cpu())


@needs_triton
def test_step_tuning_times_every_config_that_fits_and_keeps_the_fastest():
    """The step kernels' tuner (on a GPU: Triton's do_bench on a 256 MB scratch bucket), with a
    stand-in timer: every config that fits d runs the real kernels, and the fastest is kept."""
    from mbf_kernels.triton import _common, step

    times = iter([7.0, 3.0, 5.0, 4.0, 9.0])
    calls = []

    def timer(fn):
        fn()  # the launches must run with each config
        calls.append(1)
        return next(times)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    best = step._tune_step(9, torch.float64, device, nbytes=20_000, timer=timer)
    fitting = [cfg for cfg in _common.CONFIGS if _common.fits(*cfg, 9)]
    assert len(calls) == len(fitting) and best == fitting[1]


@pytest.mark.parametrize("target", targets(covering=9, step=True))
def test_bucket_op_rejects_bad_segments(target):
    step_fn = dispatch.module(target.backend).mbf_bucket_step_
    params, grads, momenta, tiles, segments = samples.bucket_step(torch.float64, target.device)
    F = torch.zeros(tiles, 45, 16, dtype=torch.float64, device=target.device)
    stats = torch.zeros(2, dtype=torch.int64, device=target.device)
    hyper = dict(lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.0,
                 decoupled_weight_decay=False)
    bad = list(segments)
    bad[5] = 7  # stride < width
    with pytest.raises((ValueError, RuntimeError), match="segment 0 has a bad layout"):
        step_fn(params, grads, momenta, F, F.clone(), stats, bad, **hyper)
    bad = list(segments)
    bad[reference.SEGMENT_FIELDS + 6] = 1  # overlaps segment 0's tiles
    with pytest.raises((ValueError, RuntimeError), match="segment 1 owns tiles"):
        step_fn(params, grads, momenta, F, F.clone(), stats, bad, **hyper)
    with pytest.raises((ValueError, RuntimeError), match="stats must be an? (contiguous )?int64 tensor"):
        step_fn(params, grads, momenta, F, F.clone(), stats.float(), segments,
                            **hyper)


@pytest.mark.parametrize("where", ["meta", "float64"])
@pytest.mark.parametrize("target", targets(covering=9, step=True))
def test_bucket_op_names_a_gradient_on_another_device_or_dtype(target, where):
    """A gradient on the meta device (whose device index, -1, a CPU tensor's also reports) or
    of another dtype is refused by name before anything is read."""
    step_fn = dispatch.module(target.backend).mbf_bucket_step_
    params, grads, momenta, tiles, segments = samples.bucket_step(torch.float32, target.device)
    F = torch.zeros(tiles, 45, 16, device=target.device)
    grads[1] = (torch.empty_like(grads[1], device="meta") if where == "meta"
                else grads[1].double())
    named = r"grads?\[?1?\]?.*(meta|float64|Double)"
    with pytest.raises((ValueError, RuntimeError), match=named):
        step_fn(params, grads, momenta, F, F.clone(), torch.zeros(2, dtype=torch.int64,
                                                                  device=target.device),
                segments, lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.0,
                decoupled_weight_decay=False)


@pytest.mark.parametrize("target", targets(gpu_only=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", (1, 2, 9, 10, 16, 25, 33, 64))
def test_fused_step_on_a_large_bucket_every_branch(target, d, dtype):
    """5000 blocks (many programs), a NaN gradient in one block, every flag combination."""
    if not dispatch.covers(target.backend, d, step=True):
        pytest.skip(f"{target.backend} step takes d <= "
                    f"{dispatch.max_block_size(target.backend, step=True)}")
    n = 5000
    pair = Bucket(target, n, d, dtype, seed=4)
    steps = [(True, True, True), (False, False, False), (True, False, False),
             (False, False, True), (True, False, True)]
    for k, (refresh, first, refactor) in enumerate(steps):
        g = randn(n, d, dtype=dtype, seed=10 + k).cuda()
        g[3, 0] = float("nan")
        pair.step(g, lr=0.01, momentum_coef=0.9, beta=0.8, damping=0.1, weight_decay=0.01,
                  decoupled_weight_decay=k % 2 == 1, update_curvature=refresh,
                  first_curvature=first, refactor=refactor)
    pair.assert_matches(dtype, target.backend)


@pytest.mark.parametrize("target", targets(gpu_only=True, covering=9, step=True))
def test_fused_step_on_cuda_large_bucket(target):
    pair = Bucket(target, 100_000, 9, torch.float32, seed=4)
    hyper = dict(lr=0.01, momentum_coef=0.9, beta=0.9, damping=0.1, weight_decay=0.0,
                 decoupled_weight_decay=False)
    for k, flags in enumerate(SCHEDULE):
        pair.step(randn(100_000, 9, dtype=torch.float32, seed=k).cuda(), **hyper, **flags)
    pair.assert_matches(torch.float32, "cuda")


def _bucket_run(fn, factor_dtype, device, modes, L0=None):
    """samples.bucket_step's float32 bucket stepped by ``fn`` with its factor in
    ``factor_dtype``: one call per mode in ``modes`` (StepMode values; a grafted pair measures
    then writes), the first of them refactoring as its segments' flags ask. L0: the factor to
    start from (else the identity). Returns (params, momenta, second moments, F, L, norms)."""

    params, grads, momenta, tiles, segments = samples.bucket_step(torch.float32, device)
    F = torch.full((tiles, 45, 16), 0.25, device=device)
    if L0 is not None:
        L = L0.clone().to(device)
    else:
        L = compact.to_compact(compact.identity_factor(9).expand(tiles * 16, 45))
        L = (unit_from_factor(L) if factor_dtype == torch.int8 else L).to(device, factor_dtype)
    stats = torch.zeros(2, dtype=torch.int64, device=device)
    v = [torch.full_like(p, 0.5) for p in params]
    norms = torch.zeros(tiles, 2, 16, device=device)
    directions = torch.zeros(tiles, 9, 16, device=device)
    scale = torch.linspace(0.5, 2.0, tiles, device=device)
    for k, mode in enumerate(modes):
        segs = list(segments)
        if k > 0:  # later calls: the cached factor (no refresh, no refactor)
            for s in range(0, len(segs), reference.SEGMENT_FIELDS):
                segs[s + 7] = 0
        fn(params, grads, momenta, F, L, stats, segs, lr=0.1, momentum_coef=0.9, beta=0.8,
           damping=0.05, weight_decay=0.01, decoupled_weight_decay=True, second_moments=v,
           tile_norms=norms, tile_scale=scale, directions=directions, mode=mode)
    return params, momenta, v, F, L, norms


def _assert_cached_steps_agree(fn, device, stored):
    """From the same stored factor (in its storage's dtype), the cached paper's pass and the
    grafted pair of ``fn`` and of the reference agree to float32 rounding."""
    from mbf_kernels.layout import StepMode

    for modes in ([StepMode.WRITE], [StepMode.GRAFT, StepMode.WRITE | StepMode.GRAFT]):
        ours = _bucket_run(fn, stored.dtype, device, [StepMode.WRITE] + modes, stored)
        ref = _bucket_run(reference.mbf_bucket_step_, stored.dtype, "cpu",
                          [StepMode.WRITE] + modes, stored)
        for a, b in zip(ours[:3] + ours[5:], ref[:3] + ref[5:]):
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                torch.testing.assert_close(x.cpu(), y, **TOL[torch.float32])


@pytest.mark.parametrize("target", targets(covering=9, step=True))
def test_bucket_step_with_a_bfloat16_factor(target):
    """factor_dtype="bfloat16": the refactor stores each factor entry rounded to nearest (ties to
    even), within half a bfloat16 ulp (2^-8 relative) of the float32 factor, and every later
    solve uses the factor as stored: from the same stored factor the kernels and the reference
    agree to float32 rounding, on the paper's pass and the grafted pair alike."""
    from mbf_kernels.layout import StepMode

    fn = dispatch.module(target.backend).mbf_bucket_step_
    # The refactor: the stored factor against the float32 one, and against the reference's.
    L32 = _bucket_run(fn, torch.float32, target.device, [StepMode.WRITE])[4].cpu()
    L16 = _bucket_run(fn, torch.bfloat16, target.device, [StepMode.WRITE])[4].cpu()
    L16_ref = _bucket_run(reference.mbf_bucket_step_, torch.bfloat16, "cpu", [StepMode.WRITE])[4]
    assert L16.dtype == torch.bfloat16
    owned = torch.zeros(7, 16, dtype=torch.bool)  # the blocks the segments own (see above)
    owned.view(-1)[:20] = owned[2, :5] = True
    owned.view(-1)[48:81] = True

    def entries(L):
        return L.float().transpose(1, 2)[owned]

    exact = entries(L32)
    assert ((entries(L16) - exact).abs() <= 2.0 ** -8 * exact.abs()).all()
    # Two float32 factorisations differ by rounding, so the rounded entries may differ by one
    # bfloat16 ulp where a value sits on a rounding boundary, and by no more.
    assert ((entries(L16) - entries(L16_ref)).abs() <= 2.0 ** -7 * exact.abs() + 1e-6).all()
    # From the same stored factor, the cached steps agree to float32 rounding.
    _assert_cached_steps_agree(fn, target.device, L16_ref)


def _unit_parts(Q):
    """(U's strictly lower entries, r, scale) per block of an int8 unit factor, in float64."""
    U, r = unit_and_pivots(from_compact(factor_from_unit(Q.cpu(), 9), Q.shape[0] * 16))
    scale = Q[:, 36:40].cpu().contiguous().view(torch.float32).reshape(-1).double()
    return U, r, scale


@pytest.mark.parametrize("target", [t for t in targets(covering=9, step=True)
                                    if t.values[0].backend == "cpu"])
def test_bucket_step_with_an_int8_unit_factor(target):
    """factor_dtype="int8" (the CPU kernels): the refactor codes U = L D^{-1} within half a code
    step (scale / 2) of the float32 factor's U and r = D^{-2} within half a bfloat16 ulp, as the
    reference codes it but where a value sits on a rounding boundary (one code or one ulp);
    every later solve uses the factor as coded: from the same coded factor the kernels and the
    reference agree to float32 rounding, on the paper's pass and the grafted pair alike."""
    from mbf_kernels.layout import StepMode

    fn = dispatch.module(target.backend).mbf_bucket_step_
    L32 = _bucket_run(fn, torch.float32, target.device, [StepMode.WRITE])[4].cpu()
    Q = _bucket_run(fn, torch.int8, target.device, [StepMode.WRITE])[4].cpu()
    Q_ref = _bucket_run(reference.mbf_bucket_step_, torch.int8, "cpu", [StepMode.WRITE])[4]
    assert Q.dtype == torch.int8 and Q.shape == (7, 58, 16)
    owned = torch.zeros(7, 16, dtype=torch.bool)  # the blocks the segments own (see above)
    owned.view(-1)[:20] = owned[2, :5] = True
    owned.view(-1)[48:81] = True
    owned = owned.view(-1)
    U_exact, r_exact = (x[owned] for x in unit_and_pivots(from_compact(L32, 7 * 16)))
    U, r, scale = (x[owned] for x in _unit_parts(Q))
    U_ref, r_ref, scale_ref = (x[owned] for x in _unit_parts(Q_ref))
    # (V's blocks, not refactored, keep the identity: scale 0)
    assert (scale[U_exact.abs().amax(1) > 0] > 0).all()
    assert ((U - U_exact).abs() <= 0.5 * scale[:, None] * (1 + 2.0 ** -8)).all()
    assert ((r - r_exact).abs() <= 2.0 ** -8 * r_exact).all()
    assert ((U - U_ref).abs() <= 1.01 * torch.maximum(scale, scale_ref)[:, None]).all()
    assert ((r - r_ref).abs() <= 2.0 ** -7 * r_exact).all()
    _assert_cached_steps_agree(fn, target.device, Q_ref)


def _assert_refused(target, dtype, factor, match):
    """samples.bucket_step's bucket in ``dtype`` stepped with ``factor(tiles)``: refused,
    the error matching ``match``."""
    from mbf_kernels.layout import StepMode

    params, grads, momenta, tiles, segments = samples.bucket_step(dtype, target.device)
    F = torch.zeros(tiles, 45, 16, dtype=dtype, device=target.device)
    stats = torch.zeros(2, dtype=torch.int64, device=target.device)
    with pytest.raises((ValueError, RuntimeError), match=match):
        dispatch.module(target.backend).mbf_bucket_step_(
            params, grads, momenta, F, factor(tiles).to(target.device), stats, segments, lr=0.1,
            momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.0,
            decoupled_weight_decay=False, mode=StepMode.WRITE)


@pytest.mark.parametrize("target", targets(covering=9, step=True))
def test_int8_factor_is_refused_where_the_step_cannot_read_it(target):
    """An int8 factor: the CPU kernels' only, beside float32 state, from d = 4 on, in its own
    compact shape; anything else is refused, naming the factor."""
    def unit(rows):
        return lambda tiles: torch.zeros(tiles, rows, 16, dtype=torch.int8)

    if target.backend != "cpu":
        return _assert_refused(target, torch.float32, unit(58), "int8")
    _assert_refused(target, torch.float32, unit(45), "int8 factor must have shape")
    _assert_refused(target, torch.float64, unit(58), "float32 bucket")


@pytest.mark.parametrize("target", targets(covering=9, step=True))
def test_bfloat16_factor_goes_with_float32_state_only(target):
    _assert_refused(target, torch.float64,
                    lambda tiles: torch.zeros(tiles, 45, 16, dtype=torch.bfloat16),
                    "factor must (have dtype|match)")
    good = torch.zeros(tiles, 58, 16, dtype=torch.int8, device=target.device)
    if target.backend != "cpu":
        with pytest.raises((ValueError, RuntimeError), match="int8"):
            fn(params, grads, momenta, F, good, stats, segments, **kw)
        return
    with pytest.raises((ValueError, RuntimeError), match="int8 factor must have shape"):
        fn(params, grads, momenta, F, good[:, :45], stats, segments, **kw)
    params64, grads64, momenta64, _, _ = samples.bucket_step(torch.float64, target.device)
    with pytest.raises((ValueError, RuntimeError), match="float32 bucket"):
        fn(params64, grads64, momenta64, F.double(), good, stats, segments, **kw)


@pytest.mark.parametrize("target", targets(covering=9, step=True))
def test_bfloat16_factor_goes_with_float32_state_only(target):
    from mbf_kernels.layout import StepMode

    params, grads, momenta, tiles, segments = samples.bucket_step(torch.float64, target.device)
    F = torch.zeros(tiles, 45, 16, dtype=torch.float64, device=target.device)
    stats = torch.zeros(2, dtype=torch.int64, device=target.device)
    with pytest.raises((ValueError, RuntimeError), match="factor must (have dtype|match)"):
        dispatch.module(target.backend).mbf_bucket_step_(
            params, grads, momenta, F, F.to(torch.bfloat16), stats, segments, lr=0.1,
            momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.0,
            decoupled_weight_decay=False, mode=StepMode.WRITE)
