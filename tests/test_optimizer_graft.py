"""Grafting (graft="adam") and relative damping (damping_mode="relative"), MBF_SPEC section 3b.

The bucket op's new arguments on every backend against the plain-PyTorch definition
(``reference.mbf_bucket_step_``), every mode (write, graft's measuring pass, grafted write,
refresh only) with and without per-tile damping; the optimizer on every backend against the
dense :class:`ReferenceMBF` written from the definition; and what the options promise, checked
against known mathematics: a grafted step is as long as AdamW's (``torch.optim.AdamW``) unit by
unit, grafting with relative damping is invariant to the scale of the loss, a NaN gradient in
one block does not spread to its unit, and the state round-trips through ``state_dict``.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mbf_kernels as mk
from mbf_kernels import compact, dispatch, reference
from mbf_kernels.optim import PAPER, ReferenceMBF
from mbf_kernels.optim.shared_block import inverse_from_factor
from mbf_kernels.layout import StepMode
from conftest import STEP_TOL, compiled_backends, cpu_levels, randn

DEVICE = "cpu"
MODES = {"write": StepMode.WRITE, "measure": StepMode.GRAFT,
         "graft-write": StepMode.WRITE | StepMode.GRAFT, "refresh-only": StepMode.NONE,
         "lagged": StepMode.WRITE | StepMode.GRAFT | StepMode.LAGGED}


def _bucket(dtype, flags=None):
    """Segments of 9-blocks with a bias tail (W (20, 8) + b (20,)), strided rows (columns 3..11
    of V (5, 14)) and plain rows (R (33, 9)), 6 tiles; flags differ per segment, and so do the
    units' step counts (Adam's bias correction)."""
    gen = [randn(20, 8, seed=1), randn(20, seed=2), randn(5, 14, seed=3), randn(33, 9, seed=4)]
    params = [t.to(dtype) for t in gen]
    grads = [randn(*t.shape, seed=10 + i).to(dtype) for i, t in enumerate(params)]
    grads[3][4, 2] = float("nan")  # block 4 of R: left out of the norms, its curvature kept
    momenta = [0.1 * randn(*t.shape, seed=20 + i).to(dtype) for i, t in enumerate(params)]
    second = [randn(*t.shape, seed=30 + i).to(dtype) ** 2 for i, t in enumerate(params)]
    segments = [0, 1, 20, 0, 8, 8, 0, 7, 1,
                2, -1, 5, 3, 9, 14, 2, 1, 4,
                3, -1, 33, 0, 9, 9, 3, 5, 12]
    if flags is not None:  # one set of flags for every segment, the step counts still differ
        segments[reference.SEGMENT_FIELDS - 2::reference.SEGMENT_FIELDS] = [flags] * 3
    return params, grads, momenta, second, 6, segments


def _real_blocks(C):
    """The canonical rows of the bucket's real blocks (tiles 0-1: 20, 2: 5, 3-5: 33)."""
    return torch.cat([compact.from_compact(C[t0:t1], n) for t0, t1, n in ((0, 2, 20), (2, 3, 5),
                                                                         (3, 6, 33))])


def _block_means(second, segments):
    """Adam's v per block (compact (tiles, 16), padding 0) as the mean of each block's per-entry
    v (what graft_second_moment="block" keeps: the EMA is linear)."""
    tiles = 6
    out = torch.zeros(tiles * 16, dtype=second[0].dtype)
    for s in range(0, len(segments), reference.SEGMENT_FIELDS):
        main, tail, n, offset, width, stride, tile0 = segments[s:s + 7]
        seg = reference.Segment(main, None if tail < 0 else tail, n, offset, width, stride)
        out[tile0 * 16:tile0 * 16 + n] = seg.rows(second).mean(1)
    return out.view(tiles, 16)


def _real_block_values(values):
    """The (tiles, 16) per-block values of the bucket's real blocks (as _real_blocks)."""
    return torch.cat([values[t0:t1].reshape(-1)[:n] for t0, t1, n in ((0, 2, 20), (2, 3, 5),
                                                                      (3, 6, 33))])


def _run_bucket(fn, dtype, mode, tile_damping, flags=None, norm_lanes=16, block_v=False,
                device="cpu"):
    """One call of ``fn`` on :func:`_bucket` (its tensors on ``device``); every tensor it may
    write, back on the CPU."""
    params, grads, momenta, second, tiles, segments = _bucket(dtype, flags)
    Fc = torch.full((tiles, 45, 16), 0.25, dtype=dtype)
    L = compact.to_compact(compact.identity_factor(9, dtype).expand(tiles * 16, 45))
    stats = torch.zeros(2, dtype=torch.int64)
    # every entry must be written; norm_lanes=1: the norms' sums per tile
    norms = torch.full((tiles, 2, norm_lanes), -1.0, dtype=dtype)
    # The directions a measuring pass left (read by the writing pass; written by a measuring one)
    directions = randn(tiles, 9, 16, seed=40).to(dtype)
    extras = dict(second_moments=second, tile_norms=norms, directions=directions, beta2=0.99,
                  eps=1e-6, mode=mode,
                  tile_scale=torch.linspace(0.5, 2.0, tiles, dtype=dtype),
                  tile_damping=(torch.linspace(0.01, 0.2, tiles, dtype=dtype)
                                if tile_damping else None))
    if block_v:  # v one per block, starting from the per-entry v's block means
        extras.update(second_moments=[], block_second_moment=_block_means(second, segments))

    def to(x, dev):
        if isinstance(x, list):
            return [to(t, dev) for t in x]
        return x.to(dev) if isinstance(x, torch.Tensor) else x

    args = to([params, grads, momenta, Fc, L, stats], device)
    extras = {k: to(v, device) for k, v in extras.items()}
    fn(*args, segments, lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.01,
       decoupled_weight_decay=False, **extras)
    params, _, momenta, Fc, L, stats = to(args, "cpu")  # (the same tensors on the CPU)
    extras = {k: to(v, "cpu") for k, v in extras.items()}
    return dict(params=params, momenta=momenta, second=extras["second_moments"] or second,
                F=Fc, L=L, stats=stats, norms=extras["tile_norms"],
                directions=extras["directions"], block_v=extras.get("block_second_moment"))


@pytest.mark.parametrize("tile_damping", [False, True], ids=["damping", "tile-damping"])
@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", compiled_backends(covering=9))
def test_bucket_op_extras_match_reference(backend, dtype, mode, tile_damping):
    want = _run_bucket(reference.mbf_bucket_step_, dtype, MODES[mode], tile_damping)
    module = dispatch.select(backend, torch.device(DEVICE), differentiable=False, fn="test",
                             d=9, step=True)
    got = _run_bucket(module.mbf_bucket_step_, dtype, MODES[mode], tile_damping)
    tol = STEP_TOL[dtype]
    for key in ("params", "momenta", "second"):
        for i, (a, b) in enumerate(zip(got[key], want[key])):
            torch.testing.assert_close(a, b, **tol, equal_nan=True,
                                       msg=lambda m: f"{key}[{i}]: {m}")
    for key in ("F", "L"):  # real blocks: padding holds whatever each backend leaves there
        torch.testing.assert_close(_real_blocks(got[key]), _real_blocks(want[key]), **tol,
                                   msg=lambda m: f"{key}: {m}")
    assert got["stats"].tolist() == want["stats"].tolist()
    fresh = _bucket(dtype)
    if MODES[mode].measures:  # the measuring pass and the lagged one
        torch.testing.assert_close(got["norms"], want["norms"], rtol=100 * tol["rtol"],
                                   atol=tol["atol"])
        assert (got["norms"][3, :, 4] == 0).all()  # R's NaN block 4 (R starts at tile 3)
        assert (got["norms"][1, :, 4:] == 0).all()  # padding blocks of W's last tile
    else:
        assert (got["norms"] == -1).all()  # untouched but by the measuring passes
    if MODES[mode] == StepMode.GRAFT:
        # u of the real blocks (as the norms: the solve's rounding grows with conditioning)
        torch.testing.assert_close(_real_blocks(got["directions"]),
                                   _real_blocks(want["directions"]), rtol=100 * tol["rtol"],
                                   atol=100 * tol["atol"], equal_nan=True)
        for a, b in zip(got["params"], fresh[0]):  # the measuring pass leaves p alone
            assert torch.equal(a, b)
    else:  # (the lagged pass stores no direction)
        assert torch.equal(got["directions"], randn(6, 9, 16, seed=40).to(dtype))
    if MODES[mode] & StepMode.LAGGED:  # p moved, by the tiles' scales (not 1): as the reference
        for a, b in zip(got["params"], fresh[0]):
            assert not torch.equal(a, b)
    if MODES[mode] in (StepMode.NONE, StepMode.WRITE | StepMode.GRAFT):
        # The writing pass of a grafted step moves p only; the refresh-only pass nothing.
        for a, b in zip(got["momenta"] + got["second"], fresh[2] + fresh[3]):
            assert torch.equal(a, b)
    if MODES[mode] == StepMode.NONE:
        for a, b in zip(got["params"], fresh[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["measure", "lagged"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("target", cpu_levels())
def test_bucket_op_writes_the_norms_summed_per_tile(target, dtype, mode):
    """A tile_norms of shape (tiles, 2, 1) (what MBF gives the C++ step: the graft needs the
    norms per unit, whose blocks fill whole tiles) receives each tile's sums of the per-block
    norms, NaN block and padding left out, at every ISA level (AVX2 and the scalar level add a
    tile's sub-tiles up); the reference defines it so; the state is as with per-block norms."""
    per_block = _run_bucket(reference.mbf_bucket_step_, dtype, MODES[mode], True)
    want = _run_bucket(reference.mbf_bucket_step_, dtype, MODES[mode], True, norm_lanes=1)
    got = _run_bucket(dispatch.module("cpu").mbf_bucket_step_, dtype, MODES[mode], True,
                      norm_lanes=1)
    tol = STEP_TOL[dtype]
    sums = per_block["norms"].sum(2, keepdim=True)
    assert (sums > 0).all()  # every tile has a real block with finite norms
    torch.testing.assert_close(want["norms"], sums, rtol=tol["rtol"], atol=0)
    torch.testing.assert_close(got["norms"], sums, rtol=100 * tol["rtol"], atol=tol["atol"])
    for key in ("params", "momenta", "second"):
        for a, b in zip(got[key], per_block[key]):
            torch.testing.assert_close(a, b, **tol, equal_nan=True)


@pytest.mark.parametrize("mode", ["measure", "lagged", "graft-write"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("target", cpu_levels())
def test_bucket_op_keeps_adams_v_per_block(target, dtype, mode):
    """graft_second_moment="block": Adam's v one per block (block_second_moment, compact). The
    reference's v per block stays the mean of its entries' v (the EMA is linear: from the
    block means of a per-entry v, one step lands on the block means of that v's step), the
    momentum and |u|^2 are the per-entry step's, and |a|^2 is Adam's with each entry's v
    replaced by its block's; the C++ step at every ISA level (per-tile sums of the norms, as
    MBF runs it) matches the reference, which keeps the per-entry v untouched."""
    entry = _run_bucket(reference.mbf_bucket_step_, dtype, MODES[mode], True)
    want = _run_bucket(reference.mbf_bucket_step_, dtype, MODES[mode], True, block_v=True)
    got = _run_bucket(dispatch.module("cpu").mbf_bucket_step_, dtype, MODES[mode], True,
                      norm_lanes=1, block_v=True)
    tol = STEP_TOL[dtype]
    segments = _bucket(dtype)[5]
    fresh = _bucket(dtype)[3]
    torch.testing.assert_close(_real_block_values(want["block_v"]),
                               _real_block_values(_block_means(entry["second"], segments)),
                               **tol, equal_nan=True)  # (R's NaN block 4: NaN either way)
    for a, b in zip(want["second"], fresh):  # the per-entry v is not read
        assert torch.equal(a, b)
    if MODES[mode].measures:
        for a, b in zip(want["momenta"], entry["momenta"]):
            torch.testing.assert_close(a, b, **tol, equal_nan=True)
        torch.testing.assert_close(want["norms"][:, 0], entry["norms"][:, 0], **tol)
        # |a|^2 by its definition, for the tiles of R (segment 3, 33 blocks from tile 3 on; the
        # NaN block 4 counts 0); step 12's bias corrections
        c1, s2 = reference.graft_bias_corrections(0.9, 0.99, 12)
        seg = reference.Segment(3, None, 33, 0, 9, 9)
        m = seg.rows(want["momenta"])
        v = want["block_v"][3:6].reshape(-1)[:33, None]
        a2 = ((c1 * m / (s2 * v.sqrt() + 1e-6)) ** 2).sum(1)
        a2 = torch.where(torch.isfinite(a2), a2, 0)
        torch.testing.assert_close(want["norms"][3:6, 1].reshape(-1)[:33], a2,
                                   rtol=100 * tol["rtol"], atol=tol["atol"])
    for key in ("params", "momenta"):
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a, b, **tol, equal_nan=True)
    torch.testing.assert_close(_real_block_values(got["block_v"]),
                               _real_block_values(want["block_v"]), **tol, equal_nan=True)
    if MODES[mode].measures:
        torch.testing.assert_close(got["norms"], want["norms"].sum(2, keepdim=True),
                                   rtol=100 * tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("mode", ["measure", "lagged"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", compiled_backends(covering=9))
def test_bucket_op_keeps_adams_v_per_block_on_every_backend(backend, dtype, mode):
    """Adam's v one per block (block_second_moment) on each compiled backend that runs here
    (the C++ CPU step and Triton's) as the reference keeps it."""
    module = dispatch.select(backend, torch.device(DEVICE), differentiable=False, fn="test",
                             d=9, step=True)
    _check_block_v_pass(module.mbf_bucket_step_, dtype, mode)


def _check_block_v_pass(fn, dtype, mode, device="cpu"):
    """``fn``'s pass with Adam's v per block (its tensors on ``device``) against the
    reference's: p, m, the real blocks' v and the per-block norms."""
    want = _run_bucket(reference.mbf_bucket_step_, dtype, MODES[mode], True, block_v=True)
    got = _run_bucket(fn, dtype, MODES[mode], True, block_v=True, device=device)
    tol = STEP_TOL[dtype]
    for key in ("params", "momenta"):
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a, b, **tol, equal_nan=True)
    torch.testing.assert_close(_real_block_values(got["block_v"]),
                               _real_block_values(want["block_v"]), **tol, equal_nan=True)
    torch.testing.assert_close(got["norms"], want["norms"], rtol=100 * tol["rtol"],
                               atol=tol["atol"])


@pytest.mark.parametrize("flags", [0, 5], ids=["cached", "refresh-refactor"])
@pytest.mark.parametrize("backend", compiled_backends(covering=9))
def test_measuring_pass_of_units_at_different_steps_matches_reference(backend, flags):
    """Segments alike but for their units' step counts (1, 4, 12): each keeps its own bias
    corrections (the Triton launcher splits such a set of flags by step)."""
    want = _run_bucket(reference.mbf_bucket_step_, torch.float64, StepMode.GRAFT, False, flags)
    module = dispatch.select(backend, torch.device(DEVICE), differentiable=False, fn="test",
                             d=9, step=True)
    got = _run_bucket(module.mbf_bucket_step_, torch.float64, StepMode.GRAFT, False, flags)
    tol = STEP_TOL[torch.float64]
    for key in ("momenta", "second"):
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a, b, **tol, equal_nan=True)
    torch.testing.assert_close(got["norms"], want["norms"], rtol=100 * tol["rtol"],
                               atol=tol["atol"])


def test_bucket_op_refuses_a_graft_without_its_tensors():
    params, grads, momenta, second, tiles, segments = _bucket(torch.float64)
    Fc = torch.zeros(tiles, 45, 16, dtype=torch.float64)
    stats = torch.zeros(2, dtype=torch.int64)
    hyper = dict(lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.0,
                 decoupled_weight_decay=False, mode=StepMode.GRAFT | StepMode.WRITE)
    for backend in ("cpu", "triton"):
        if not mk.backends()[backend].available:
            continue
        fn = dispatch.select(backend, torch.device(DEVICE), differentiable=False, fn="test", d=9,
                             step=True).mbf_bucket_step_
        directions = torch.zeros(tiles, 9, 16, dtype=torch.float64)
        with pytest.raises((RuntimeError, ValueError), match="needs directions"):
            fn(params, grads, momenta, Fc, Fc.clone(), stats, segments, **hyper)
        with pytest.raises((RuntimeError, ValueError), match="tile_scale to write"):
            fn(params, grads, momenta, Fc, Fc.clone(), stats, segments, directions=directions,
               **hyper)
        with pytest.raises((RuntimeError, ValueError), match="tile_norms to measure"):
            fn(params, grads, momenta, Fc, Fc.clone(), stats, segments, directions=directions,
               **{**hyper, "mode": StepMode.GRAFT})
        with pytest.raises((RuntimeError, ValueError), match="directions must be a contiguous"):
            fn(params, grads, momenta, Fc, Fc.clone(), stats, segments,
               directions=directions[:, :8], tile_scale=torch.ones(tiles, dtype=torch.float64),
               **hyper)
        with pytest.raises((RuntimeError, ValueError), match="one second moment per params"):
            fn(params, grads, momenta, Fc, Fc.clone(), stats, segments, second_moments=second[:2],
               tile_norms=torch.zeros(tiles, 2, 16, dtype=torch.float64),
               directions=directions, **{**hyper, "mode": StepMode.GRAFT})
        # The lagged pass needs no directions, but both per-tile tensors and v.
        lagged = {**hyper, "mode": StepMode.WRITE | StepMode.GRAFT | StepMode.LAGGED}
        with pytest.raises((RuntimeError, ValueError), match="tile_norms to measure"):
            fn(params, grads, momenta, Fc, Fc.clone(), stats, segments, second_moments=second,
               tile_scale=torch.ones(tiles, dtype=torch.float64), **lagged)
        with pytest.raises((RuntimeError, ValueError), match="one second moment per params"):
            fn(params, grads, momenta, Fc, Fc.clone(), stats, segments,
               tile_scale=torch.ones(tiles, dtype=torch.float64),
               tile_norms=torch.zeros(tiles, 2, 16, dtype=torch.float64), **lagged)
        for mode in (4, 5, 6, 8):
            with pytest.raises((RuntimeError, ValueError), match="mode must be 0, 1"):
                fn(params, grads, momenta, Fc, Fc.clone(), stats, segments,
                   **{**hyper, "mode": mode})


def test_bucket_op_schema_with_extras():
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    params, grads, momenta, second, tiles, segments = _bucket(torch.float64)
    Fc = torch.full((tiles, 45, 16), 0.25, dtype=torch.float64)
    args = (params, grads, momenta, Fc, Fc.clone(), torch.zeros(2, dtype=torch.int64), segments,
            0.1, 0.9, 0.8, 0.05, 0.0, False, second, torch.full((tiles,), 0.1, dtype=torch.float64),
            torch.ones(tiles, dtype=torch.float64), torch.zeros(tiles, 2, 16, dtype=torch.float64),
            torch.zeros(tiles, 9, 16, dtype=torch.float64), 0.999, 1e-8)
    for mode in (2, 3, 7):  # the measuring pass, the writing one, the lagged one
        torch.library.opcheck(torch.ops.mbf_kernels.mbf_bucket_step_.default, (*args, mode))


@pytest.mark.parametrize("grads", ["weight+bias", "weight", "none", "no-bias-column"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("target", cpu_levels())
def test_graft_rows_op_matches_its_definition(target, dtype, grads):
    """The shared blocks' fused row pass (CPU): m = rho m + g, v = beta2 v + (1 - beta2) g^2 and
    each row's |m / (sqrt(v) + eps)|^2 and |m|^2, against the same in torch ops; rows of 37 values (two
    full AVX-512 vectors of float32 and a tail), a missing gradient counting as 0."""
    n, d = 11, 37
    bias = grads != "no-bias-column"
    width = d - 1 if bias else d
    m, v = randn(n, d, seed=1).to(dtype), randn(n, d, seed=2).to(dtype) ** 2
    gw = randn(n, width, seed=3).to(dtype) if grads != "none" else None
    gb = randn(n, seed=4).to(dtype) if grads == "weight+bias" else None
    g = torch.zeros(n, d, dtype=dtype)
    if gw is not None:
        g[:, :width] = gw
    if gb is not None:
        g[:, width] = gb
    want_m, want_v = 0.9 * m + g, 0.99 * v + 0.01 * g * g
    want = torch.stack([((want_m / (want_v.sqrt() + 1e-3)) ** 2).sum(1),
                        want_m.square().sum(1)], dim=1)
    m0 = m.clone()
    got, _ = torch.ops.mbf_kernels.graft_rows_(m, v, gw, gb if bias else None, 0.9, 0.99, 1e-3)
    tol = STEP_TOL[dtype]
    torch.testing.assert_close(m, want_m, **tol)
    torch.testing.assert_close(v, want_v, **tol)
    torch.testing.assert_close(got, want, **tol)
    # without v (the paper's update): the momentum and its norm alone
    got, _ = torch.ops.mbf_kernels.graft_rows_(m0, None, gw, gb if bias else None, 0.9, 0.99, 1e-3)
    torch.testing.assert_close(m0, want_m, **tol)
    torch.testing.assert_close(got[:, 1], want[:, 1], **tol)
    assert not got[:, 0].any()
    with pytest.raises(RuntimeError, match="grad_weight must be contiguous"):
        torch.ops.mbf_kernels.graft_rows_(m, v, randn(n, width + 2, seed=5).to(dtype), None,
                                          0.9, 0.99, 1e-3)


@pytest.mark.parametrize("n,d,k", [(11, 37, 5), (8, 37, 16), (9, 4100, 6), (40, 4100, 6),
                                   (9, 64, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("target", cpu_levels())
def test_graft_rows_projection(target, dtype, n, d, k):
    """With a low-rank block's basis V (d, k), graft_rows_ also returns T = m V of the updated
    rows: against torch's product, for row counts that do and do not fill its 4-row blocks, k
    across its register groups, rows longer than its 2048-column chunks, more rows than one
    round (the projection follows the row pass a few rows at a time), and rows of whole cache
    lines (d = 64) besides the others (read from an aligned copy)."""
    m, v = randn(n, d, seed=1).to(dtype), randn(n, d, seed=2).to(dtype) ** 2
    gw, gb = randn(n, d - 1, seed=3).to(dtype), randn(n, seed=4).to(dtype)
    basis = torch.linalg.qr(randn(d, k, seed=5).to(dtype)).Q
    sq0, none = torch.ops.mbf_kernels.graft_rows_(m.clone(), v.clone(), gw, gb, 0.9, 0.99, 1e-3)
    sq, T = torch.ops.mbf_kernels.graft_rows_(m, v, gw, gb, 0.9, 0.99, 1e-3, basis)
    assert none.shape == (n, 0) and torch.equal(sq, sq0)
    # a sum of d products: its rounding grows with d (about sqrt(d) eps |m_j| |V_i| at random)
    eps = torch.finfo(dtype).eps
    bound = 4 * d**0.5 * eps * m.norm(dim=1, keepdim=True)
    assert ((T - m @ basis).abs() <= bound).all()
    with pytest.raises(RuntimeError, match="basis must be"):
        torch.ops.mbf_kernels.graft_rows_(m, v, gw, gb, 0.9, 0.99, 1e-3, basis[1:])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,d,k", [(11, 37, 5), (40, 4100, 16), (19, 48, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("target", cpu_levels())
def test_graft_rows_with_the_update(target, dtype, n, d, k, bias):
    """With a weight (and bias), graft_rows_ also moves them in the same pass (the lagged
    graft's low-rank step): p = decay p + coef (m - T diag(w) V^T) from the updated rows m and
    their T = m V, against torch's products; m, v and the returned norms and T are as without."""
    m, v = randn(n, d, seed=1).to(dtype), randn(n, d, seed=2).to(dtype) ** 2
    width = d - 1 if bias else d
    gw, gb = randn(n, width, seed=3).to(dtype), randn(n, seed=4).to(dtype) if bias else None
    basis = torch.linalg.qr(randn(d, k, seed=5).to(dtype)).Q
    w = torch.rand(k, generator=torch.Generator().manual_seed(6)).to(dtype)
    weight, b = randn(n, width, seed=7).to(dtype), randn(n, seed=8).to(dtype) if bias else None
    coef = torch.tensor([-0.3], dtype=dtype)
    m0, v0 = m.clone(), v.clone()
    sq0, T0 = torch.ops.mbf_kernels.graft_rows_(m0, v0, gw, gb, 0.9, 0.99, 1e-3, basis)
    p0 = torch.cat([weight, b[:, None]], 1) if bias else weight.clone()
    sq, T = torch.ops.mbf_kernels.graft_rows_(m, v, gw, gb, 0.9, 0.99, 1e-3, basis, weight, b,
                                              w, 0.99, coef)
    assert torch.equal(sq, sq0) and torch.equal(T, T0) and torch.equal(m, m0)
    want = 0.99 * p0 - 0.3 * (m - (T * w) @ basis.mT)
    got = torch.cat([weight, b[:, None]], 1) if bias else weight
    eps = torch.finfo(dtype).eps
    bound = 8 * (k + 1) * eps * (p0.abs() + m.abs() + (T * w).abs() @ basis.mT.abs())
    assert ((got - want).abs() <= bound).all()
    with pytest.raises(RuntimeError, match="an update needs the basis"):
        torch.ops.mbf_kernels.graft_rows_(m, v, gw, gb, 0.9, 0.99, 1e-3, basis, weight, b,
                                          None, 0.99, coef)


@pytest.mark.parametrize("target", cpu_levels())
@pytest.mark.parametrize("n,width,k", [(9, 20, 0), (9, 20, 16), (6, 2100, 5), (17, 2100, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_scaled_add_op_matches_its_definition(target, dtype, n, width, k):
    """p = decay p + coef u (+ t V^T) for a weight and a bias whose u are strided columns of row
    buffers (a shared block's U or M rows) and whose V^T are column slices of a low-rank basis,
    as the grafted update's one pass writes them: row counts that do and do not fill its 8- and
    4-row blocks, rows longer than its 2048-column chunks, columns two vectors, one and fewer at
    a time."""
    rows = randn(n, width + 1, seed=1).to(dtype)
    weight, bias = randn(n, width, seed=2).to(dtype), randn(n, seed=3).to(dtype)
    coef = torch.tensor(-0.3, dtype=dtype)
    t, vt = randn(n, k, seed=4).to(dtype), randn(k, width + 1, seed=5).to(dtype)
    want_w = 0.99 * weight + coef * rows[:, :width] + t @ vt[:, :width]
    want_b = 0.99 * bias + coef * rows[:, width] + t @ vt[:, width]
    # k + 2 products summed: the rounding of the sum of their magnitudes
    tol = 4 * (k + 2) * torch.finfo(dtype).eps
    scale_w = 0.99 * weight.abs() + 0.3 * rows[:, :width].abs() + t.abs() @ vt[:, :width].abs()
    scale_b = 0.99 * bias.abs() + 0.3 * rows[:, width].abs() + t.abs() @ vt[:, width].abs()
    extra = (t, vt[:, :width]) if k else ()
    torch.ops.mbf_kernels.scaled_add_(weight, rows[:, :width], 0.99, coef, *extra)
    extra = (t, vt[:, width:].contiguous()) if k else ()
    torch.ops.mbf_kernels.scaled_add_(bias.view(n, 1), rows[:, width:], 0.99, coef, *extra)
    assert ((weight - want_w).abs() <= tol * scale_w).all()
    assert ((bias - want_b).abs() <= tol * scale_b).all()
    with pytest.raises(RuntimeError, match="whose rows are contiguous"):
        torch.ops.mbf_kernels.scaled_add_(weight, rows[:, :width].mT.contiguous().mT, 0.99, coef)
    if k:
        with pytest.raises(RuntimeError, match=r"basis_t a \(k, w\)"):
            torch.ops.mbf_kernels.scaled_add_(weight, rows[:, :width], 0.99, coef, t, vt)


@pytest.mark.parametrize("target", cpu_levels())
@pytest.mark.parametrize("n,width,s,bias", [(9, 20, 5, True), (8, 37, 20, False),
                                            (21, 4096, 7, True), (3, 4, 1, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sketch_rows_op_matches_its_definition(target, dtype, n, width, s, bias):
    """A low-rank block's refresh sketch from the gradient itself: G = [weight rows, bias] and
    (G^T (G omega), |G|^2) against torch in float64, each entry within the rounding bound of
    its two sums of products; row counts that do and do not fill its 8-row blocks, s across
    its register groups, rows of a large layer (where the padded strides matter) and a tail."""
    gw = randn(n, width, seed=1).to(dtype)
    gb = randn(n, seed=2).to(dtype) if bias else None
    G = torch.cat([gw, gb[:, None]], 1) if bias else gw
    omega = randn(G.shape[1], s, seed=3).to(dtype)
    Y, sq = torch.ops.mbf_kernels.sketch_rows(gw, gb, omega)
    G64, om64 = G.double(), omega.double()
    want = G64.mT @ (G64 @ om64)
    # n + d products summed along the way: gamma_{n+d} times the sums of their magnitudes
    bound = 2 * (n + G.shape[1]) * torch.finfo(dtype).eps * (
        G64.abs().mT @ (G64.abs() @ om64.abs()))
    assert Y.shape == (G.shape[1], s) and Y.dtype == dtype
    assert ((Y.double() - want).abs() <= bound).all()
    g_sq = G64.square().sum()
    assert abs(sq.item() - g_sq.item()) <= 2 * G.numel() * torch.finfo(dtype).eps * g_sq.item()
    # a non-finite gradient shows in |G|^2 (the refresh then leaves the curvature alone)
    gw[n // 2, width // 2] = float("nan")
    assert torch.isnan(torch.ops.mbf_kernels.sketch_rows(gw, gb, omega)[1])
    with pytest.raises(RuntimeError, match=r"omega must be \("):
        torch.ops.mbf_kernels.sketch_rows(gw, gb, omega[1:])
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.mbf_kernels.sketch_rows(gw.mT.contiguous().mT, gb, omega)


def _unit_ratio_inputs(case: str, dtype):
    """(norms, entry_tiles, entry_units) for unit_ratios over 5 units. "small": two tensors with
    16 and 7 lanes (one chunk). "large": 1 lane per tile (what the CPU step writes) and 16,
    enough tiles for chunks on every thread, entries of 0 to 40 tiles and one of 30000 that
    several chunks share."""
    if case == "small":
        norms = [randn(40, 2, 16, seed=1).to(dtype) ** 2, randn(3, 2, 7, seed=2).to(dtype) ** 2]
        tiles = [torch.tensor([5, 1, 30, 4]), torch.tensor([2, 1])]
        owners = [torch.tensor([0, 2, 1, 0]), torch.tensor([4, 1])]
    else:
        gen = torch.Generator().manual_seed(3)
        counts = torch.randint(0, 41, (400,), generator=gen)
        counts[100] = 30000
        tiles = [counts, counts[:200]]
        units = torch.tensor([0, 1, 2, 4])  # unit 3 has no blocks
        owners = [units[torch.randint(0, 4, (n,), generator=gen)] for n in (400, 200)]
        norms = [randn(int(tiles[0].sum()), 2, 1, seed=1).to(dtype) ** 2,
                 randn(int(tiles[1].sum()), 2, 16, seed=2).to(dtype) ** 2]
    norms[0][2, 1, norms[0].shape[2] - 1] = float("inf")
    norms[1][0, 0, 4] = float("nan")
    return norms, tiles, owners


@pytest.mark.parametrize("case", ["small", "large"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_unit_ratios_op_matches_its_definition(dtype, case):
    """Grafting's per-unit rescaling from per-block pairs (|u|^2, |a|^2) in two tensors of the
    bucket layout (T, 2, L), each in entries of consecutive tiles owned by a unit: sqrt(sum
    |a|^2 / sum |u|^2) per unit, a pair with a non-finite value left out, 0 for a unit whose
    |u|^2 sums to 0 (here unit 3, which has no blocks)."""
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    norms, tiles, owners = _unit_ratio_inputs(case, dtype)
    su, sa = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for x, count, unit in zip(norms, tiles, owners):
        pairs = x.transpose(1, 2).double()  # (T, L, 2)
        pairs = torch.where(torch.isfinite(pairs).all(2, keepdim=True), pairs, 0).sum(1)
        per_tile = torch.repeat_interleave(unit, count)
        su.index_add_(0, per_tile, pairs[:, 0])
        sa.index_add_(0, per_tile, pairs[:, 1])
    want = torch.where(su > 0, (sa / su.clamp_min(1e-300)).sqrt(), 0).to(dtype)
    got = torch.ops.mbf_kernels.unit_ratios(norms, tiles, owners, 5)
    torch.testing.assert_close(got, want, **STEP_TOL[dtype])
    assert got[3] == 0
    if case == "large":
        return
    with pytest.raises(RuntimeError, match=r"unit 5 outside \[0, 5\)"):
        torch.ops.mbf_kernels.unit_ratios(norms[1:], tiles[1:], [torch.tensor([5, 1])], 5)
    with pytest.raises(RuntimeError, match="entry_tiles sum to 2, norms have 3 tiles"):
        torch.ops.mbf_kernels.unit_ratios(norms[1:], [torch.tensor([1, 1])], owners[1:], 5)


@pytest.mark.parametrize("target", cpu_levels())
def test_shared_graft_step_op_names_bad_arguments(target):
    """The one-call grafted step of shared blocks refuses lists that do not line up, parameters
    of the wrong shape and a block at a rank without its V^T and w, naming what is wrong."""
    m, v, work, inv = torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(3, 5), torch.eye(5)
    weight, bias = torch.zeros(3, 4), torch.zeros(3)
    args = ([m], [v], [work], [inv], [], [], [weight, bias], [None, None], [2], [1.0], [1e-8],
            0.9, 0.99, 0.1, 1.0, torch.full((1,), 7.0), False)
    torch.ops.mbf_kernels.shared_graft_step_(*args)  # zero gradients: nothing moves
    assert not weight.any() and not bias.any()
    assert args[-2].item() == 0  # the measured ratio (|u| = 0: 0)
    with pytest.raises(RuntimeError, match="one value per block"):
        torch.ops.mbf_kernels.shared_graft_step_(*args[:-2], torch.zeros(2), True)
    with pytest.raises(RuntimeError, match="one m, v, work, inverse"):
        torch.ops.mbf_kernels.shared_graft_step_(*args[:2], [], *args[3:])
    with pytest.raises(RuntimeError, match="parameters must be contiguous 3 x 4"):
        torch.ops.mbf_kernels.shared_graft_step_(*args[:6], [torch.zeros(3, 5), bias],
                                                 *args[7:])
    with pytest.raises(RuntimeError, match=r"\(d, d\) inverse"):
        torch.ops.mbf_kernels.shared_graft_step_(*args[:3], [torch.eye(4)], *args[4:])
    with pytest.raises(RuntimeError, match="one of each per block"):
        torch.ops.mbf_kernels.shared_graft_step_(*args[:4], [torch.zeros(2, 5)], [], *args[6:])
    with pytest.raises(RuntimeError, match=r"contiguous \(k, 5\) V\^T and k weights"):
        torch.ops.mbf_kernels.shared_graft_step_(*args[:4], [torch.zeros(2, 4)],
                                                 [torch.zeros(2)], *args[6:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_refresh_op_is_the_curvature_ema(dtype):
    """The one-call refresh of exact shared blocks: G = [weight grad, bias grad] (None: zero)
    into the work rows and F = beta F + (1 - beta) G^T G / rows (G^T G / rows on a first
    refresh), to the dot products' rounding; a block whose gradient is not finite keeps F and is
    counted; lists that do not line up and gradients of the wrong shape are named."""
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    g = torch.Generator().manual_seed(3)
    # (rows n, weight width, bias, averaged over, first refresh, weight gradient missing)
    blocks = [(6, 4, True, 6, False, False), (3, 7, False, 3, True, False),
              (4, 2, True, 8, False, False), (2, 3, True, 2, False, True)]
    curvatures, work, stats, grads, counts, rows, first, want = [], [], [], [], [], [], [], []
    beta = 0.9
    for i, (n, width, bias, r, is_first, no_weight) in enumerate(blocks):
        d = width + bias
        A = torch.randn(d, d, generator=g, dtype=dtype)
        curvatures.append(A @ A.mT)
        work.append(torch.full((n, d), float("nan"), dtype=dtype))
        stats.append(torch.zeros(2, dtype=torch.int64))
        gw = None if no_weight else torch.randn(n, width, generator=g, dtype=dtype)
        gb = torch.randn(n, generator=g, dtype=dtype) if bias else None
        if i == 2:
            gw[1, 0] = float("nan")
        grads += [gw] + ([gb] if bias else [])
        counts.append(1 + bias)
        rows.append(r)
        first.append(is_first)
        G = torch.zeros(n, d, dtype=torch.float64)
        if gw is not None:
            G[:, :width] = gw.double()
        if bias:
            G[:, width] = gb.double()
        C = curvatures[-1].double()
        new = G.mT @ G / r if is_first else beta * C + (1 - beta) * (G.mT @ G) / r
        scale = G.abs().mT @ G.abs() / r + (0 if is_first else beta * C.abs())
        want.append((G, C.clone() if i == 2 else new, scale))
    torch.ops.mbf_kernels.shared_refresh_(curvatures, work, stats, grads, counts, rows, first,
                                          beta)
    eps = torch.finfo(dtype).eps
    for i, ((G, C, scale), got, s, rows_got) in enumerate(zip(want, curvatures, stats, work)):
        assert s.tolist() == ([1, 0] if i == 2 else [0, 0])
        if i == 2:
            assert torch.equal(got.double(), C)  # kept, bit for bit
            continue
        assert torch.equal(rows_got.double(), G)
        assert ((got.double() - C).abs() <= 4 * (G.shape[0] + 2) * eps * scale).all()
    with pytest.raises(RuntimeError, match="one curvature, work, stats"):
        torch.ops.mbf_kernels.shared_refresh_(curvatures[:1], work, stats, grads, counts, rows,
                                              first, beta)
    bad = list(grads)
    bad[0] = torch.zeros(6, 5, dtype=dtype)
    with pytest.raises(RuntimeError, match="gradients must be contiguous 6 x 4 and 6"):
        torch.ops.mbf_kernels.shared_refresh_(curvatures, work, stats, bad, counts, rows,
                                              first, beta)


@pytest.mark.parametrize("relative", [False, True])
def test_shared_refactor_op_factors_inverts_and_falls_back(relative):
    """The one-call refactor of exact shared blocks: the stored factor is the Cholesky factor of
    F + damping I with its diagonal inverted (damping relative: times F's mean diagonal entry,
    plus the floor) and the inverse derived from it (as the optimizer does after the op) is
    (F + damping I)^{-1}, against torch.linalg in float64; a block that is not positive definite
    gets the diagonal fallback and is counted."""
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    g = torch.Generator().manual_seed(5)
    damping = 0.1
    curvatures = []
    for d in (5, 33, 9):
        A = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
        curvatures.append(A @ A.mT / d)
    curvatures[2] = -curvatures[2] - 10 * torch.eye(9, dtype=torch.float64)  # not SPD
    factors = [torch.full_like(C, float("nan")) for C in curvatures]
    stats = [torch.zeros(2, dtype=torch.int64) for _ in curvatures]
    torch.ops.mbf_kernels.shared_refactor_(curvatures, factors, stats, damping, relative,
                                           reference.RELATIVE_DAMPING_FLOOR)
    for i, (C, factor, s) in enumerate(zip(curvatures, factors, stats)):
        inverse = inverse_from_factor(factor)
        d = C.shape[0]
        lam = (reference.relative_damping(damping, C.diagonal().sum(), d) if relative
               else damping)
        if i == 2:
            assert s.tolist() == [0, 1]
            want = torch.diag(reference.diagonal_fallback(C, lam))
            torch.testing.assert_close(factor, want)
            torch.testing.assert_close(inverse, torch.diag(want.diagonal() ** 2))
            continue
        assert s.tolist() == [0, 0]
        stored = torch.linalg.cholesky(C + lam * torch.eye(d, dtype=C.dtype))
        stored.diagonal().reciprocal_()
        torch.testing.assert_close(factor, stored)
        damped = C + lam * torch.eye(d, dtype=C.dtype)
        torch.testing.assert_close(inverse, torch.linalg.inv(damped))
    with pytest.raises(RuntimeError, match="one curvature, factor and stats"):
        torch.ops.mbf_kernels.shared_refactor_(curvatures, factors[:1], stats, damping, relative,
                                               0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_inverse_op_inverts_each_block_alone_or_together(dtype):
    """The shared blocks' inverses from their stored factors (1 / L_ii on the diagonal) are
    (F + damping I)^{-1} (against torch.linalg.inv in float64), symmetric, and the same bits
    whether a block is inverted alone (as a load does) or beside others (as a refactor does),
    with one thread or two (each block runs on one thread; LAPACK's rounding still depends on
    the thread count set)."""
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    g = torch.Generator().manual_seed(11)
    damped = []
    for d in (65, 3, 130, 17):
        A = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
        damped.append(A @ A.mT / d + 0.1 * torch.eye(d, dtype=torch.float64))
    factors = []
    for D in damped:
        L = torch.linalg.cholesky(D)
        L.diagonal().reciprocal_()
        factors.append(L.to(dtype))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            together = [torch.full_like(L, float("nan")) for L in factors]
            torch.ops.mbf_kernels.shared_inverse_(together, factors)
            for L, want in zip(factors, together):
                alone = torch.empty_like(L)
                torch.ops.mbf_kernels.shared_inverse_([alone], [L])
                assert torch.equal(alone, want), f"{L.shape[0]}, {n} threads"
    finally:
        torch.set_num_threads(threads)
    eps = torch.finfo(dtype).eps
    for D, inverse in zip(damped, together):
        assert torch.equal(inverse, inverse.mT)
        # a Cholesky-based inverse's relative error grows like d * cond(D) * eps
        want = torch.linalg.inv(D)
        bound = 4 * D.shape[0] * torch.linalg.cond(D) * eps
        err = (torch.linalg.matrix_norm(inverse.double() - want, 2)
               / torch.linalg.matrix_norm(want, 2))
        assert err <= bound, (D.shape[0], err, bound)
    with pytest.raises(RuntimeError, match="one inverse and one factor per block"):
        torch.ops.mbf_kernels.shared_inverse_(together, factors[:1])
    with pytest.raises(RuntimeError, match=r"\(d, d\) inverse and factor"):
        torch.ops.mbf_kernels.shared_inverse_([together[0][:, :-1]], factors[:1])


@pytest.fixture(params=["mm", "onednn"])
def gemm_library(request):
    """Sends every shared-block GEMM of the C++ ops to MKL's mm or to oneDNN for one test,
    whichever this CPU would pick for the test's sizes (the size between them depends on the
    CPU: csrc/ops_common.h), then restores this CPU's default."""
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    from mbf_kernels._extension import onednn_gemm_min_flops, set_onednn_gemm_min_flops
    set_onednn_gemm_min_flops(math.inf if request.param == "mm" else 0.0)
    assert onednn_gemm_min_flops() == (math.inf if request.param == "mm" else 0.0)
    yield request.param
    set_onednn_gemm_min_flops(None)


def test_the_gemm_library_follows_the_cpu_and_an_override_is_undone():
    """oneDNN from 8 MFLOP where AVX-512 runs (it beat MKL there), from 1 GFLOP elsewhere (its
    AVX2 kernel lost to MKL below that) and, on AMD's family 25 (Zen 4 runs AVX-512 on 256-bit
    units), for a GEMM on one thread beside others; an override holds for both until None
    restores the defaults."""
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    from mbf_kernels._extension import (build_info, onednn_gemm_min_flops,
                                        set_onednn_gemm_min_flops)
    avx512 = "avx512" in build_info()["cpu_levels_supported"]
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's vendor and family from")
    zen3_or_4 = ("AuthenticAMD" in cpuinfo
                 and re.search(r"^cpu family\s*:\s*25$", cpuinfo, re.M) is not None)
    default = 8.0 * 2**20 if avx512 else 2.0**30
    side_by_side = 2.0**30 if zen3_or_4 else default
    info = build_info()
    assert onednn_gemm_min_flops() == default == info["onednn_gemm_min_flops"]
    assert (onednn_gemm_min_flops(side_by_side=True) == side_by_side
            == info["onednn_gemm_min_flops_side_by_side"])
    try:
        set_onednn_gemm_min_flops(123.0)
        assert onednn_gemm_min_flops() == onednn_gemm_min_flops(side_by_side=True) == 123.0
    finally:
        set_onednn_gemm_min_flops(None)
    assert onednn_gemm_min_flops() == default
    assert onednn_gemm_min_flops(side_by_side=True) == side_by_side


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("n, d", [(5, 9), (64, 257)])
def test_apply_inverse_op_is_the_product(n, d, layout, gemm_library):
    """U = M inv by the symmetric inverse of a shared block, on torch's mm and on oneDNN's
    float32 matmul: the product to float32 rounding, whichever ran; shapes that do not line up
    are named."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    inv = torch.linalg.inv(A @ A.mT / d + torch.eye(d, dtype=torch.float64))
    inv = ((inv + inv.mT) / 2).float()
    inv = inv.contiguous() if layout == "rows" else inv.mT.contiguous().mT
    M, out = torch.randn(n, d, generator=g), torch.full((n, d), float("nan"))
    torch.ops.mbf_kernels.apply_inverse_(out, M, inv)
    exact = M.double() @ inv.double()
    bound = 4 * d * torch.finfo(torch.float32).eps * (M.abs().double() @ inv.abs().double())
    assert ((out.double() - exact).abs() <= bound).all()
    with pytest.raises(RuntimeError, match=r"\(n, d\) out and rows and a \(d, d\) inverse"):
        torch.ops.mbf_kernels.apply_inverse_(out, M, inv[:, :-1])


# Layers (in, out, bias) of the fused-rows test: one layer's GEMMs above the others' (they run
# one after another, on all threads), or GEMMs that split evenly (run side by side, one block
# per thread: shared_graft_step_'s and shared_refresh_'s for_each_gemm_block). The even set's
# last layer has more rows than the rank (8): with 5, float32 rounding of its rank-deficient sketch moved
# the end 1.2e-5 apart between the backends (in float64, 7e-15: rounding, not a difference).
FUSED_ROWS_LAYERS = {"uneven": [(40, 30, True), (30, 20, False), (20, 5, True)],
                     "even": [(40, 30, True), (30, 30, True), (30, 40, False), (40, 10, True)]}


#: The updates of the shared-block tests: the grafted default, the same at the previous step's
#: ratios (beta1 = 0.5: lagged from step 3, but at the refactors), the paper's.
SHARED_UPDATES = {"default": {}, "previous": dict(graft_norms="previous", betas=(0.5, 0.999)),
                  "paper": dict(PAPER, lr=0.02, damping=0.05)}
#: The tests that compare two paths' GEMMs to float32 rounding run them in float32: under
#: shared_matmul="bfloat16" (the default on a CPU with AVX512_BF16 or AMX) each path rounds U to
#: bfloat16 after its own summation order, and an entry near a rounding boundary moves by 2^-8
#: of itself (test_shared_matmul_bfloat16_applies_the_rounded_inverse covers that mode).
FLOAT32_GEMMS = dict(shared_matmul="float32")


@pytest.mark.parametrize("large_linear", ["shared", "lowrank"])
@pytest.mark.parametrize("update", list(SHARED_UPDATES))
@pytest.mark.parametrize("layers", list(FUSED_ROWS_LAYERS))
def test_shared_blocks_fused_rows_equal_the_torch_path(large_linear, update, layers):
    """Shared blocks (with and without a bias) on the CPU backend take the fused C++ passes
    (grafted exact blocks: the whole step in one call; at a rank: m, v and the norms, or m for
    the paper's update, with T = M V, then the update in one pass); on the torch backend the
    torch ops: 12 steps (refreshes at T1 = 3, a refactor at T2 = 6) end at the same parameters
    to float32 rounding."""
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    ends = []
    options = SHARED_UPDATES[update]
    for backend in ("cpu", "torch"):
        torch.manual_seed(0)
        modules = []
        for i, (n_in, n_out, bias) in enumerate(FUSED_ROWS_LAYERS[layers]):
            modules += [nn.Tanh()] if i else []
            modules.append(nn.Linear(n_in, n_out, bias=bias))
        model = nn.Sequential(*modules)
        opt = mk.MBF.from_model(model, backend=backend, large_linear=large_linear, shared_rank=8,
                                max_block_size=16, curvature_update_freq=3, inverse_update_freq=6,
                                **FLOAT32_GEMMS, **options)
        x, y = randn(32, 40, seed=7).float(), torch.arange(32) % 5
        for _ in range(12):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert any(r["kind"] == ("shared" if large_linear == "shared" else "lowrank")
                   for r in opt.block_summary())
        ends.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("update", list(SHARED_UPDATES))
def test_a_block_on_either_gemm_library_steps_as_the_torch_path(update, gemm_library):
    """A 513-wide exact block (64 rows) whose GEMMs run on oneDNN (where the paper's update goes
    through U instead of addmm_) or on MKL's mm ends 6 steps where the torch backend's plain
    GEMMs do, to float32 rounding."""
    options = SHARED_UPDATES[update]
    ends = []
    for backend in ("cpu", "torch"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(512, 64), nn.Tanh(), nn.Linear(64, 5))
        opt = mk.MBF.from_model(model, backend=backend, curvature_update_freq=2,
                                inverse_update_freq=4, **FLOAT32_GEMMS, **options)
        x, y = randn(32, 512, seed=7).float(), torch.arange(32) % 5
        for _ in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        ends.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-4, atol=1e-6)


def _bf16_product_bound(M: torch.Tensor, inv16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16(bf16(M) inv16) in float64 before its last rounding, and how far a float32-accumulated
    product rounded to bfloat16 may lie from it: half a bfloat16 ulp (2^-9 of itself, 2^-8 with
    the slack of a neighbouring value) plus the float32 sum's error bound, 2 d eps |M16| |inv16|
    (its summation order is the library's)."""
    M16 = M.to(torch.bfloat16).double()
    exact = M16 @ inv16.double()
    sums = 2 * M.shape[1] * torch.finfo(torch.float32).eps * (M16.abs() @ inv16.double().abs())
    return exact, 2.0**-8 * exact.abs() + sums


@pytest.mark.parametrize("n, d", [(5, 9), (64, 257)])
def test_apply_inverse_op_bfloat16_rounds_rows_inverse_and_product(n, d):
    """A bfloat16 inverse beside float32 rows (shared_matmul="bfloat16"): U = bf16(bf16(M)
    inv16) widened to float32, within the product's bound; every entry a bfloat16 value (the
    float32 product's are not)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    inv = torch.linalg.inv(A @ A.mT / d + torch.eye(d, dtype=torch.float64)).float()
    inv16 = ((inv + inv.mT) / 2).to(torch.bfloat16)
    M, out = torch.randn(n, d, generator=g), torch.full((n, d), float("nan"))
    torch.ops.mbf_kernels.apply_inverse_(out, M, inv16)
    exact, bound = _bf16_product_bound(M, inv16)
    assert ((out.double() - exact).abs() <= bound).all()
    assert torch.equal(out, out.to(torch.bfloat16).float())
    full = M @ inv16.float()
    assert not torch.equal(full, full.to(torch.bfloat16).float())
    with pytest.raises(RuntimeError, match="inverse must have dtype"):  # bfloat16 rows: no
        torch.ops.mbf_kernels.apply_inverse_(out.double(), M.double(), inv16)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("update", ["default", "paper"])
def test_shared_matmul_bfloat16_applies_the_rounded_inverse(backend, update):
    """shared_matmul="bfloat16": an exact shared block's direction is U = bf16(bf16(M)
    bf16(inv)) from the block's own float32 inverse, on the CPU's fused step (grafted: the
    one-call BoundShared step; the paper's: apply_inverse_) and in torch calls; the parameters
    move by -lr U (the paper's) or along U (grafted); a refactor rewrites the bfloat16 copy. A
    block whose GEMM is under BF16_MIN_FLOPS (the second layer's) stays float32."""
    from mbf_kernels.optim.precision import BF16_MIN_FLOPS
    if backend == "cpu" and not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    options = dict(PAPER, lr=1.0, damping=0.3) if update == "paper" else {}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 40), nn.Tanh(), nn.Linear(40, 5))
    opt = mk.MBF.from_model(model, backend=backend, max_block_size=16, large_linear="shared",
                            shared_matmul="bfloat16", curvature_update_freq=2,
                            inverse_update_freq=2, **options)
    block, small = opt._plans[0].shared[0].blocks
    assert block.unit.params[0] is model[0].weight and small.unit.params[0] is model[2].weight
    assert small.gemm_flops < BF16_MIN_FLOPS <= block.gemm_flops
    x, y = randn(32, 300, seed=7).float(), torch.arange(32) % 5
    inverses = []

    def flat(layer):
        return torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])

    for step in range(3):
        before, before_small = flat(model[0]), flat(model[2])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert torch.equal(block.inverse_bf16, block.inverse.to(torch.bfloat16))
        inverses.append(block.inverse_bf16.clone())
        U, M = block.rows["work"], block.rows["momentum"]
        exact, bound = _bf16_product_bound(M, block.inverse_bf16)
        assert ((U.double() - exact).abs() <= bound).all(), step
        assert torch.equal(U, U.to(torch.bfloat16).float())
        moved = flat(model[0]) - before
        u = torch.cat([U[:, :300].flatten(), U[:, 300]])
        coef = -1.0 if update == "paper" else float(moved @ u / (u @ u))
        assert coef < 0
        torch.testing.assert_close(moved, coef * u, rtol=0, atol=1e-6 * float(before.abs().max()))
    # the refresh and refactor at step 3 (T1 = T2 = 2) moved the inverse, and the copy with it
    assert torch.equal(inverses[0], inverses[1]) and not torch.equal(inverses[1], inverses[2])
    assert small.inverse_bf16 is None
    U = small.rows["momentum"] @ small.inverse
    assert not torch.equal(U, U.to(torch.bfloat16).float())
    u, moved = torch.cat([U[:, :40].flatten(), U[:, 40]]), flat(model[2]) - before_small
    coef = -1.0 if update == "paper" else float(moved @ u / (u @ u))
    torch.testing.assert_close(moved, coef * u, rtol=0, atol=1e-5 * float(u.abs().max()))


# -- the optimizer ---------------------------------------------------------------------------


class Net(nn.Module):
    """Every kind of unit: conv kernels (d = 9), BatchNorm (diagonal), a Linear too large for
    row blocks (d = 49: shared, or chunks of 16 and 1 with large_linear='chunk'), and a Linear
    whose bias joins its rows (d = 17). The conv has no bias, as before any BatchNorm: that
    bias's gradient is exactly zero, so it would only move on rounding noise (in AdamW too)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.head(torch.tanh(self.fc(x.flatten(1))))


def _net(dtype=torch.float64):
    torch.manual_seed(3)
    return Net().to(dtype)


def _data(dtype=torch.float64, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g).to(dtype), torch.randint(0, 4, (n,), generator=g)


def _train(model, opt, steps, loss_scale=1.0, data=None):
    X, Y = data if data is not None else _data(next(model.parameters()).dtype)
    for k in range(steps):
        idx = torch.arange(8) + 8 * (k % 3)
        opt.zero_grad()
        (loss_scale * F.cross_entropy(model(X[idx]), Y[idx])).backward()
        opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


CONFIGS = {
    "graft": dict(graft="adam", damping_mode="absolute", lr=1e-2),
    "graft-relative": dict(graft="adam", damping_mode="relative", damping=0.1, lr=1e-2),
    "graft-relative-decoupled": dict(graft="adam", damping_mode="relative", damping=0.05,
                                     lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "graft-coupled-wd": dict(graft="adam", damping_mode="absolute", lr=1e-2, weight_decay=0.01,
                             decoupled_weight_decay=False),
    # Without grafting the relative step is lr / (damping * mean eigenvalue): a small lr.
    "relative": dict(graft="none", damping_mode="relative", damping=0.3, lr=1e-5),
    "graft-chunk": dict(graft="adam", damping_mode="relative", damping=0.1, lr=1e-2,
                        large_linear="chunk", max_block_size=16),
    # One pass per step at the previous step's ratios: beta1 = 0.5 lags from step 3 on (the
    # warm-up, ceil(1 / (1 - beta1))), but at the refactors (steps 4, 7, 10).
    "graft-previous": dict(graft="adam", damping_mode="relative", damping=0.1, lr=1e-2,
                           betas=(0.5, 0.999), graft_norms="previous"),
    "graft-previous-coupled-wd": dict(graft="adam", damping_mode="absolute", lr=1e-2,
                                      betas=(0.5, 0.999), weight_decay=0.01,
                                      decoupled_weight_decay=False, graft_norms="previous"),
    # Adam's v per entry (the CPU's default, "auto", keeps it one per mini-block)
    "graft-element-v": dict(graft="adam", damping_mode="relative", damping=0.1, lr=1e-2,
                            graft_norms="current", graft_second_moment="element"),
    "graft-previous-element-v": dict(graft="adam", damping_mode="absolute", lr=1e-2,
                                     betas=(0.5, 0.999), weight_decay=0.01,
                                     decoupled_weight_decay=False, graft_norms="previous",
                                     graft_second_moment="element"),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", ["torch"] + compiled_backends(covering=17))
def test_optimizer_matches_dense_reference(backend, config):
    """Ten steps with T1 = 2, T2 = 3 (refreshes, refactors and cached-factor steps, first
    refresh and refactor together), float64: every parameter as the dense reference's."""
    opts = dict(CONFIGS[config], curvature_update_freq=2, inverse_update_freq=3,
                max_block_size=CONFIGS[config].get("max_block_size", 20))
    if backend == "triton" and opts.get("large_linear") == "chunk":
        pytest.skip("the chunked row (d = 16 + 1) leaves d = 1 only: covered by 'graft'")
    a, b = _net(), _net()
    start = _flat(a)
    _train(a, mk.MBF.from_model(a, backend=backend, **opts), 10)
    _train(b, ReferenceMBF.from_model(b, **opts), 10)
    # float64: rounding differences (dense vs packed factors, summation order of the norms) are
    # amplified by 1 / damping (the blocks' condition number bound under relative damping, 20
    # here) and by ten steps of training dynamics: ~1e-9 relative, 1e6 ulps below a real error.
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-8, atol=1e-10)
    assert (_flat(a) - start).abs().max() > 1e-3  # the run moved


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("config", ["graft", "graft-relative-decoupled", "graft-coupled-wd",
                                    "graft-previous", "graft-previous-coupled-wd", "relative",
                                    "paper", "graft-element-v", "graft-previous-element-v"])
def test_bound_buckets_step_in_one_call_as_the_per_bucket_ops(config, dtype, monkeypatch):
    """On the CPU a step whose units all step alike runs every bucket in one C++ call
    (BoundBuckets: grafted, a measuring pass, the units' ratios and a writing pass; the paper's
    update, one pass). Twelve steps with T1 = 2, T2 = 3 end bit for bit where the per-bucket
    ops end, the steps that take the general path included: a non-contiguous gradient (step
    3), relative damping's refactors, a unit without a gradient (step 10) and the steps after
    it (the units' step counts differ). A deep copy taken after step 8 binds its own tensors
    and ends where the original ends."""
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    from mbf_kernels.optim.bound import BoundBuckets
    taken = []
    bound_step = BoundBuckets.step
    monkeypatch.setattr(BoundBuckets, "step",
                        lambda self, group, flags, k, lagged: (
                            taken.append(k), bound_step(self, group, flags, k, lagged)))
    X, Y = _data(dtype)

    def train(model, opt, steps):
        for k in steps:
            idx = torch.arange(8) + 8 * (k % 3)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            if k == 2:
                g = model.conv.weight.grad
                model.conv.weight.grad = g.transpose(0, 1).contiguous().transpose(0, 1)
                assert not model.conv.weight.grad.is_contiguous()
            if k == 9:
                model.head.weight.grad = model.head.bias.grad = None
            opt.step()

    options = dict(PAPER, lr=0.02, damping=0.05) if config == "paper" else CONFIGS[config]
    opts = dict(options, curvature_update_freq=2, inverse_update_freq=3, max_block_size=20,
                backend="cpu")
    ends = []
    for bound in (True, False):
        model = _net(dtype)
        opt = mk.MBF.from_model(model, **opts)
        if not bound:
            opt._plans[0].bound = False  # this plan never binds: every step per bucket
        train(model, opt, range(8))
        if bound:
            twin_model, twin = copy.deepcopy((model, opt))
        train(model, opt, range(8, 12))
        ends.append(_flat(model))
    refactors = {1, 4, 7, 10} if options["damping_mode"] == "relative" else set()
    assert taken == sorted(set(range(1, 10)) - {3} - refactors)
    assert torch.equal(ends[0], ends[1])
    assert (ends[0] - _flat(_net(dtype))).abs().max() > 1e-3  # the run moved
    before = len(taken)
    train(twin_model, twin, range(8, 12))
    assert taken[before:] == [9] and isinstance(twin._plans[0].bound, BoundBuckets)
    assert twin._plans[0].bound is not opt._plans[0].bound
    assert torch.equal(_flat(twin_model), ends[0])


@pytest.mark.parametrize("blocks", ["exact", "mixed"])
@pytest.mark.parametrize("graft_norms", ["previous", "current"])
def test_bound_shared_blocks_step_as_the_torch_path(graft_norms, blocks, monkeypatch):
    """On the CPU the grafted step of shared blocks (exact, or one kept at rank 8 beside an
    exact one, as VGG16-w512's head) runs in one call of the C++ BoundShared, which reads the
    gradients from the parameters. Where a gradient does not qualify (step 3: a non-contiguous
    one) it touches nothing and the general path steps; a missing weight gradient (step 6)
    counts as zero, as there. Ten steps (float64, T1 = 2, T2 = 3: refactors that rewrite V^T in
    place) end where the torch backend ends; a deep copy taken after step 5 binds its own
    tensors and ends where the original ends."""
    if not mk.backends()["cpu"].available:
        pytest.skip(mk.backends()["cpu"].detail)
    from mbf_kernels.optim.shared import SharedSet
    bound_at = []
    fused = SharedSet._bound_step

    def recorded(self, group, active, steps, *rest):
        ran = fused(self, group, active, steps, *rest)
        bound_at.append((steps[0], ran))
        return ran

    monkeypatch.setattr(SharedSet, "_bound_step", recorded)
    width = 70 if blocks == "exact" else 1100  # (auto: d^2 above EXACT_MAX_ENTRIES, rank 8)
    x = randn(16, width, seed=2)
    y = torch.arange(16) % 5

    def train(model, opt, steps):
        for k in steps:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if k == 2:
                g = model[0].weight.grad
                model[0].weight.grad = g.mT.contiguous().mT
                assert not model[0].weight.grad.is_contiguous()
            if k == 5:
                model[2].weight.grad = None
            opt.step()

    ends = []
    for backend in ("cpu", "torch"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, 80), nn.Tanh(), nn.Linear(80, 5)).double()
        opt = mk.MBF.from_model(model, backend=backend, curvature_update_freq=2,
                                inverse_update_freq=3, graft_norms=graft_norms, shared_rank=8)
        kinds = ["shared", "shared"] if blocks == "exact" else ["lowrank", "shared"]
        assert [b["kind"] for b in opt.block_summary()] == kinds
        train(model, opt, range(5))
        if backend == "cpu":
            twin_model, twin = copy.deepcopy((model, opt))
        train(model, opt, range(5, 10))
        ends.append(_flat(model))
    taken = [k for k, ran in bound_at if ran]
    assert taken[:9] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-9, atol=1e-12)
    assert (ends[0] - _flat(twin_model)).abs().max() > 1e-3  # the run moved
    train(twin_model, twin, range(5, 10))
    assert torch.equal(_flat(twin_model), ends[0])


@pytest.mark.parametrize("second_moment", ["element", "block"])
def test_grafted_first_step_is_as_long_as_adamw_per_unit(second_moment):
    """At step 1 the grafted update of each unit has the length of AdamW's update of it (the
    definition, against torch.optim.AdamW itself): lr |m_hat / (sqrt(v_hat) + eps)|; with
    Adam's v per block, Adam-mini's: each block's entries over its RMS gradient (+ eps)."""
    a, b = _net(), _net()
    X, Y = _data()
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    _train(a, mk.MBF.from_model(a, graft="adam", lr=1e-3, betas=(0.8, 0.99), eps=1e-7,
                                graft_second_moment=second_moment), 1, data=(X, Y))
    _train(b, torch.optim.AdamW(b.parameters(), lr=1e-3, betas=(0.8, 0.99), eps=1e-7,
                                weight_decay=0.0), 1, data=(X, Y))
    mbf = {n: p.detach() - before[n] for n, p in a.named_parameters()}
    adam = {n: p.detach() - before[n] for n, p in b.named_parameters()}
    grads = {n: p.grad for n, p in a.named_parameters()}
    units = [("conv.weight",), ("bn.weight",), ("bn.bias",),
             ("fc.weight", "fc.bias"), ("head.weight", "head.bias")]
    for unit in units:
        ours = torch.cat([mbf[n].reshape(-1) for n in unit]).norm()
        theirs = torch.cat([adam[n].reshape(-1) for n in unit]).norm()
        if second_moment == "block":  # the unit's blocks: kernels, rows with their bias, entries
            g = grads[unit[0]].reshape(-1, 9) if unit[0] == "conv.weight" else (
                torch.cat([grads[unit[0]], grads[unit[1]][:, None]], 1) if len(unit) == 2
                else grads[unit[0]][:, None])
            theirs = 1e-3 * (g / (g.square().mean(1, keepdim=True).sqrt() + 1e-7)).norm()
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0, msg=str(unit))
        # ... and the direction is MBF's, not Adam's (a unit of more than one block).
        if unit[0] in ("conv.weight", "fc.weight"):
            cos = torch.nn.functional.cosine_similarity(
                torch.cat([mbf[n].reshape(-1) for n in unit]),
                torch.cat([adam[n].reshape(-1) for n in unit]), dim=0)
            assert cos < 0.999, unit


@pytest.mark.parametrize("graft_norms", ["current", "previous"])
@pytest.mark.parametrize("backend", ["torch"] + compiled_backends(covering=17))
def test_graft_with_relative_damping_is_invariant_to_the_loss_scale(backend, graft_norms):
    """Scaling the loss by 1e4 scales every gradient, curvature and damping alike: with graft
    and relative damping (and eps far below the gradients) the trajectory is the same, the
    lagged graft's (beta1 = 0.5: from step 3) too; the paper's absolute damping is not (its
    effective step lr / damping changes)."""
    def run(scale, **opts):
        model = _net()
        _train(model, mk.MBF.from_model(model, backend=backend, curvature_update_freq=2,
                                        inverse_update_freq=3, eps=1e-30, **opts), 8,
               loss_scale=scale)
        return _flat(model)

    grafted = dict(graft="adam", damping_mode="relative", damping=0.1, lr=1e-2,
                   graft_norms=graft_norms)
    if graft_norms == "previous":
        grafted["betas"] = (0.5, 0.999)
    torch.testing.assert_close(run(1e4, **grafted), run(1.0, **grafted), rtol=1e-7, atol=1e-9)
    paper = dict(lr=1e-3, damping=0.1, **PAPER)
    assert (run(1e4, **paper) - run(1.0, **paper)).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["torch"] + compiled_backends(covering=17))
def test_nan_gradient_in_one_block_stays_in_that_block(backend):
    """A NaN in one conv kernel's gradient: that kernel's weights turn NaN (like any optimizer),
    every other kernel of the layer and every other layer stays finite, and the unit's graft
    scale (its norms leave that block out) still moves the rest."""
    model = _net()
    opt = mk.MBF.from_model(model, backend=backend, graft="adam", damping_mode="relative",
                            damping=0.1, lr=1e-2)
    _train(model, opt, 2)
    w_before = model.conv.weight.detach().clone()
    X, Y = _data()
    opt.zero_grad()
    F.cross_entropy(model(X[:8]), Y[:8]).backward()
    model.conv.weight.grad[1, 0, 2, 2] = float("nan")  # block (1, 0)
    opt.step()
    w = model.conv.weight.detach()
    assert torch.isnan(w[1, 0]).all()
    keep = torch.ones(3, 2, dtype=torch.bool)
    keep[1, 0] = False
    assert torch.isfinite(w[keep]).all()
    assert (w[keep] - w_before[keep]).abs().min() > 0  # every other kernel moved
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if n != "conv.weight")


@pytest.mark.parametrize("graft_norms", ["current", "previous"])
def test_grafted_state_round_trips_and_resumes_identically(graft_norms):
    """Saved after step 4 (a refactor), resumed: steps 5 and 6 (one pass each with
    graft_norms="previous", at the saved ratios) and 7 end where the uninterrupted run ends."""
    options = dict(graft="adam", damping_mode="relative", damping=0.1, lr=1e-2,
                   betas=(0.5, 0.999), curvature_update_freq=2, inverse_update_freq=3,
                   graft_norms=graft_norms)
    a = _net()
    opt_a = mk.MBF.from_model(a, **options)
    _train(a, opt_a, 4)
    b = copy.deepcopy(a)
    opt_b = mk.MBF.from_model(b, **options)
    saved = opt_a.state_dict()
    opt_b.load_state_dict(saved)
    # (on the CPU the default keeps Adam's v per mini-block: every unit here is blocks)
    assert all("block_exp_avg_sq" in s for s in saved["state"].values() if "block_layout" in s)
    # every unit (5 here) saves its last ratio
    units = [s for s in saved["state"].values() if "block_layout" in s]
    assert len(units) == 5 and all("graft_ratio" in s for s in units)
    _train(a, opt_a, 3)
    _train(b, opt_b, 3)
    assert torch.equal(_flat(a), _flat(b))


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # (Net's head, d = 17: not Triton's)
def test_adams_v_per_block_saves_and_converts_on_load(backend):
    """graft_second_moment="block" saves each unit's v per block (block_exp_avg_sq, a list per
    segment) and resumes identically; a per-entry state loads into it as its blocks' means
    (the v a run with v per block would have: the EMA is linear), and a per-block state into
    a per-entry optimizer as every entry taking its block's v. The shared block (fc) keeps its
    v per entry either way."""
    options = dict(graft="adam", damping_mode="relative", damping=0.1, lr=1e-2,
                   betas=(0.5, 0.999), curvature_update_freq=2, inverse_update_freq=3,
                   max_block_size=20, backend=backend,  # (fc: d = 49, a shared block)
                   graft_second_moment="element")
    block = dict(options, graft_second_moment="block")
    a = _net()
    opt_a = mk.MBF.from_model(a, **block)
    _train(a, opt_a, 4)
    saved = opt_a.state_dict()
    conv_state = saved["state"][0]  # the conv weight: one unit, one segment of 6 blocks
    assert "exp_avg_sq" not in conv_state and conv_state["block_exp_avg_sq"][0].shape == (6,)
    assert "exp_avg_sq" in saved["state"][3]  # fc.weight, a shared block
    b = copy.deepcopy(a)
    opt_b = mk.MBF.from_model(b, **block)
    opt_b.load_state_dict(saved)
    _train(a, opt_a, 3)
    _train(b, opt_b, 3)
    assert torch.equal(_flat(a), _flat(b))

    # per entry -> per block: the blocks' means
    e = _net()
    opt_e = mk.MBF.from_model(e, **options)
    _train(e, opt_e, 4)
    entry_state = opt_e.state_dict()
    # the state: 8 B per bucketed entry (float64) less, 8 B per block (and padding) more
    bucketed = sum(p.numel() for n, p in e.named_parameters() if not n.startswith("fc."))
    per_block_bytes = sum(b.block_second_moment.nbytes for b in opt_a._plans[0].buckets)
    assert opt_e.state_bytes() - opt_a.state_bytes() == 8 * bucketed - per_block_bytes
    opt_eb = mk.MBF.from_model(copy.deepcopy(e), **block)
    opt_eb.load_state_dict(entry_state)
    loaded = opt_eb.state_dict()["state"]
    want = entry_state["state"][0]["exp_avg_sq"].reshape(6, 9).mean(1)
    torch.testing.assert_close(loaded[0]["block_exp_avg_sq"][0], want, rtol=1e-15, atol=0)
    head_v = torch.cat([entry_state["state"][5]["exp_avg_sq"],  # head.weight (4, 16) + bias
                        entry_state["state"][6]["exp_avg_sq"][:, None]], 1).mean(1)
    torch.testing.assert_close(loaded[5]["block_exp_avg_sq"][0], head_v, rtol=1e-15, atol=0)
    assert torch.equal(loaded[3]["exp_avg_sq"], entry_state["state"][3]["exp_avg_sq"])

    # per block -> per entry: each entry its block's v
    opt_be = mk.MBF.from_model(copy.deepcopy(a), **options)
    opt_be.load_state_dict(opt_a.state_dict())
    per_block = opt_a.state_dict()["state"][0]["block_exp_avg_sq"][0]
    got = opt_be.state_dict()["state"][0]["exp_avg_sq"].reshape(6, 9)
    assert torch.equal(got, per_block[:, None].expand(6, 9))

    # a state without Adam's v (the paper's update): named, nothing changed
    paper = mk.MBF.from_model(copy.deepcopy(a), lr=1e-2, max_block_size=20, **PAPER)
    before = opt_b.state_dict()["state"][0]["block_exp_avg_sq"][0].clone()
    with pytest.raises(ValueError, match="no Adam second moment for conv"):
        opt_b.load_state_dict(paper.state_dict())
    assert torch.equal(opt_b.state_dict()["state"][0]["block_exp_avg_sq"][0], before)


@pytest.mark.parametrize("backend", compiled_backends(covering=9))
def test_adams_v_per_block_bad_arguments_are_named(backend):
    """A bad graft_second_moment is named; a step given v both per entry and per block
    refuses, naming both."""
    with pytest.raises(ValueError, match="graft_second_moment must be one of"):
        mk.MBF.from_model(_net(), graft_second_moment="blocks")
    params, grads, momenta, second, tiles, segments = _bucket(torch.float64)
    Fc = torch.zeros(tiles, 45, 16, dtype=torch.float64)
    fn = dispatch.select(backend, torch.device(DEVICE), differentiable=False, fn="test", d=9,
                         step=True).mbf_bucket_step_
    with pytest.raises((RuntimeError, ValueError), match="per block .* or per entry"):
        fn(params, grads, momenta, Fc, Fc.clone(), torch.zeros(2, dtype=torch.int64), segments,
           lr=0.1, momentum_coef=0.9, beta=0.8, damping=0.05, weight_decay=0.0,
           decoupled_weight_decay=True, mode=StepMode.GRAFT, second_moments=second,
           tile_norms=torch.zeros(tiles, 2, 16, dtype=torch.float64),
           directions=torch.zeros(tiles, 9, 16, dtype=torch.float64),
           block_second_moment=torch.zeros(tiles, 16, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["measure", "lagged"])
def test_cuda_step_keeps_adams_v_per_block(mode):
    """The CUDA step (one thread per block) keeps Adam's v per block as the reference does
    (its per-block code also runs on the host in the C++ tests, against the CPU kernels)."""
    if not mk.backends()["cuda"].available:
        pytest.skip(mk.backends()["cuda"].detail)
    _check_block_v_pass(dispatch.module("cuda").mbf_bucket_step_, torch.float64, mode, "cuda")


@pytest.mark.parametrize("bind", [True, False], ids=["bound", "per-bucket"])
@pytest.mark.parametrize("graft_norms", ["previous", "current"])
def test_two_pass_directions_are_kept_only_where_every_step_needs_them(graft_norms, bind):
    """The buckets' direction buffer (4 B per element) lives between steps under "current",
    whose every step takes two passes; under "previous" only for its two-pass steps (here the
    refactor at step 4, and the warm-up: beta1 = 0.5 lags from step 3)."""
    model = _net()
    opt = mk.MBF.from_model(model, graft="adam", betas=(0.5, 0.999), graft_norms=graft_norms,
                            curvature_update_freq=2, inverse_update_freq=3)
    if not bind:
        opt._plans[0].bound = False
    _train(model, opt, 3)  # steps 1, 2 (two passes) and 3 (lagged)
    kept = [b.directions is not None for b in opt._plans[0].buckets]
    assert kept == [graft_norms == "current"] * len(kept)
    before = opt.state_bytes()
    _train(model, opt, 1)  # step 4 refactors: two passes, a buffer for the step only
    assert [b.directions is not None for b in opt._plans[0].buckets] == kept
    assert opt.state_bytes() == before


def test_lagged_graft_measures_again_where_a_load_brought_no_ratio():
    """A state saved without the ratios (by an earlier version) resumes with a step that
    measures its own: the same step, bit for bit, as graft_norms="current" takes."""
    options = dict(graft="adam", damping_mode="relative", damping=0.1, lr=1e-2,
                   betas=(0.5, 0.999), curvature_update_freq=2, inverse_update_freq=3)
    a = _net()
    opt = mk.MBF.from_model(a, **options)
    _train(a, opt, 4)
    saved = opt.state_dict()
    assert all(s.pop("graft_ratio", None) is not None for s in saved["state"].values()
               if "block_layout" in s)
    ends = []
    for graft_norms in ("previous", "current"):
        b = copy.deepcopy(a)
        opt_b = mk.MBF.from_model(b, **options, graft_norms=graft_norms)
        opt_b.load_state_dict(saved)
        assert not opt_b._plans[0].graft_ready
        _train(b, opt_b, 1)
        assert opt_b._plans[0].graft_ready
        ends.append(_flat(b))
    assert torch.equal(ends[0], ends[1])


def test_exact_shared_blocks_resume_bit_for_bit_in_float32():
    """Several exact shared blocks refactored in one call (the C++ op shares them among the
    threads) and the same blocks' inverses derived again on a load give the same bits, so a
    resumed float32 run continues exactly. (The inverses are not saved: they are derived from
    the saved factors, and LAPACK's inverse may round differently on one thread and on all.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(80, 96), nn.Tanh(), nn.Linear(96, 72), nn.Tanh(),
                        nn.Linear(72, 5))
    X, Y = torch.randn(16, 80), torch.randint(0, 5, (16,))
    options = dict(curvature_update_freq=1, inverse_update_freq=2)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()

    opt = mk.MBF.from_model(net, **options)
    assert sum(r["kind"] == "shared" for r in opt.block_summary()) == 3
    train(net, opt, 3)
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    train(net, opt, 3)
    resumed = copy.deepcopy(net)
    resumed.load_state_dict(saved_net)
    opt2 = mk.MBF.from_model(resumed, **options)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 3)
    assert torch.equal(_flat(net), _flat(resumed))


def test_loading_groups_saved_without_newer_options_keeps_the_loaders_values():
    """A state dict saved by a version without some options (here graft_norms and shared_beta)
    loads: the groups keep the loading optimizer's values for those, the saved values for the
    rest, and the run steps on."""
    net = _net()
    opt = mk.MBF.from_model(net, graft_norms="current")
    _train(net, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    for g in saved["param_groups"]:
        del g["graft_norms"], g["shared_beta"]
        g["lr"] = 5e-4
    opt2 = mk.MBF.from_model(net)
    opt2.load_state_dict(saved)
    for g in opt2.param_groups:
        assert (g["graft_norms"], g["shared_beta"], g["lr"]) == ("previous", None, 5e-4)
    before = _flat(net)
    _train(net, opt2, 2)
    assert torch.isfinite(_flat(net)).all() and not torch.equal(before, _flat(net))


@pytest.mark.parametrize("second_moment, match", [
    ("element", "exp_avg_sq of parameter 0 missing.*graft='adam'"),
    ("block", "no Adam second moment for conv.weight.*graft='adam'")])
def test_loading_a_state_without_second_moments_into_a_grafted_optimizer_fails_cleanly(
        second_moment, match):
    a = _net()
    plain = mk.MBF.from_model(a, **PAPER)
    _train(a, plain, 1)
    grafted = mk.MBF.from_model(a, graft="adam", graft_second_moment=second_moment)
    saved = {k: v.clone() for k, v in grafted.state[a.conv.weight].items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=match):
        grafted.load_state_dict(plain.state_dict())
    for k, v in saved.items():  # nothing changed
        assert torch.equal(grafted.state[a.conv.weight][k], v)


@pytest.mark.parametrize("bad, match", [
    (dict(graft="sgd"), "graft must be one of"),
    (dict(damping_mode="fraction"), "damping_mode must be one of"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\)"),
    (dict(betas=(-0.1, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
    (dict(eps=-1e-8), "eps must be >= 0"),
    (dict(eps=float("nan")), "eps must be finite"),
    (dict(graft="adam", momentum=0.95), "momentum coefficient is betas"),
    (dict(fisher="sampled"), "fisher must be one of"),
])
def test_bad_options_raise_naming_them(bad, match):
    with pytest.raises(ValueError, match=match):
        mk.MBF(_net().parameters(), **bad)


def test_graft_none_with_the_default_relative_damping_warns_and_the_paper_setting_does_not():
    """Turning grafting off but keeping the default relative damping makes lr a step length in
    units of 1 / curvature, where an AdamW lr diverges: the constructor says so. The paper's
    setting (absolute damping) and an explicit damping_mode do not warn."""
    with pytest.warns(UserWarning, match="damping_mode='absolute'"):
        mk.MBF.from_model(_net(), graft="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mk.MBF(_net().parameters(), **PAPER)
        mk.MBF(_net().parameters(), graft="none", damping_mode="relative", lr=1e-5)
        mk.MBF(_net().parameters())


def test_shared_beta_resolves_by_graft():
    """shared_beta=None: SHARED_BETA with graft="adam"; beta without grafting (also a beta
    changed after construction), so that the paper's options keep section 3's one beta for
    every block; a value given is kept."""
    from mbf_kernels.optim.options import shared_beta

    group = lambda **kw: mk.MBF(_net().parameters(), **kw).param_groups[0]  # noqa: E731
    assert shared_beta(group()) == mk.optim.SHARED_BETA != group()["beta"]
    paper = group(beta=0.8, **PAPER)
    assert shared_beta(paper) == 0.8
    paper["beta"] = 0.7
    assert shared_beta(paper) == 0.7
    assert shared_beta(group(shared_beta=0.7, **PAPER)) == 0.7
    assert shared_beta(group(shared_beta=0.0)) == 0.0
    with pytest.raises(ValueError, match=r"shared_beta must be in \[0, 1\)"):
        mk.MBF(_net().parameters(), shared_beta=1.0)


@pytest.mark.parametrize("large_linear", ["shared", "lowrank"])
def test_shared_beta_decays_the_shared_blocks_and_beta_the_mini_blocks(large_linear):
    """Two refreshes: a conv's mini-blocks hold beta C1 + (1 - beta) C2 of their g g^T, the
    shared block of a linear layer (and its exact-rank low-rank form) shared_beta C1 + (1 -
    shared_beta) C2 of its rows' G^T G / out."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    opt = mk.MBF.from_model(net, max_block_size=4, curvature_update_freq=1, beta=0.8,
                            shared_beta=0.5, large_linear=large_linear, shared_rank=9)
    conv, shared = [], []
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(5, 1, 4, 4, dtype=torch.float64)).square().sum().backward()
        g = net[0].weight.grad.reshape(2, 9)
        conv.append(g[:, :, None] * g[:, None, :])
        G = torch.cat([net[2].weight.grad, net[2].bias.grad[:, None]], 1)
        shared.append(G.mT @ G / 3)
        opt.step()
    state = opt.state_dict()["state"]
    unpack = mk.packed.unpack_tril
    torch.testing.assert_close(unpack(state[0]["curvature"][0]), 0.8 * conv[0] + 0.2 * conv[1])
    saved = state[2]["curvature"][0]
    if large_linear == "lowrank":  # F = r I + V diag(e) V^T (docs/options.md)
        V, e = saved["basis"], saved["excess"]
        F_shared = saved["residual"] * torch.eye(9, dtype=V.dtype) + (V * e) @ V.mT
    else:
        F_shared = unpack(saved)[0]
    torch.testing.assert_close(F_shared, 0.5 * shared[0] + 0.5 * shared[1])


def test_graft_momentum_equal_to_beta1_is_accepted():
    opt = mk.MBF(_net().parameters(), graft="adam", momentum=0.8, betas=(0.8, 0.999))
    assert opt.param_groups[0]["betas"] == (0.8, 0.999)


class TwoShared(nn.Module):
    """Four linear layers too large for row blocks at max_block_size 8 (shared blocks of d = 25,
    32, 17 and 9, one without a bias), stepped together from one row buffer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(24, 32), nn.Linear(32, 16, bias=False)
        self.c, self.head = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


@pytest.mark.parametrize("large_linear", ["shared", "lowrank"])
@pytest.mark.parametrize("config", ["graft-relative-decoupled", "graft-coupled-wd", "relative"])
def test_shared_blocks_with_gradients_missing_on_some_steps_match_reference(config, large_linear):
    """Shared blocks whose layers miss a gradient on some steps (their step counts, and so
    Adam's bias corrections, then differ from their neighbours'): as the dense reference. Kept
    at a rank of at least d ("lowrank", shared_rank=64), they are exact too (lowrank.py)."""
    opts = dict(CONFIGS[config], curvature_update_freq=2, inverse_update_freq=3, max_block_size=8,
                large_linear=large_linear, shared_rank=64)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(40, 24, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,),
                                                                                 generator=g)
    out = []
    for cls in (mk.MBF, ReferenceMBF):
        torch.manual_seed(5)
        model = TwoShared().double()
        opt = cls.from_model(model, **opts)
        assert cls is ReferenceMBF or sum(r["kind"] == large_linear
                                          for r in opt.block_summary()) == 4
        for k in range(9):
            opt.zero_grad()
            F.cross_entropy(model(X[8 * (k % 5):][:8]), Y[8 * (k % 5):][:8]).backward()
            if k in (2, 3):
                model.b.weight.grad = None  # the middle shared layer sits out two steps
            if k == 5:
                model.a.weight.grad = model.a.bias.grad = None
            opt.step()
        out.append(_flat(model))
    torch.testing.assert_close(out[0], out[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("large_linear", ["shared", "lowrank"])
def test_nan_gradient_in_one_row_of_a_shared_block_stays_in_that_row(large_linear):
    """A shared block applies one inverse to every row: a NaN in one row's gradient turns that
    row NaN, and, with grafting, the layer's scale (its norms leave the row out) still moves the
    other rows; the other layers stay finite."""
    torch.manual_seed(5)
    model = TwoShared().double()
    opt = mk.MBF.from_model(model, max_block_size=8, lr=1e-2, large_linear=large_linear,
                            shared_rank=4)
    X = torch.randn(8, 24, dtype=torch.float64)
    Y = torch.randint(0, 3, (8,))
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        if k == 2:
            before = model.a.weight.detach().clone()
            model.a.weight.grad[4, 7] = float("nan")
        opt.step()
    w = model.a.weight.detach()
    assert torch.isnan(w[4]).all() and torch.isnan(model.a.bias[4])
    rest = torch.cat([w[:4], w[5:]])
    assert torch.isfinite(rest).all()
    assert ((rest - torch.cat([before[:4], before[5:]])).abs().amin(1) > 0).all()
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if not
               n.startswith("a."))
