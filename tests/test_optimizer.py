"""mk.MBF against the dense plain-PyTorch ReferenceMBF, and as a torch.optim.Optimizer: the
paper's update (``**PAPER``; the shipped defaults' grafting and relative damping are tested the
same way in test_optimizer_graft.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mbf_kernels as mk
from mbf_kernels.optim import PAPER, ReferenceMBF

from conftest import compiled_backends

#: Largest block of Net (the 5x5 convolution): the backends tested here must take it (the
#: Triton kernels stop below it and have their own optimizer tests in test_optimizer_backends.py).
NET_MAX_D = 25
BACKENDS = [pytest.param("torch", id="torch"), *compiled_backends(covering=NET_MAX_D)]
# fp64: only summation order differs; fp32 after 7 steps of preconditioned updates.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}


class Net(nn.Module):
    """Convs of several kernel sizes (one grouped), norm layers, linears below and above
    max_block_size with biases: every kind of block of MBF_SPEC section 2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 5, padding=2, groups=3, bias=False)
        self.conv3 = nn.Conv2d(6, 4, 1)
        self.fc1 = nn.Linear(4 * 4 * 4, 20)  # d = 65 > 64: large_linear
        self.ln = nn.LayerNorm(20)
        self.fc2 = nn.Linear(20, 5)  # d = 21

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv3(F.relu(self.conv2(x))))
        return self.fc2(F.relu(self.ln(self.fc1(x.flatten(1)))))


def make_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Net().to(dtype)


def batches(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 4, 4, generator=g).to(dtype), torch.randint(0, 5, (8,), generator=g))
            for _ in range(n)]


def train(model, opt, data, scheduler=None):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def two_groups(model):
    convs = [p for n, p in model.named_parameters() if n.startswith(("conv", "bn"))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("conv", "bn"))]
    return [{"params": convs}, {"params": rest, "lr": 0.02, "damping": 0.3, "momentum": 0.5}]


OPTIONS = dict(lr=0.05, damping=0.1, curvature_update_freq=2, inverse_update_freq=3, **PAPER)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("large_linear", ["shared", "chunk", "diagonal"])
def test_matches_reference(backend, dtype, decoupled, large_linear):
    """7 steps, T1 = 2 and T2 = 3, weight decay, two param groups, every block kind."""
    data = batches(7, dtype)
    results = []
    for cls, extra in ((ReferenceMBF, {}), (mk.MBF, {"backend": backend})):
        model = make_net(dtype)
        roles = mk.optim.blocks.module_roles(model)
        opt = cls(two_groups(model), _roles=roles, weight_decay=1e-2,
                  decoupled_weight_decay=decoupled, large_linear=large_linear, **OPTIONS, **extra)
        losses = train(model, opt, data)
        results.append((flat(model), losses, opt.stats))
    (ref_p, ref_l, ref_s), (p, losses, stats) = results
    torch.testing.assert_close(p, ref_p, **TOL[dtype])
    assert stats == ref_s == {"skipped_curvature": 0, "failed_factor": 0}


@pytest.mark.parametrize("backend", compiled_backends(covering=NET_MAX_D))
def test_backends_agree_bit_for_bit_in_float64_shape(backend):
    """The compiled step and the torch bucket step run the same math on the same layout."""
    out = []
    for b in ("torch", backend):
        model = make_net()
        train(model, mk.MBF.from_model(model, backend=b, **OPTIONS), batches(4))
        out.append(flat(model))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-14)


def test_first_step_is_the_damped_natural_gradient():
    """Step 1 on one 3x3 kernel: p -= lr (g g^T + lambda I)^{-1} g = lr g / (lambda + |g|^2)."""
    w = nn.Parameter(torch.randn(1, 1, 3, 3, dtype=torch.float64))
    w0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    mk.MBF([w], lr=0.1, damping=0.5, **PAPER).step()
    g = w.grad
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g / (0.5 + (g * g).sum()))


# -- behaves like any torch.optim.Optimizer ----------------------------------------------------


def test_parameters_without_gradient_are_skipped():
    model = make_net()
    model.fc2.weight.requires_grad_(False)
    model.fc2.bias.requires_grad_(False)
    frozen = model.fc2.weight.detach().clone()
    opt = mk.MBF.from_model(model, **OPTIONS)
    train(model, opt, batches(3))
    assert torch.equal(model.fc2.weight, frozen)
    assert opt.state[model.fc2.weight]["step"] == 0
    assert opt.state[model.conv1.weight]["step"] == 3


def test_step_counts_are_per_parameter():
    """A parameter that missed steps follows its own T1/T2 schedule (MBF_SPEC section 3)."""
    data = batches(6)
    out = []
    for cls in (ReferenceMBF, mk.MBF):
        model = make_net()
        opt = cls.from_model(model, **OPTIONS)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if i in (1, 2):
                model.conv2.weight.grad = None  # conv2 sees 4 of the 6 steps
            opt.step()
        out.append(flat(model))
        assert opt.state[model.conv2.weight]["step"] == 4
    torch.testing.assert_close(out[1], out[0], **TOL[torch.float64])


def test_closure_returns_the_loss():
    model = make_net()
    opt = mk.MBF.from_model(model, **OPTIONS)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    l1 = opt.step(closure)
    l2 = opt.step(closure)
    assert torch.is_tensor(l1) and l2.item() < l1.item()


def test_add_param_group_later():
    data = batches(4)
    out = []
    for cls in (ReferenceMBF, mk.MBF):
        model = make_net()
        head = list(model.fc2.parameters())
        body = [p for p in model.parameters() if all(p is not q for q in head)]
        opt = cls(body, **OPTIONS)
        train(model, opt, data[:2])
        opt.add_param_group({"params": head, "lr": 0.01})
        train(model, opt, data[2:])
        out.append(flat(model))
    torch.testing.assert_close(out[1], out[0], **TOL[torch.float64])


def test_lr_scheduler():
    data = batches(6)
    out = []
    for cls in (ReferenceMBF, mk.MBF):
        model = make_net()
        opt = cls.from_model(model, **OPTIONS)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        train(model, opt, data, sched)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1 ** 3)
        out.append(flat(model))
    torch.testing.assert_close(out[1], out[0], **TOL[torch.float64])


def test_compiled_step_runs_eagerly_under_an_lr_schedule():
    """torch.compile(opt.step), the shipped defaults (docs/semantics.md): the fused step runs
    eagerly, so a schedule's new lr at every step compiles nothing (traced, each lr was a new
    graph), and the trajectory is the eager one bit for bit."""
    from torch._dynamo.utils import counters

    data = batches(6, torch.float32)
    out = []
    for compiled in (False, True):
        model = make_net(torch.float32)
        opt = mk.MBF.from_model(model, lr=1e-3, curvature_update_freq=2, inverse_update_freq=3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k))
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(opt.step) if compiled else opt.step
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            step()
            sched.step()
        out.append(flat(model))
    assert counters["stats"]["unique_graphs"] == 0
    assert torch.equal(out[1], out[0])


def test_grad_scaler_skips_inf_steps_and_unscales():
    model = make_net(torch.float32)
    opt = mk.MBF.from_model(model, **OPTIONS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = batches(1, torch.float32)[0]
    before = flat(model)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(flat(model), before)  # inf gradients: GradScaler skipped the step
    assert opt.state[model.conv1.weight]["step"] == 0
    # A finite step through the scaler equals the unscaled step.
    twin = copy.deepcopy(model)
    twin_opt = mk.MBF.from_model(twin, **OPTIONS)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    train(twin, twin_opt, [(x, y)])
    torch.testing.assert_close(flat(model), flat(twin), **TOL[torch.float32])


def test_gradient_accumulation_reads_only_grad():
    x, y = batches(1)[0]
    a, b = make_net().eval(), make_net().eval()  # eval: BatchNorm is per-sample
    opt_a, opt_b = mk.MBF.from_model(a, **OPTIONS), mk.MBF.from_model(b, **OPTIONS)
    for half in (slice(0, 4), slice(4, 8)):  # two micro-batches, summed gradients
        (F.cross_entropy(a(x[half]), y[half], reduction="sum") / 8).backward()
    opt_a.step()
    F.cross_entropy(b(x), y).backward()
    opt_b.step()
    torch.testing.assert_close(flat(a), flat(b), **TOL[torch.float64])


@pytest.mark.parametrize("large_linear", ["auto", "lowrank"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_float32_state(dtype, large_linear):
    model32 = make_net(torch.float32)
    model = copy.deepcopy(model32).to(dtype)
    opts = dict(OPTIONS, large_linear=large_linear, shared_rank=4)
    opt = mk.MBF.from_model(model, **opts)
    ref = mk.MBF.from_model(model32, **opts)
    for x, y in batches(3, torch.float32):
        for m, o in ((model, opt), (model32, ref)):
            o.zero_grad()
            m32 = m if m is model32 else None
            inp = x if m32 is not None else x.to(dtype)
            F.cross_entropy(m(inp).float(), y).backward()
            o.step()
    assert all(p.dtype == dtype for p in model.parameters())
    for st in opt.state.values():
        assert st["momentum_buffer"].dtype == torch.float32
    assert all(r["dtype"] == "torch.float32" for r in opt.block_summary())
    # Same trajectory within the parameter dtype's resolution.
    err = (flat(model).float() - flat(model32)).abs().max()
    assert err < (0.05 if dtype == torch.bfloat16 else 0.01), err


def test_deepcopy_continues_identically():
    model = make_net()
    opt = mk.MBF.from_model(model, **OPTIONS)
    train(model, opt, batches(3))
    # deepcopy the model and optimizer together, so that the copy refers to the new params
    model2, opt2 = copy.deepcopy((model, opt))
    data = batches(4, seed=5)
    train(model, opt, data)
    train(model2, opt2, data)
    assert torch.equal(flat(model), flat(model2))


def _save_and_resume(backend_a, backend_b, dtype=torch.float64):
    data = batches(8, dtype)
    model = make_net(dtype)
    opt = mk.MBF.from_model(model, backend=backend_a, **OPTIONS)
    train(model, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, data[4:])
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = make_net(dtype, seed=123)  # different init: everything must come from the file
    resumed.load_state_dict(saved["model"])
    opt2 = mk.MBF.from_model(resumed, backend=backend_b, **OPTIONS)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, data[4:])
    return flat(model), flat(resumed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resumes_bit_for_bit(backend):
    a, b = _save_and_resume(backend, backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", compiled_backends(covering=NET_MAX_D))
def test_state_dict_moves_between_backends(backend):
    for pair in (("torch", backend), (backend, "torch")):
        a, b = _save_and_resume(*pair)
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_state_dict_is_canonical_packed():
    w = nn.Parameter(torch.randn(2, 3, 3, 3, dtype=torch.float64))
    w.grad = torch.randn_like(w)
    opt = mk.MBF([w], lr=0.1, damping=0.5, **PAPER)
    opt.step()
    st = opt.state_dict()["state"][0]
    (C,), (L,) = st["curvature"], st["factor"]
    g = w.grad.reshape(6, 9)
    assert st["block_layout"] == [("blocks", 9, 6)]
    torch.testing.assert_close(C, mk.packed.pack_tril(g[:, :, None] * g[:, None, :]))
    want = torch.linalg.cholesky(mk.packed.unpack_tril(C) + 0.5 * torch.eye(9, dtype=C.dtype))
    torch.testing.assert_close(L, mk.compact.factor_from_cholesky(want))
    assert st["step"] == 1


def test_load_keeps_float32_state_of_bf16_parameters():
    model = make_net(torch.bfloat16)
    opt = mk.MBF.from_model(model, **OPTIONS)
    x, y = batches(1, torch.bfloat16)[0]
    F.cross_entropy(model(x).float(), y).backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = mk.MBF.from_model(model, **OPTIONS)
    opt2.load_state_dict(sd)
    for i, p in enumerate(model.parameters()):
        m = opt2.state[p]["momentum_buffer"]
        assert m.dtype == torch.float32
        assert torch.equal(m, sd["state"][i]["momentum_buffer"])


def test_load_rejects_another_layout_and_changes_nothing():
    model = make_net()
    opt = mk.MBF.from_model(model, **OPTIONS)
    train(model, opt, batches(1))
    sd = opt.state_dict()
    other = mk.MBF.from_model(model, large_linear="chunk", **OPTIONS)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="block layout"):
        other.load_state_dict(sd)
    after = other.state_dict()
    assert all(torch.equal(before["state"][i]["momentum_buffer"], after["state"][i]["momentum_buffer"])
               for i in before["state"])


# -- robustness (MBF_SPEC section 4) -----------------------------------------------------------


@pytest.mark.parametrize("mode", [pytest.param(PAPER, id="paper"), pytest.param({}, id="defaults")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_gradient_skips_only_its_blocks_curvature(backend, mode):
    w = nn.Parameter(torch.randn(4, 2, 3, 3, dtype=torch.float64))
    opt = mk.MBF([w], backend=backend, lr=0.1, damping=0.5, curvature_update_freq=1,
                 inverse_update_freq=1, **mode)
    w.grad = torch.randn_like(w)
    opt.step()
    curv0 = opt.state_dict()["state"][0]["curvature"][0].clone()
    w.grad = torch.randn_like(w)
    w.grad[1, 0, 2, 2] = float("nan")  # block 2 of 8
    w.grad[3, 1, 0, 0] = float("inf")  # block 7
    opt.step()
    curv = opt.state_dict()["state"][0]["curvature"][0]
    assert opt.stats["skipped_curvature"] == 2
    assert torch.isfinite(curv).all()
    assert torch.equal(curv[[2, 7]], curv0[[2, 7]])
    assert not torch.equal(curv[0], curv0[0])
    finite_blocks = [0, 1, 3, 4, 5, 6]
    assert torch.isfinite(w.detach().reshape(8, 9)[finite_blocks]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_singular_blocks_fall_back_and_stay_finite(backend):
    """damping 0 and zero gradients: singular blocks, counted, parameters finite."""
    lin = nn.Linear(4, 3, dtype=torch.float64)
    conv = nn.Conv2d(2, 2, 3, bias=False, dtype=torch.float64)
    model = nn.ModuleList([lin, conv])
    opt = mk.MBF.from_model(model, backend=backend, lr=0.1, damping=0.0, **PAPER)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    conv.weight.grad[0, 1] = 0.0  # one rank-0 block; the others are rank 1 (singular too)
    opt.step()
    assert opt.stats["failed_factor"] == 3 + 4  # every rank-1 block at damping 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("large_linear", ["shared", "lowrank"])
def test_shared_block_fallback_and_nan(large_linear):
    lin = nn.Linear(80, 2, dtype=torch.float64)  # d = 81 > 64: shared
    opt = mk.MBF.from_model(lin, lr=0.1, damping=0.0, curvature_update_freq=1, **PAPER,
                            large_linear=large_linear, shared_rank=8)
    lin.weight.grad = torch.randn_like(lin.weight)
    lin.bias.grad = torch.randn_like(lin.bias)
    before = lin.weight.detach().clone()
    opt.step()  # rank 2 of 81 at damping 0: fails, the fallback is a plain (bounded) step
    assert opt.stats["failed_factor"] == 1 and torch.isfinite(lin.weight).all()
    assert (lin.weight - before).abs().max() < 10
    lin.weight.grad[0, 0] = float("nan")
    saved = opt.state_dict()["state"][0]["curvature"][0]  # (a low-rank block's: live tensors)
    saved = {k: v.clone() for k, v in saved.items()} if isinstance(saved, dict) else saved.clone()
    opt.step()
    assert opt.stats["skipped_curvature"] == 1
    after = opt.state_dict()["state"][0]["curvature"][0]
    if large_linear == "lowrank":  # the curvature of the bad step is skipped, not mixed in
        assert all(torch.equal(saved[k], after[k]) for k in ("basis", "excess", "residual"))
    else:
        assert torch.equal(saved, after)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(damping=-0.1), "damping"), (dict(beta=1.0), "beta"),
    (dict(beta=-0.1), "beta"), (dict(momentum=1.5), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(curvature_update_freq=0), "curvature_update_freq"),
    (dict(inverse_update_freq=1.5), "inverse_update_freq"), (dict(max_block_size=0), "max_block_size"),
    (dict(large_linear="rows"), "large_linear"), (dict(conv1x1="x"), "conv1x1"),
    (dict(shared_rank=0), "shared_rank"), (dict(shared_rank=2.5), "shared_rank"),
    (dict(shared_matmul="fp16"), "shared_matmul"),
    (dict(backend="gpu"), "backend"), (dict(decoupled_weight_decay=1), "decoupled_weight_decay"),
    (dict(lr=float("nan")), "lr"), (dict(dampening=0.1), "dampening"),
])
def test_bad_options_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mk.MBF(make_net().parameters(), **kwargs)


#: torch.optim.AdamW's keywords at their defaults, as a call copied from AdamW passes them.
ADAMW_KEYWORDS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                      differentiable=False, fused=None)


def test_adamws_keywords_carry_over_and_its_variants_are_refused_by_name():
    """A constructor call copied from AdamW(fused=True) steps as MBF without its keywords;
    asking for a variant MBF lacks raises ValueError naming it."""
    data = batches(3, torch.float32)
    out = []
    for extra in ({}, dict(ADAMW_KEYWORDS, fused=True), dict(ADAMW_KEYWORDS, foreach=False)):
        model = make_net(torch.float32)
        opt = mk.MBF.from_model(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                **extra)
        assert not set(ADAMW_KEYWORDS) & set(opt.param_groups[0])
        train(model, opt, data)
        out.append(flat(model))
    assert torch.equal(out[1], out[0]) and torch.equal(out[2], out[0])
    for name in ("amsgrad", "maximize", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{name}=True is AdamW's and not supported"):
            mk.MBF(make_net().parameters(), **dict(ADAMW_KEYWORDS, **{name: True}))
    with pytest.raises(ValueError, match="fused must be None or a bool"):
        mk.MBF(make_net().parameters(), fused="yes")


def test_bad_group_option_raises():
    model = make_net()
    with pytest.raises(ValueError, match="damping"):
        mk.MBF([{"params": model.parameters(), "damping": -1}])
    opt = mk.MBF(list(model.conv1.parameters()))
    with pytest.raises(ValueError, match="unknown option"):
        opt.add_param_group({"params": list(model.fc2.parameters()), "rho": 0.9})
    assert len(opt.param_groups) == 1


def test_sparse_and_complex_are_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = mk.MBF.from_model(emb)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    with pytest.raises(ValueError, match="complex"):
        mk.MBF([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


@pytest.mark.parametrize("backend", compiled_backends(covering=NET_MAX_D))
def test_explicit_backend_is_used(backend, monkeypatch):
    """backend='cpu' runs the compiled bucket op, once per bucket per step: through the op, or
    on the CPU through the bound buckets' one call for all of them (whose passes the profiler
    still names mbf_bucket_step_)."""
    calls = []
    real = torch.ops.mbf_kernels.mbf_bucket_step_.default
    import mbf_kernels._extension as ext
    from mbf_kernels.optim import bound
    monkeypatch.setattr(ext, "mbf_bucket_step_", lambda *a, **k: (calls.append(1), real(
        *a[:7], k["lr"], k["momentum_coef"], k["beta"], k["damping"], k["weight_decay"],
        k["decoupled_weight_decay"], list(k["second_moments"]), k["tile_damping"],
        k["tile_scale"], k["tile_norms"], k["directions"], k["beta2"], k["eps"],
        int(k["mode"])))[1])
    bound_step = bound.BoundBuckets.step
    monkeypatch.setattr(bound.BoundBuckets, "step", lambda self, *a: (
        calls.extend([1] * len(opt._plans[0].buckets)), bound_step(self, *a)))
    model = make_net()
    opt = mk.MBF.from_model(model, backend=backend, **OPTIONS)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(model, opt, batches(2))
    n_buckets = sum(r["kind"] == "blocks" for r in opt.block_summary())
    assert len(calls) == 2 * n_buckets
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("mbf_kernels::mbf_bucket_step_") == 2 * n_buckets


@pytest.mark.parametrize("large_linear", ["shared", "lowrank"])
def test_non_contiguous_parameters_match_contiguous_ones(large_linear):
    """A transposed weight (shared block, exact or at a rank) and a channels_last conv are
    updated through copies."""
    torch.manual_seed(0)
    w = torch.randn(80, 3, dtype=torch.float64)  # used as a (3, 80) linear weight: d = 81 > 64
    k = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    g_w, g_k = torch.randn(3, 80, dtype=torch.float64), torch.randn_like(k)
    w0 = w.t().flatten().clone()  # the strided parameter below is a view of w
    out = []
    for layout in ("contiguous", "strided"):
        lin = nn.Linear(80, 3, dtype=torch.float64)
        conv = nn.Conv2d(3, 2, 3, bias=False, dtype=torch.float64)
        with torch.no_grad():
            lin.bias.zero_()
            if layout == "strided":
                lin.weight = nn.Parameter(w.t())
                conv.weight = nn.Parameter(k.to(memory_format=torch.channels_last))
            else:
                lin.weight = nn.Parameter(w.t().contiguous())
                conv.weight = nn.Parameter(k.clone())
        assert lin.weight.is_contiguous() == (layout == "contiguous")
        model = nn.ModuleList([lin, conv])
        opt = mk.MBF.from_model(model, lr=0.1, damping=0.5, **PAPER, large_linear=large_linear,
                                shared_rank=8)
        for _ in range(2):
            lin.weight.grad, lin.bias.grad = g_w.clone(), torch.ones(3, dtype=torch.float64)
            conv.weight.grad = g_k.clone()
            opt.step()
        out.append(torch.cat([lin.weight.detach().flatten(), conv.weight.detach().flatten()]))
    assert not torch.equal(out[0][:240], w0)  # it moved
    torch.testing.assert_close(out[1], out[0], rtol=1e-12, atol=1e-14)
