"""MBF-True (fisher="true", MBF_SPEC section 3b): targets sampled from the model's predictive
distribution (checked against the distributions themselves), the fisher_pass() that routes one
backward pass into the curvature only, and the optimizer on every backend against the dense
ReferenceMBF driven by the same samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mbf_kernels as mk
from mbf_kernels.optim import ReferenceMBF, sampled_loss, sampled_targets
from mbf_kernels.packed import pack_tril
from conftest import compiled_backends
from test_optimizer_graft import _flat, _net, _data


def test_cross_entropy_targets_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]).repeat(20000, 1)
    t = sampled_targets(logits, "cross_entropy", generator=torch.Generator().manual_seed(0))
    for row, probs in ((0, logits[0].softmax(0)), (1, logits[1].softmax(0))):
        freq = torch.bincount(t[row::2], minlength=3).double() / 20000
        # 5 standard errors of a frequency from 20000 draws
        assert (freq - probs.double()).abs().max() < 5 * (0.25 / 20000) ** 0.5


def test_bce_and_gaussian_targets_follow_their_distributions():
    g = torch.Generator().manual_seed(1)
    logits = torch.full((40000,), 0.7)
    t = sampled_targets(logits, "bce", generator=g)
    assert set(t.unique().tolist()) <= {0.0, 1.0}
    assert abs(t.mean() - torch.sigmoid(torch.tensor(0.7))) < 5 * (0.25 / 40000) ** 0.5
    pred = torch.full((40000,), 3.0)
    y = sampled_targets(pred, "mse", generator=g)
    assert abs(y.mean() - 3.0) < 5 * (0.5 / 40000) ** 0.5
    assert abs(y.var() - 0.5) < 0.02  # F.mse_loss is the NLL of a Gaussian of variance 1/2


def test_sampled_targets_reject_unknown_losses_and_shapes():
    with pytest.raises(ValueError, match="loss must be one of"):
        sampled_targets(torch.zeros(3, 2), "hinge")
    with pytest.raises(ValueError, match=r"cross_entropy needs \(N, C\) logits"):
        sampled_targets(torch.zeros(3), "cross_entropy")


def test_fisher_pass_captures_its_gradients_and_restores_the_data_gradients():
    model = nn.Linear(4, 3, dtype=torch.float64)
    opt = mk.MBF.from_model(model, fisher="true", curvature_update_freq=1)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    out = model(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    data_grad = model.weight.grad.clone()
    gen = torch.Generator().manual_seed(5)
    assert opt.wants_fisher()
    with opt.fisher_pass():
        sampled_loss(out, "cross_entropy", generator=gen).backward(retain_graph=True)
    assert torch.equal(model.weight.grad, data_grad)
    t = sampled_targets(out, "cross_entropy", generator=torch.Generator().manual_seed(5))
    want_w, want_b = torch.autograd.grad(F.cross_entropy(out, t), (model.weight, model.bias))
    torch.testing.assert_close(opt._fisher_grads[model.weight], want_w, rtol=0, atol=0)
    torch.testing.assert_close(opt._fisher_grads[model.bias], want_b, rtol=0, atol=0)
    opt.step()
    # The first refresh sets F = g_s g_s^T per row [W_j, b_j] of the sampled gradient g_s.
    rows = torch.cat([want_w, want_b[:, None]], 1)
    curvature = opt.state_dict()["state"][0]["curvature"][0]
    torch.testing.assert_close(curvature, pack_tril(rows[:, :, None] * rows[:, None, :]),
                               rtol=1e-12, atol=1e-15)
    assert opt._fisher_grads == {}  # used by that step, not kept for the next


def test_a_refresh_without_a_fisher_pass_raises_and_changes_nothing():
    model = _net()
    opt = mk.MBF.from_model(model, fisher="true")
    X, Y = _data()
    F.cross_entropy(model(X), Y).backward()
    before = _flat(model).clone()
    with pytest.raises(RuntimeError, match="no gradient for it was captured.*fisher_pass"):
        opt.step()
    assert torch.equal(_flat(model), before)
    assert all(opt.state[p]["momentum_buffer"].abs().max() == 0 for p in model.parameters())


def test_wants_fisher_follows_the_refresh_schedule():
    model = _net()
    opt = mk.MBF.from_model(model, fisher="true", curvature_update_freq=3)
    X, Y = _data()
    wanted = []
    for k in range(7):
        opt.zero_grad()
        out = model(X[:8])
        wanted.append(opt.wants_fisher())
        if wanted[-1]:
            with opt.fisher_pass():
                sampled_loss(out, "cross_entropy").backward(retain_graph=True)
        F.cross_entropy(out, Y[:8]).backward()
        opt.step()
    assert wanted == [True, False, False, True, False, False, True]
    assert not mk.MBF.from_model(_net()).wants_fisher()  # empirical: never


def _train_true(model, opt, steps):
    X, Y = _data()
    for k in range(steps):
        idx = torch.arange(8) + 8 * (k % 3)
        opt.zero_grad()
        out = model(X[idx])
        if opt.wants_fisher():
            with opt.fisher_pass():
                sampled_loss(out, "cross_entropy",
                             generator=torch.Generator().manual_seed(k)).backward(
                    retain_graph=True)
        F.cross_entropy(out, Y[idx]).backward()
        opt.step()


@pytest.mark.parametrize("opts", [dict(), dict(graft="adam", damping_mode="relative", damping=0.1,
                                             lr=1e-2)], ids=["paper", "graft-relative"])
@pytest.mark.parametrize("backend", ["torch"] + compiled_backends(covering=17))
@pytest.mark.parametrize("large_linear", ["shared", "lowrank"])
def test_true_fisher_optimizer_matches_dense_reference(backend, opts, large_linear):
    """Ten steps, T1 = 2, T2 = 3, float64, the same sampled labels for both (seeded per step).
    The shared block (d = 49) exact, or kept at a rank >= d (exact too: lowrank.py)."""
    opts = dict(opts, fisher="true", curvature_update_freq=2, inverse_update_freq=3,
                max_block_size=20)
    a, b = _net(), _net()
    start = _flat(a)
    _train_true(a, mk.MBF.from_model(a, backend=backend, large_linear=large_linear,
                                     shared_rank=64, **opts), 10)
    _train_true(b, ReferenceMBF.from_model(b, **opts), 10)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-8, atol=1e-10)
    assert (_flat(a) - start).abs().max() > 1e-3
    # ... and the curvature is not the empirical one: the same run with fisher="empirical"
    c = _net()
    empirical = dict(opts, fisher="empirical")
    _train_true(c, mk.MBF.from_model(c, backend=backend, **empirical), 10)
    assert (_flat(c) - _flat(a)).abs().max() > 1e-6
