"""Shared blocks kept at a rank (mbf_kernels.optim.lowrank): the curvature against the dense EMA
it approximates (exact at full rank, the error bounded by the discarded spectrum), the applied
inverse against torch.linalg, and the optimizer's state, failures and memory."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mbf_kernels as mk
from mbf_kernels.optim import PAPER, ReferenceMBF
from mbf_kernels.optim.lowrank import LowRankCurvature
from mbf_kernels.optim.shared_block import SharedBlock

DEVICE = torch.device("cpu")


def _gradients(steps: int, n: int, d: int, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """Gradient rows of a layer: a few directions per step plus a little noise, as a linear
    layer's are (the rows of G = Delta^T A span the batch's activations)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        G = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, d, generator=g, dtype=torch.float64)
        out.append(G + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64))
    return out


def _ema(grads: list[torch.Tensor], beta: float) -> torch.Tensor:
    F_ = None
    for G in grads:
        C = G.mT @ G / G.shape[0]
        F_ = C if F_ is None else beta * F_ + (1 - beta) * C
    return F_


def _refreshed(grads, d, k, beta=0.9, dtype=torch.float64) -> LowRankCurvature:
    block = LowRankCurvature(d, k, dtype, DEVICE, seed=3)
    for i, G in enumerate(grads):
        block.refresh(G.to(dtype), beta, first=i == 0)
    return block


@pytest.mark.parametrize("n", [3, 40])  # rank-deficient C (n < d) and full-rank C
def test_full_rank_is_exact(n):
    d = 30
    grads = _gradients(6, n, d, rank=4)
    block = _refreshed(grads, d, k=d)
    F_ = _ema(grads, 0.9)
    torch.testing.assert_close(block.dense(), F_, rtol=0, atol=1e-11 * F_.norm().item())


def test_refreshes_converge_to_the_top_eigenvectors_and_keep_the_trace():
    """Refreshed from one C (the EMA of one C is C), the warm-started refreshes are a subspace
    iteration: the basis converges to C's top k eigenvectors (slowly where the spectrum decays
    slowly: here 1 / i^2) and the error ||F_k - C||_2 falls to the discarded spectrum's size.
    The trace is exact throughout (the missed trace is spread as r I)."""
    d, k, n = 60, 6, 80
    g = torch.Generator().manual_seed(0)
    eig = 1.0 / torch.arange(1, d + 1, dtype=torch.float64) ** 2
    V = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    U = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64)).Q
    G = U @ torch.diag((n * eig).sqrt()) @ V.mT  # G^T G / n = V diag(eig) V^T
    C = G.mT @ G / n
    errors = []
    for refreshes in (1, 60):
        block = _refreshed([G] * refreshes, d, k)
        torch.testing.assert_close(block.trace(), torch.trace(C), rtol=1e-12, atol=0)
        top = V[:, :k]
        errors.append(torch.linalg.matrix_norm(block.dense() - C, 2))
    sin_theta = torch.linalg.matrix_norm(block.basis - top @ (top.mT @ block.basis), 2)
    assert sin_theta < 0.02
    assert errors[1] <= eig[k] < errors[0]


def test_a_single_refresh_at_low_rank_stays_within_the_discarded_spectrum():
    """One randomized Nystrom refresh (no subspace iteration yet): the error stays within a small
    multiple of the discarded spectrum's size (Tropp et al.'s bound, oversampled)."""
    d, k = 50, 8
    G = _gradients(1, 80, d, rank=8)[0]
    F_ = G.mT @ G / G.shape[0]
    block = _refreshed([G], d, k)
    eig = torch.linalg.eigvalsh(F_).flip(0)
    assert torch.linalg.matrix_norm(block.dense() - F_, 2) <= 3 * eig[k:].sum()


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("k", [30, 5])
def test_applied_inverse_against_torch_linalg(k, relative):
    """U = M (F_k + lambda I)^{-1} as the step applies it: equal to torch.linalg.solve with F_k,
    and, at full rank, with the exact F; lambda relative = damping times F's mean eigenvalue."""
    d, damping = 30, 0.1
    grads = _gradients(4, 20, d, rank=3)
    block = _refreshed(grads, d, k)
    assert not block.refactor(damping, relative)
    Fk = block.dense()
    lam = damping * torch.trace(Fk) / d + mk.reference.RELATIVE_DAMPING_FLOOR if relative \
        else damping
    M = torch.randn(7, d, dtype=torch.float64)
    U = block.apply(M, out=torch.empty_like(M)) * block.apply_scale
    eye = torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(U, torch.linalg.solve(Fk + lam * eye, M.mT).mT, rtol=1e-10,
                               atol=1e-12)
    if k == d:
        F_ = _ema(grads, 0.9)
        torch.testing.assert_close(U, torch.linalg.solve(F_ + lam * eye, M.mT).mT, rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.parametrize("k", [30, 12, 5])
def test_row_squares_of_the_grafted_direction(k):
    """|u_j|^2 of u = M (I - V diag(w) V^T) from |m_j|^2 and T = M V alone (the grafted step
    never forms U at a rank): equal to the explicit norms in float64; in float32 within a few
    epsilons of |m_j|^2 (the difference |m_j|^2 - |T_j|^2 cancels), here for rows that lie 99.9%
    in V's span."""
    d = 30
    block = _refreshed(_gradients(4, 20, d, rank=3), d, k)
    assert not block.refactor(0.1, relative=True)
    g = torch.Generator().manual_seed(3)
    V = block.apply_basis
    M = torch.randn(9, d, generator=g, dtype=torch.float64)
    M[4:] = (M[4:] @ V) @ V.mT + 1e-3 * M[4:]  # mostly in V's span
    want = block.apply(M, out=torch.empty_like(M)).square().sum(1)
    got = block.row_squares(M.square().sum(1), M @ V)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * M.square().sum(1).max())
    M32 = M.float()
    block32 = _refreshed(_gradients(4, 20, d, rank=3), d, k, dtype=torch.float32)
    block32.apply_basis.copy_(V)
    block32.apply_weight.copy_(block.apply_weight)
    got32 = block32.row_squares(M32.square().sum(1), M32 @ V.float()).double()
    err = (got32 - want).abs() / M.square().sum(1)
    assert err.max() < 16 * d * torch.finfo(torch.float32).eps


def test_float32_full_rank_within_rounding():
    d = 24
    grads = _gradients(5, 12, d, rank=3)
    block = _refreshed(grads, d, k=d, dtype=torch.float32)
    F_ = _ema(grads, 0.9)
    err = (block.dense().double() - F_).norm() / F_.norm()
    assert err < 50 * d * torch.finfo(torch.float32).eps


def test_non_finite_gradient_leaves_the_curvature_as_it_was():
    d, k = 20, 4
    block = _refreshed(_gradients(2, 10, d, rank=2), d, k)
    before = {key: t.clone() for key, t in block.curvature_state().items()}
    G = _gradients(1, 10, d, rank=2, seed=9)[0]
    G[3, 4] = float("nan")
    assert not block.refresh(G, 0.9, first=False)
    for key in ("basis", "excess", "residual"):
        assert torch.equal(block.curvature_state()[key], before[key])
    G[3, 4] = 1e300  # finite, but its square overflows: skipped too
    assert not block.refresh(G, 0.9, first=False)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 50), nn.Tanh(), nn.Linear(50, 30, bias=False), nn.Tanh(),
                         nn.Linear(30, 5)).double()


def _train(model, opt, steps, start=0):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 40, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 5, (64,), generator=g)
    for k in range(start, start + steps):
        opt.zero_grad()
        F.cross_entropy(model(X[8 * (k % 8):][:8]), Y[8 * (k % 8):][:8]).backward()
        opt.step()


OPTS = dict(max_block_size=8, curvature_update_freq=2, inverse_update_freq=3)


@pytest.mark.parametrize("update", [{}, dict(PAPER, damping=0.05, lr=0.02)])
def test_optimizer_at_full_rank_matches_the_dense_reference(update):
    """Every shared block (d = 41, 50 and 31) kept at a rank >= d: the paper's update and the
    default one (grafted, relative damping) equal ReferenceMBF's exact shared blocks."""
    out = []
    for cls, mode in ((mk.MBF, "lowrank"), (ReferenceMBF, "shared")):
        model = _mlp()
        opt = cls.from_model(model, large_linear=mode, shared_rank=64, **OPTS, **update)
        _train(model, opt, 10)
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(out[0], out[1], rtol=1e-8, atol=1e-10)


def test_grafted_update_without_u_equals_the_one_through_u(monkeypatch):
    """The grafted step at a rank adds M and T's rank-k term to the parameters (U never formed);
    parameters it cannot write that way (another dtype, strided) go through U in the work rows,
    as before: both give the same training, forced here on one model."""
    out = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(SharedBlock, "_updates_in_place", lambda self: False)
        model = _mlp()
        opt = mk.MBF.from_model(model, large_linear="lowrank", shared_rank=6, **OPTS)
        _train(model, opt, 8)
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-11)


def test_state_dict_resumes_bit_for_bit_and_checks_the_rank():
    model = _mlp()
    opt = mk.MBF.from_model(model, large_linear="lowrank", shared_rank=6, **OPTS)
    _train(model, opt, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 6, start=5)  # two more refreshes: their random columns must match too
    buf.seek(0)
    saved = torch.load(buf)
    other = _mlp()
    resumed = mk.MBF.from_model(other, large_linear="lowrank", shared_rank=6, **OPTS)
    # stepped before the load: on the CPU its step is bound to V^T, which the load rewrites
    _train(other, resumed, 4)
    other.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    _train(other, resumed, 6, start=5)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    wrong = mk.MBF.from_model(_mlp(), large_linear="shared", **OPTS)
    with pytest.raises(ValueError, match="large_linear, shared_rank"):
        wrong.load_state_dict(saved["opt"])


@pytest.mark.parametrize("rank", [3, 9])
def test_state_dict_loads_at_another_rank(rank):
    """A state saved at rank 6 loads at rank 3 (the three largest eigenpairs kept, the rest
    spread into r: the trace is kept) and at rank 9 (padded with zero eigenvalues: the same F
    and the same applied inverse)."""
    model = _mlp()
    opt = mk.MBF.from_model(model, large_linear="lowrank", shared_rank=6, **OPTS)
    _train(model, opt, 5)
    other = mk.MBF.from_model(model, large_linear="lowrank", shared_rank=rank, **OPTS)
    other.load_state_dict(opt.state_dict())
    for a, b in zip(opt._plans[0].shared_blocks, other._plans[0].shared_blocks):
        a, b = a.lowrank, b.lowrank
        torch.testing.assert_close(b.trace(), a.trace(), rtol=1e-12, atol=0)
        if rank > 6:
            torch.testing.assert_close(b.dense(), a.dense(), rtol=0, atol=1e-12)
            M = torch.randn(5, a.d, dtype=torch.float64)
            torch.testing.assert_close(b.apply(M, torch.empty_like(M)),
                                       a.apply(M, torch.empty_like(M)), rtol=0, atol=1e-12)
        else:
            torch.testing.assert_close(b.excess, a.excess[:rank])
    _train(model, other, 3, start=5)  # and it steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_imagenet_head_state_and_the_warning_for_exact_blocks():
    """The ImageNet VGG16 classifier (25088 -> 4096 -> 4096 -> 1000), built on the meta device:
    with the default "auto" its optimizer state is under 2 GB (at the CPU's rank, as meta's;
    at CUDA's 128 the three blocks add 30 MB); exact shared blocks would take 9.4 GB, and say
    so."""
    with torch.device("meta"):
        head = nn.Sequential(nn.Linear(25088, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                             nn.Linear(4096, 1000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = mk.MBF.from_model(head)
    assert [(r["kind"], r["d"], r["rank"]) for r in opt.block_summary()] == [
        ("lowrank", 25089, 16), ("lowrank", 4097, 16), ("lowrank", 4097, 16)]
    assert opt.state_bytes() < 2e9
    with pytest.warns(UserWarning, match=r"0\.weight \(d = 25089\).*GiB"):
        exact = mk.MBF.from_model(head, large_linear="shared")
    assert exact.state_bytes() > 8 * 2**30


def test_round_tf32_and_the_emulated_gemm():
    from mbf_kernels.optim.precision import round_tf32, shared_matmul
    x = torch.tensor([1.0, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-12, -1.5])
    assert round_tf32(x).tolist() == [1.0, 1 + 2**-10, 1 + 2**-9, 1.0, -1.5]
    g = torch.Generator().manual_seed(0)
    A, B, C = (torch.randn(shape, generator=g) for shape in ((30, 40), (40, 5), (30, 5)))
    exact = (round_tf32(A).double() @ round_tf32(B).double())
    with shared_matmul("tf32", DEVICE):
        for got in (A @ B, torch.mm(A, B), torch.addmm(C, A, B) - C, C.clone().addmm_(A, B) - C):
            torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-5)
    assert (A @ B - exact).abs().max() > 1e-3  # outside, float32 as before


@pytest.mark.parametrize("large_linear", ["shared", "lowrank"])
def test_shared_matmul_tf32_changes_only_the_applied_gemms(large_linear):
    """shared_matmul="tf32" (emulated here, tensor cores on CUDA): the update moves by TF32's
    rounding (~2^-11 relative) and the curvature, refreshed in float32 from the same gradients,
    is the same."""
    out = {}
    for mode in ("float32", "tf32"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 50), nn.Tanh(), nn.Linear(50, 5))
        opt = mk.MBF.from_model(model, max_block_size=8, large_linear=large_linear,
                                shared_rank=8, shared_matmul=mode, curvature_update_freq=2)
        before = [p.detach().clone() for p in model.parameters()]
        g = torch.Generator().manual_seed(1)
        X, Y = torch.randn(16, 40, generator=g), torch.randint(0, 5, (16,), generator=g)
        for k in range(3):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()
            if k == 0:  # the first refresh saw the same gradients in both runs
                curv = opt.state_dict()["state"][0]["curvature"][0]
                curv = (curv["basis"] if isinstance(curv, dict) else curv).clone()
        delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        out[mode] = (delta, curv)
    (d32, c32), (dtf, ctf) = out["float32"], out["tf32"]
    assert torch.equal(c32, ctf)
    assert 0 < (dtf - d32).norm() < 5e-3 * d32.norm()


@pytest.mark.parametrize("native", [True, False])
def test_shared_matmul_auto_is_bfloat16_on_a_bfloat16_cpu_under_relative_damping(
        native, monkeypatch):
    """"auto": TF32 on CUDA; on a CPU that multiplies bfloat16 in hardware, "bfloat16" under
    relative damping (the default) and float32 under the paper's absolute damping; float32 on
    other CPUs. The optimizer follows it: a bfloat16 copy of the inverse exists only then (for
    the block whose GEMM is large enough to gain: precision.BF16_MIN_FLOPS)."""
    from mbf_kernels.optim import precision
    monkeypatch.setattr(precision, "native_bfloat16", lambda: native)
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu, "relative") == ("bfloat16" if native else "float32")
    assert precision.resolve("auto", cpu, "absolute") == "float32"
    assert precision.resolve("auto", torch.device("cuda"), "relative") == "tf32"
    assert precision.resolve("float32", cpu, "relative") == "float32"
    for options, bf16 in ((dict(), native), (dict(PAPER), False)):
        model = nn.Sequential(nn.Linear(300, 40), nn.Tanh(), nn.Linear(40, 5))
        opt = mk.MBF.from_model(model, max_block_size=8, large_linear="shared", **options)
        F.cross_entropy(model(torch.randn(4, 300)), torch.arange(4)).backward()
        opt.step()
        blocks = opt._plans[0].shared[0].blocks
        assert [b.inverse_bf16 is not None for b in blocks] == [bf16, False]
        assert [r["matmul"] for r in opt.block_summary() if r["kind"] == "shared"] == [
            "bfloat16" if bf16 else "float32", "float32"]


def test_loading_its_own_state_dict_changes_nothing():
    """state_dict() hands out the live tensors (as torch's optimizers do), and DCP loads into
    them in place: loading an optimizer's own state dict must not clear it on the way."""
    a, b = _mlp(), _mlp()
    opt_a = mk.MBF.from_model(a, large_linear="lowrank", shared_rank=6, **OPTS)
    opt_b = mk.MBF.from_model(b, large_linear="lowrank", shared_rank=6, **OPTS)
    _train(a, opt_a, 4)
    _train(b, opt_b, 4)
    opt_b.load_state_dict(opt_b.state_dict())
    _train(a, opt_a, 3, start=4)
    _train(b, opt_b, 3, start=4)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
