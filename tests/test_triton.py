"""The Triton kernels against the plain-PyTorch reference: compact outer-product EMA, damped
Cholesky, solve with a cached factor, the fused step (every branch), the bucket op (strided rows,
bias tails, mixed flags) and the optimizer; the ops' schemas (opcheck) and torch.compile
tracing; and Triton's real compiler (ptxas included) on every kernel, for sm_90 and sm_80.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), so sizes stay small; with one, the same tests run on CUDA tensors. The
dense linalg ops are in test_ops_vs_reference.py with every other backend."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("triton", reason="triton is not installed")

import mbf_kernels as mk  # noqa: E402
from mbf_kernels import compact, dispatch, reference  # noqa: E402
from mbf_kernels.packed import pack_tril  # noqa: E402
from conftest import STEP_TOL as TOL, StepBucket, randn, random_spd  # noqa: E402
from test_optimizer import OPTIONS, batches, flat, make_net, train  # noqa: E402

if not mk.backends()["triton"].available:
    pytest.skip(f"triton backend: {mk.backends()['triton'].detail}", allow_module_level=True)

from mbf_kernels import triton as mt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_D = dispatch.TRITON_MAX_D

# d = 1, a non-power of two on each side of 8, a hot size, the largest; N = 0, one partial tile,
# and more than one program with a ragged end.
CASES = [(d, n) for d in (1, 2, 9, 10) for n in (0, 7, 37)] + [(9, 70), (MAX_D, 19)]


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


# Steps 1-5 with T1 = 2, T2 = 3: first refresh + refactor, cached, refresh, refactor only...
SCHEDULE = [dict(update_curvature=True, first_curvature=True, refactor=True),
            dict(update_curvature=False, first_curvature=False, refactor=False),
            dict(update_curvature=True, first_curvature=False, refactor=False),
            dict(update_curvature=False, first_curvature=False, refactor=True),
            dict(update_curvature=True, first_curvature=False, refactor=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, n, decoupled", [(1, 7, False), (9, 37, False), (9, 37, True),
                                             (10, 16, True), (2, 0, False), (MAX_D, 19, False)])
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


def _bucket(dtype, device):
    """A bucket of d = 9 blocks from four tensors: W (20, 8) joined to its bias (tails), columns
    3..11 of V (5, 14) (strided rows), R (33, 9), and S (7, 9), which this step leaves out."""
    gen = [randn(20, 8, seed=1), randn(20, seed=2), randn(5, 14, seed=3), randn(33, 9, seed=4),
           randn(7, 9, seed=5)]
    params = [t.to(dtype).to(device) for t in gen]
    grads = [randn(*t.shape, seed=10 + i).to(dtype).to(device) for i, t in enumerate(params)]
    momenta = [torch.zeros_like(t) for t in params]
    tiles = 2 + 1 + 3 + 1
    # tensor, tail, n, offset, width, stride, first tile, flags (different per segment), step
    segments = [0, 1, 20, 0, 8, 8, 0, 7, 1,
                2, -1, 5, 3, 9, 14, 2, 1, 3,
                3, -1, 33, 0, 9, 9, 3, 5, 2]
    return params, grads, momenta, tiles, segments


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bucket_op_matches_reference(dtype):
    """Segments with tails, strided rows and different flags in one call (one launch per set of
    flags), and tiles no segment owns, which keep their values."""
    results = []
    for fn in (reference.mbf_bucket_step_, mt.mbf_bucket_step_):
        params, grads, momenta, tiles, segments = _bucket(dtype, DEVICE)
        F = torch.full((tiles, 45, 16), 0.25, dtype=dtype, device=DEVICE)
        L = compact.to_compact(compact.identity_factor(9, dtype).expand(tiles * 16, 45)).to(DEVICE)
        F[6], L[6] = 7.0, 7.0  # S's tile: no segment owns it this step
        stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        for _ in range(2):
            fn(params, grads, momenta, F, L, stats, segments, lr=0.1, momentum_coef=0.9,
               beta=0.8, damping=0.05, weight_decay=0.01, decoupled_weight_decay=False)
        results.append((params, momenta, F, L, stats))
    (p_ref, m_ref, F_ref, L_ref, s_ref), (p, m, F, L, s) = results
    for a, b in zip(p + m, p_ref + m_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])
    torch.testing.assert_close(F[:6], F_ref[:6], **TOL[dtype])
    torch.testing.assert_close(L[:6], L_ref[:6], **TOL[dtype])
    assert (F[6] == 7).all() and (L[6] == 7).all()
    assert torch.equal(p[4], p_ref[4]) and torch.equal(s.cpu(), s_ref.cpu())


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

    best = step._tune_step(9, torch.float64, torch.device(DEVICE), nbytes=20_000, timer=timer)
    fitting = [cfg for cfg in _common.CONFIGS if _common.fits(*cfg, 9)]
    assert len(calls) == len(fitting) and best == fitting[1]


def test_bucket_op_rejects_bad_segments():
    params, grads, momenta, tiles, segments = _bucket(torch.float64, DEVICE)
    F = torch.zeros(tiles, 45, 16, dtype=torch.float64, device=DEVICE)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    hyper = dict(lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.0,
                 decoupled_weight_decay=False)
    bad = list(segments)
    bad[5] = 7  # stride < width
    with pytest.raises(ValueError, match="segment 0 has a bad layout"):
        mt.mbf_bucket_step_(params, grads, momenta, F, F.clone(), stats, bad, **hyper)
    bad = list(segments)
    bad[reference.SEGMENT_FIELDS + 6] = 1  # overlaps segment 0's tiles
    with pytest.raises(ValueError, match="segment 1 owns tiles"):
        mt.mbf_bucket_step_(params, grads, momenta, F, F.clone(), stats, bad, **hyper)
    with pytest.raises(ValueError, match="stats must be an int64 tensor"):
        mt.mbf_bucket_step_(params, grads, momenta, F, F.clone(), stats.float(), segments,
                            **hyper)


class TritonNet(nn.Module):
    """Every kind of block the Triton kernels take (d <= 16): 3x3 convs (one grouped), 1x1
    conv and norms (d = 1), a Linear with its bias (d = 13: tails) and one above
    max_block_size (shared, on torch)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=2, bias=False)
        self.conv3 = nn.Conv2d(6, 3, 1)
        self.fc1 = nn.Linear(3 * 4 * 4, 12)  # d = 49
        self.fc2 = nn.Linear(12, 5)  # d = 13

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv3(F.relu(self.conv2(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("decoupled", [False, True])
def test_optimizer_triton_backend_matches_torch_backend(decoupled):
    """backend='triton' through the bucket op on every block kind it takes: the same trajectory
    as the torch bucket step over 5 steps with T1 = 2, T2 = 3."""
    out = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = TritonNet().double().to(DEVICE)
        opt = mk.MBF.from_model(model, backend=backend, max_block_size=32, weight_decay=1e-2,
                                decoupled_weight_decay=decoupled, **OPTIONS)
        train(model, opt, [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches(5)])
        out.append((flat(model), opt.stats))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-9, atol=1e-11)
    assert out[1][1] == out[0][1]


def test_triton_backend_names_its_block_size_limit():
    """A model with blocks the Triton kernels do not take (5x5 convs: d = 25) is refused by name;
    backend='auto' takes them elsewhere."""
    model = make_net().to(DEVICE)
    x, y = batches(1)[0]
    F.cross_entropy(model(x.to(DEVICE)), y.to(DEVICE)).backward()
    with pytest.raises(ValueError, match=rf"backend 'triton' takes blocks up to d = {MAX_D}"):
        mk.MBF.from_model(model, backend="triton", **OPTIONS).step()


def test_triton_backend_refuses_a_device_it_cannot_run_on():
    w = torch.nn.Parameter(torch.randn(2, 1, 3, 3, device="meta"))
    w.grad = torch.zeros_like(w)
    with pytest.raises(ValueError, match="backend 'triton' cannot run on meta tensors"):
        mk.MBF([w], backend="triton").step()


def test_auto_never_picks_the_interpreter():
    cpu = torch.device("cpu")
    assert dispatch.select("auto", cpu, differentiable=False, fn="t", d=9) is not mt


# ---------------------------------------------------------------------------------------------
# The ops as torch sees them


def test_triton_ops_pass_opcheck():
    ops = torch.ops.mbf_kernels
    A = random_spd(5, d=9, dtype=torch.float64).to(DEVICE)
    B = randn(5, 9, 2).to(DEVICE)
    L = torch.linalg.cholesky(A)
    torch.library.opcheck(ops.triton_cholesky_ex.default, (A, 0.1))
    torch.library.opcheck(ops.triton_cholesky_solve.default, (B, L))
    torch.library.opcheck(ops.triton_solve_spd_ex.default, (A, B, 0.1))
    torch.library.opcheck(ops.triton_inv_spd_ex.default, (A, 0.1))
    torch.library.opcheck(ops.triton_outer_ema_.default, (A.clone(), B.mT.contiguous(), 0.9))
    Fc = compact.to_compact(pack_tril(A))
    G = randn(5, 9).to(DEVICE)
    factor, _ = mt.compact_cholesky_ex(Fc, 5, 0.1)
    torch.library.opcheck(ops.triton_compact_outer_ema_.default, (Fc.clone(), G, 0.9))
    torch.library.opcheck(ops.triton_compact_cholesky_ex.default, (Fc, 5, 0.1))
    torch.library.opcheck(ops.triton_compact_solve.default, (factor, G))
    params, grads, momenta, tiles, segments = _bucket(torch.float64, DEVICE)
    Fb = torch.zeros(tiles, 45, 16, dtype=torch.float64, device=DEVICE)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(ops.triton_bucket_step_.default,
                          (params, grads, momenta, Fb, Fb.clone(), stats, segments, 0.1, 0.9,
                           0.8, 0.05, 0.0, False, [], None, None, None, 0.999, 1e-8, 1))


def test_torch_compile_traces_the_triton_ops_without_graph_breaks():
    A = random_spd(8, d=9, dtype=torch.float32).to(DEVICE)
    G = randn(8, 9, dtype=torch.float32).to(DEVICE)
    Fc = compact.to_compact(pack_tril(A))

    def f(A, G, Fc):
        L, info = mk.linalg.cholesky_ex(A, 0.1, backend="triton")
        # (linalg.solve_spd inspects info to raise, a data-dependent branch: the op does not)
        X, _ = torch.ops.mbf_kernels.triton_solve_spd_ex(A, G[:, :, None], 0.1)
        Fc = compact.outer_ema_(Fc.clone(), G, 0.9, backend="triton")
        factor, _ = compact.cholesky_ex(Fc, 8, 0.1, backend="triton")
        return L * 2, info, X, compact.solve(factor, G, backend="triton")

    # aot_eager: Dynamo and AOTAutograd trace through the ops (functionalizing their mutations)
    # and run the kernels as traced; Inductor's code generation for them needs a GPU (below).
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    for got, want in zip(compiled(A, G, Fc), f(A, G, Fc)):
        torch.testing.assert_close(got, want)


def test_torch_compile_traces_the_bucket_step():
    def f(params, grads, momenta, F, L, stats, segments):
        mt.mbf_bucket_step_(params, grads, momenta, F, L, stats, segments, lr=0.1,
                            momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.0,
                            decoupled_weight_decay=False)
        return params[0] * 1

    out = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        params, grads, momenta, tiles, segments = _bucket(torch.float64, DEVICE)
        F = torch.zeros(tiles, 45, 16, dtype=torch.float64, device=DEVICE)
        stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        out.append((fn(params, grads, momenta, F, F.clone(), stats, segments), params, F))
    torch.testing.assert_close(out[1][0], out[0][0])
    for a, b in zip(out[1][1], out[0][1]):  # the mutations reached the real tensors
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out[1][2], out[0][2])


# ---------------------------------------------------------------------------------------------
# Triton's real compiler: the interpreter above never meets it


def _has_nvidia_backend() -> bool:
    return importlib.util.find_spec("triton.backends.nvidia") is not None


_STEP_VARIANTS = {"_bucket_refactor_kernel": ("refresh + refactor",),
                  "_bucket_step_kernel": ("cached factor", "first refresh", "refresh, decoupled")}
COMPILE_CASES = (
    [f"{name}:9:fp32:90:{variant}"
     for name in ("_dense_cholesky_kernel", "_dense_cholesky_solve_kernel",
                  "_dense_solve_spd_kernel", "_dense_inv_spd_kernel", "_dense_outer_ema_kernel",
                  "_compact_outer_ema_kernel", "_compact_cholesky_kernel",
                  "_compact_solve_kernel", "_bucket_refactor_kernel", "_bucket_step_kernel")
     for variant in _STEP_VARIANTS.get(name, ("",))]
    + ["_bucket_step_kernel:1:fp32:90:cached factor",
       f"_bucket_step_kernel:{MAX_D}:fp32:90:first refresh",
       f"_bucket_refactor_kernel:{MAX_D}:fp32:90:refresh + refactor",
       "_bucket_step_kernel:9:fp64:90:cached factor",
       "_bucket_step_kernel:9:fp32:80:first refresh",
       "_bucket_refactor_kernel:9:fp32:80:refactor only",
       "_bucket_step_kernel:9:fp32:90:graft measure",
       "_bucket_step_kernel:9:fp32:90:graft write",
       "_bucket_refactor_kernel:9:fp32:90:relative damping",
       "_dense_solve_spd_kernel:2:fp64:80:"]
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every case through Triton's real compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the
    ptxas Triton ships: no GPU needed), in a process without TRITON_INTERPRET."""
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "mbf_kernels.triton.compile_check", "--json", str(out)]
    for case in COMPILE_CASES:
        args += ["--case", case]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    assert out.exists(), proc.stderr[-3000:]
    return {f"{r['name']}:{r['d']}:{r['dtype']}:{r['arch']}:{r['variant']}": r
            for r in json.loads(out.read_text())}


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend is not installed")
@pytest.mark.parametrize("case", COMPILE_CASES)
def test_kernel_compiles_to_cubin(compiled, case):
    result = compiled[case]
    assert "error" not in result, result.get("error")
    assert 0 < result["registers"] <= 255


# ---------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_step_on_cuda_large_bucket():
    pair = StepBucket(100_000, 9, torch.float32, mt.mbf_step_, device="cuda", seed=4)
    hyper = dict(lr=0.01, momentum_coef=0.9, beta=0.9, damping=0.1, weight_decay=0.0,
                 decoupled_weight_decay=False)
    for k, flags in enumerate(SCHEDULE):
        pair.step(randn(100_000, 9, dtype=torch.float32, seed=k).cuda(), **hyper, **flags)
    pair.assert_matches(torch.float32, "cuda")
