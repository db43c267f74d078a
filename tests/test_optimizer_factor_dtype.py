"""``factor_dtype``: a float32 bucket's factor kept in bfloat16 or as an int8 unit factor
(docs/options.md), through the optimizer: which buckets store it ("auto" follows the damping
mode), the trajectory against the dense ReferenceMBF that rounds or codes its factor the same
way, the state it saves, and loads between the storages that keep every saved value. The
bucket op's own tests: test_step.py."""

from __future__ import annotations

import io

import pytest
import torch

import mbf_kernels as mk
from mbf_kernels.optim import PAPER, ReferenceMBF
from test_optimizer import BACKENDS, batches, flat, make_net, train

# The defaults (grafted, relative damping) with the refresh and refactor every few steps.
# The shared block's GEMM in float32: these tests are about the buckets' factor, and under
# shared_matmul="bfloat16" (the default on a CPU with AVX512_BF16 or AMX) the optimizer's and
# ReferenceMBF's U would round to bfloat16 after different summation orders.
OPTIONS = dict(curvature_update_freq=2, inverse_update_freq=3, weight_decay=0.01,
               shared_matmul="float32")


def _factor_dtypes(opt):
    return {r["factor_dtype"] for r in opt.block_summary() if r["kind"] == "blocks"}


@pytest.mark.parametrize("options, dtype, want", [
    (dict(PAPER, damping=0.1), torch.float32, "torch.float32"),  # the paper's: exact
    (dict(factor_dtype="bfloat16", **PAPER), torch.float32, "torch.bfloat16"),
    (dict(factor_dtype="state"), torch.float32, "torch.float32"),
    (dict(factor_dtype="bfloat16"), torch.float64, "torch.float64"),  # float64 stays
])
def test_which_buckets_store_a_bfloat16_factor(options, dtype, want):
    model = make_net(dtype)
    opt = mk.MBF.from_model(model, **options)
    assert _factor_dtypes(opt) == {want}
    # The factor is the only state that changes: half its bytes saved.
    other = mk.MBF.from_model(model, **dict(options, factor_dtype="state"))
    factor_elems = sum(b.factor.numel() for plan in opt._plans for b in plan.buckets)
    saved = factor_elems * 2 if want == "torch.bfloat16" else 0
    assert other.state_bytes() - opt.state_bytes() == saved


@pytest.mark.parametrize("options", [dict(factor_dtype="int8"), dict()],
                         ids=["int8", "auto"])  # "auto" under the default relative damping
def test_which_buckets_store_an_int8_factor(options):
    """factor_dtype="int8": the float32 buckets of d >= 4 on CPU tensors (their kernels and the
    reference step read it) as a unit factor of unit_factor_rows(d) rows of bytes; d = 1 keeps
    bfloat16, smaller there; float64 state keeps its dtype."""
    from mbf_kernels.layout import unit_factor_rows

    model = make_net(torch.float32)
    for backend in ("auto", "torch"):
        opt = mk.MBF.from_model(model, backend=backend, **options)
        stored = {(r["d"], r["factor_dtype"]) for r in opt.block_summary()
                  if r["kind"] == "blocks"}
        assert stored == {(9, "torch.int8"), (25, "torch.int8"), (21, "torch.int8"),
                          (1, "torch.bfloat16")}
        for b in (b for plan in opt._plans for b in plan.buckets if b.d > 1):
            assert b.factor.shape == (b.tiles, unit_factor_rows(b.d), 16)
    assert _factor_dtypes(mk.MBF.from_model(make_net(torch.float64), **options)) == {
        "torch.float64"}


def test_bad_factor_dtype_is_named():
    with pytest.raises(ValueError, match="factor_dtype"):
        mk.MBF(make_net().parameters(), factor_dtype="float16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(PAPER, lr=0.05, damping=0.1)],
                         ids=["defaults", "paper"])
@pytest.mark.parametrize("storage, other, bound", [("bfloat16", "state", 2.0 ** -11),
                                                  ("int8", "bfloat16", 2.0 ** -10)])
def test_trajectory_matches_reference_mbf(backend, options, storage, other, bound):
    """7 steps with a bfloat16 or int8 unit factor, every block kind, against ReferenceMBF
    rounding or coding its dense factor alike. The two float32 factorisations agree to float32
    rounding, so an entry rounds to another bfloat16 (a code to another code) only where it lies
    that close to a rounding boundary; such an entry moves by 2^-7 of itself (U's entry by a
    code step, up to 1/127 of the block's largest) and its block's direction by a share of that.
    Measured (AVX-512 host, of the distance travelled): bfloat16 7e-6 to 3e-5, bound 2^-11;
    int8 3e-7 to 8e-6, and 2.1e-4 at the scalar level (whose factorisation, without FMA, is
    farther from torch's: a code flips), bound 2^-10. The next storage up on either side
    (float32 for bfloat16, bfloat16 for int8) is 2^-9 or more away (0.37% and 1.3%, 0.38% and
    6.5%, paper's and grafted), so the bounds tell the storages apart."""
    if storage == "int8" and backend not in ("torch", "cpu"):
        pytest.skip("only the cpu and torch backends read an int8 factor")
    opts = dict(OPTIONS, factor_dtype=storage, **options)

    def net():
        model = make_net(torch.float32)
        # conv1's bias feeds a BatchNorm, so its gradient is float32 noise (zero in exact
        # arithmetic), which grafting scales up to a full Adam step in a noise direction.
        model.conv1.bias.requires_grad_(False)
        return model

    start = net()
    out = {}
    for name, cls, o in (("mbf", mk.MBF, dict(opts, backend=backend)), ("ref", ReferenceMBF, opts),
                         ("other", ReferenceMBF, dict(opts, factor_dtype=other))):
        model = net()
        train(model, cls.from_model(model, **o), batches(7, torch.float32))
        out[name] = flat(model)
    travelled = (out["ref"] - flat(start)).norm()
    assert (out["mbf"] - out["ref"]).norm() <= bound * travelled
    assert (out["other"] - out["ref"]).norm() > 2.0 ** -9 * travelled


def _trained(factor_dtype, steps=4):
    model = make_net(torch.float32)
    opt = mk.MBF.from_model(model, factor_dtype=factor_dtype, **OPTIONS)
    train(model, opt, batches(steps, torch.float32))
    return model, opt


@pytest.mark.parametrize("factor_dtype, saved_dtypes", [
    ("bfloat16", {torch.bfloat16}),
    # an int8 factor is saved decoded, in float32 (d = 1's bucket keeps bfloat16)
    ("int8", {torch.float32, torch.bfloat16})])
def test_state_dict_resumes_bit_for_bit(factor_dtype, saved_dtypes):
    """Saved, loaded into a new optimizer and stepped on: the same parameters bit for bit. An
    int8 factor is decoded into the canonical float32 factor and coded again on load, to the
    same bytes (its scale is a bfloat16 for that)."""
    data = batches(8, torch.float32)
    model, opt = _trained(factor_dtype)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    saved = [(kind, f) for st in opt.state_dict()["state"].values() if "factor" in st
             for (kind, *_), f in zip(st["block_layout"], st["factor"])]
    assert {f.dtype for kind, f in saved if kind == "blocks"} == saved_dtypes
    assert {f.dtype for kind, f in saved if kind != "blocks"} == {torch.float32}  # fc1's
    train(model, opt, data[4:])
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = make_net(torch.float32, seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = mk.MBF.from_model(resumed, factor_dtype=factor_dtype, **OPTIONS)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, data[4:])
    assert torch.equal(flat(model), flat(resumed))


@pytest.mark.parametrize("saved_as, loaded_as", [("bfloat16", "state"), ("state", "bfloat16"),
                                                 ("int8", "state"), ("state", "int8")])
def test_load_converts_the_factor_to_the_loading_storage(saved_as, loaded_as):
    """A bfloat16 factor loads exactly into float32; a float32 one loads rounded to nearest into
    bfloat16, or coded into int8 (layout.unit_coded), and the next refactor replaces it; an int8
    one is saved decoded and loads exactly into float32. Curvature, momenta and counts are
    untouched."""
    from mbf_kernels.layout import unit_coded

    _, opt = _trained(saved_as)
    sd = opt.state_dict()
    model2 = make_net(torch.float32, seed=5)
    opt2 = mk.MBF.from_model(model2, factor_dtype=loaded_as, **OPTIONS)
    opt2.load_state_dict(sd)
    sd2 = opt2.state_dict()
    for i, st in sd["state"].items():
        st2 = sd2["state"][i]
        for (kind, *_), f, f2 in zip(st.get("block_layout", []), st.get("factor", []),
                                     st2.get("factor", [])):
            if kind == "blocks" and loaded_as == "int8" and f.shape[1] > 1:  # decoded again
                assert f2.dtype == torch.float32
                assert torch.equal(f2, unit_coded(f))
                continue
            if kind == "blocks":  # (a shared block's factor stays float32)
                assert f2.dtype == (torch.bfloat16 if loaded_as == "bfloat16" or
                                    (loaded_as == "int8" and f.shape[1] == 1) else torch.float32)
            assert torch.equal(f2, f.to(f2.dtype))
        for key in ("curvature", "momentum_buffer", "exp_avg_sq", "step"):
            if key in st:
                a, b = st[key], st2[key]
                assert (all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, list)
                        else torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
