"""The parameter -> block rules of MBF_SPEC section 2, checked against the spec's table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mbf_kernels as mk


def summary(opt):
    """{(kind, d): blocks} over every bucket and shared block."""
    out: dict = {}
    for row in opt.block_summary():
        key = (row["kind"], row["d"])
        out[key] = out.get(key, 0) + row["blocks"]
    return out


def test_module_aware_rules():
    model = nn.ModuleDict(dict(
        conv=nn.Conv2d(3, 8, 3),                      # 8*3 blocks of 9, bias 8 diagonal
        grouped=nn.Conv2d(8, 8, 3, groups=4, bias=False),  # 8*2 blocks of 9
        depthwise=nn.Conv2d(8, 8, 5, groups=8, bias=False),  # 8 blocks of 25
        transposed=nn.ConvTranspose2d(8, 4, 3, bias=False),  # stored (8, 4, 3, 3): 32 of 9
        conv1d=nn.Conv1d(2, 3, 4, bias=False),       # 6 of 4
        conv3d=nn.Conv3d(1, 2, 3, bias=False),       # 2 of 27
        pointwise=nn.Conv2d(8, 6, 1, bias=False),    # conv rule: 48 of 1
        small=nn.Linear(10, 7),                      # 7 rows of 10 + 1
        large=nn.Linear(100, 3),                     # shared: one 101 x 101
        emb=nn.Embedding(5, 6),                      # 5 rows of 6
        norm=nn.LayerNorm([2, 3]),                   # 2-D weight, still diagonal: 6 + 6
        bn=nn.BatchNorm2d(4),                        # 4 + 4 diagonal
    ))
    opt = mk.MBF.from_model(model, backend="torch")
    assert summary(opt) == {
        ("blocks", 9): 24 + 16 + 32, ("blocks", 25): 8, ("blocks", 4): 6, ("blocks", 27): 2,
        ("blocks", 1): 8 + 48 + 12 + 8, ("blocks", 11): 7, ("shared", 101): 1,
        ("blocks", 6): 5,
    }


def test_shape_rule_without_modules():
    w2 = nn.Parameter(torch.randn(7, 10))
    w4 = nn.Parameter(torch.randn(4, 2, 3, 3))
    b = nn.Parameter(torch.randn(7))
    opt = mk.MBF([w2, w4, b], backend="torch")
    # A 2-D weight without a known bias: rows of `in`; the bias is diagonal.
    assert summary(opt) == {("blocks", 10): 7, ("blocks", 9): 8, ("blocks", 1): 7}


@pytest.mark.parametrize("mode, expected", [
    # d = 100 + 1 = 101 > 64: chunks of 64 and of 36 + bias.
    ("chunk", {("blocks", 64): 3, ("blocks", 37): 3}),
    ("diagonal", {("blocks", 1): 303}),
    ("shared", {("shared", 101): 1}),
    ("lowrank", {("lowrank", 101): 1}),
    ("auto", {("shared", 101): 1}),  # small and cheap: exact
])
def test_large_linear_modes(mode, expected):
    opt = mk.MBF.from_model(nn.Linear(100, 3), backend="torch", large_linear=mode)
    assert summary(opt) == expected


@pytest.mark.parametrize("mode, in_features, out, rank, kind, kept", [
    # n = 300 rows of d = 101: 2 n d^2 = 6.1M FLOPs, d^2 = 10k entries: small, exact.
    ("auto", 100, 300, 32, "shared", 101),
    # n = 4000: 82M FLOPs > 2^26, and d > 2k: the low-rank GEMMs are cheaper.
    ("auto", 100, 4000, 32, "lowrank", 32),
    ("auto", 127, 4000, 64, "shared", 128),   # d = 2k: the exact block is no more work
    ("auto", 128, 4000, 64, "lowrank", 64),
    ("auto", 1024, 2, 32, "lowrank", 32),     # d^2 > 2^20 entries, however few rows
    ("lowrank", 100, 5, 200, "lowrank", 101),  # a rank above d is d: exact, in low-rank form
    ("shared", 300, 5, 8, "shared", 301),
])
def test_auto_rule_and_block_summary(mode, in_features, out, rank, kind, kept):
    opt = mk.MBF.from_model(nn.Linear(in_features, out), backend="torch", large_linear=mode,
                            shared_rank=rank)
    (row,) = opt.block_summary()
    d = in_features + 1
    assert (row["kind"], row["d"], row["rank"]) == (kind, d, kept)
    # Its memory: three d x d matrices exact; two d x k bases and their k values low-rank.
    itemsize = 4
    expected = 3 * d * d if kind == "shared" else 2 * d * kept + 2 * kept + 2
    assert row["bytes"] == expected * itemsize + (8 if kind == "lowrank" else 0)


def test_chunk_with_a_bias_only_piece():
    # in = 64, with its bias d = 65: one piece of 64 weights and one of the bias alone.
    opt = mk.MBF.from_model(nn.Linear(64, 2), backend="torch", large_linear="chunk")
    assert summary(opt) == {("blocks", 64): 2, ("blocks", 1): 2}


def test_max_block_size_and_conv1x1_rows():
    model = nn.Sequential(nn.Conv2d(5, 6, 1), nn.Linear(6, 4))
    assert summary(mk.MBF.from_model(model, backend="torch", conv1x1="row")) == {
        ("blocks", 6): 6, ("blocks", 7): 4}  # 1x1 conv rows of 5 + its bias
    assert summary(mk.MBF.from_model(model, backend="torch", max_block_size=4)) == {
        ("blocks", 1): 30 + 6, ("shared", 7): 1}


def test_bias_in_another_group_stays_diagonal():
    lin = nn.Linear(3, 2)
    opt = mk.MBF([{"params": [lin.weight]}, {"params": [lin.bias], "lr": 0.1}],
                 backend="torch", _roles=mk.optim.blocks.module_roles(lin))
    assert summary(opt) == {("blocks", 3): 2, ("blocks", 1): 2}


def test_default_rank_by_device():
    """shared_rank=None: the rank whose GEMMs cost about one AdamW step on the device."""
    from mbf_kernels.optim.blocks import default_rank
    assert (default_rank("cpu"), default_rank("cuda"), default_rank("meta")) == (16, 128, 16)
    opt = mk.MBF.from_model(nn.Linear(4000, 3000), backend="torch")
    assert [(r["kind"], r["rank"]) for r in opt.block_summary()] == [("lowrank", 16)]
