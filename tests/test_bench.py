"""The benchmark scripts end to end at toy size: they run, check their answers, write their files."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import mbf_kernels as mk

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"


@pytest.mark.skipif(not mk.backends()["cpu"].available, reason="C++ kernels not built")
def test_bench_kernels_toy(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--dims", "4", "9", "--sizes", "64", "1000", "--step-n", "100",
                       "--budget", "0.05", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "cpu_kernels.csv")))
    solve = [r for r in rows if r["op"] == "solve_spd"]
    assert {(r["impl"], r["d"], r["n"]) for r in solve} == {
        (impl, d, n) for impl in (bench.BASELINE, "mbf_kernels[cpu]") for d in ("4", "9")
        for n in ("64", "1000")}
    for r in solve:
        assert float(r["median_ms"]) > 0 and float(r["min_ms"]) <= float(r["median_ms"])
        if r["impl"] != bench.BASELINE:
            assert float(r["speedup_vs_torch"]) > 0
    steps = [r for r in rows if r["op"].startswith("step")]
    assert len(steps) == 6 and all(float(r["roof_fraction"]) > 0 for r in steps)
    md = (tmp_path / "cpu_kernels.md").read_text()
    assert "| 9 |" in md and "roof" in md
    assert (tmp_path / "cpu_kernels.png").stat().st_size > 10_000
    assert (tmp_path / "cpu_kernels.json").exists()


def _load(name: str):
    path = BENCH.parent / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_optimizer_toy(tmp_path):
    bench = _load("bench_optimizer")
    assert bench.main(["--models", "small_cnn", "--repeats", "2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "optimizer_step.csv")))
    # small_cnn's 512 -> 64 linear is large: both large_linear settings, six rows each.
    assert [(r["large_linear"], r["step"]) for r in rows] == [
        (mode, step) for mode in ("auto", "diagonal")
        for step in ("adamw", "adamw_foreach", "cached", "refresh", "refactor", "amortised")]
    assert {r["optimizer"] for r in rows if r["step"] == "adamw"} == {"AdamW(fused)"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["ratio_vs_adamw"]) > 0
        # The time until step() returned is part of the step's (every pair's, so the medians')
        assert 0 < float(r["host_ms"]) <= float(r["median_ms"])
    adamw = [r for r in rows if r["step"] == "adamw"]
    assert all(float(r["ratio_vs_adamw"]) == 1.0 and float(r["state_x_params"]) == 2.0
               for r in adamw)
    # MBF state: momentum (1x) + curvature and factor (d(d+1)/2 per d parameters each) > 3x.
    assert all(float(r["state_x_params"]) > 3 for r in rows if r["optimizer"] == "MBF")
    assert "| small_cnn |" in (tmp_path / "optimizer_step.md").read_text()
    # On a GPU the table also shows the host's time, a column of its own in every row.
    table = bench.markdown([{**r, **{k: float(r[k]) for k in ("median_ms", "min_ms", "max_ms",
                                                               "host_ms", "ratio_vs_adamw",
                                                               "state_x_params")}}
                            for r in rows], dict(gpu="a GPU", torch="x", commit="y"))
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert "host ms" in lines[0] and len({line.count("|") for line in lines}) == 1


def test_sweep_defaults_toy(tmp_path):
    """Two tasks, two lrs, one damping, two curvature decays, a fraction of an epoch: the csv
    has every cell (AdamW and MBF per lr and beta, then the (T1, T2) variants at the chosen
    setting) and the report a choice."""
    sweep = _load("sweep_defaults")
    assert sweep.main(["--tasks", "digits_cnn", "tanh_ae", "--seeds", "1", "--lr-factors", "1",
                       "3", "--dampings", "0.1", "--betas", "0.9", "0.5", "--epochs-scale",
                       "0.05", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "defaults_sweep.csv")))
    assert len(rows) == 2 * 2 * (1 + 2) + 2 * 2
    assert all(0 < float(r["loss"]) < 10 for r in rows)
    grid = [r for r in rows if r["optimizer"] == "mbf" and (r["t1"], r["t2"]) == ("10", "100")]
    assert sorted(float(r["beta"]) for r in grid) == [0.5] * 4 + [0.9] * 4
    assert "Chosen: lr = " in (tmp_path / "defaults_sweep.md").read_text()


def test_sweep_defaults_choice_rule():
    """The rule on made-up losses: a setting (lr, damping, beta) must be robust at 9x its lr;
    among the robust ones the lowest worst-over-tasks loss (at lr and 3x lr, relative to each
    task's best) wins; a csv written before the beta axis reads as beta 0.9."""
    sweep = _load("sweep_defaults")
    lrs = [1e-3 * f for f in (1 / 9, 1 / 3, 1, 3, 9, 27)]

    def rows(beta: float, losses: list[float], shared_beta: float | None = None) -> list[dict]:
        return [dict(task=t, optimizer="mbf", lr=lr, damping=0.3, beta=beta,
                     shared_beta=shared_beta, t1=10, t2=100, loss=x * (2 if t == "tanh_ae" else 1))
                for t in ("digits_cnn", "tanh_ae") for lr, x in zip(lrs, losses)]

    # beta 0.5 is best at 1e-3 but fails at 9e-3 (worse than at lr / 9): not robust.
    fragile = rows(0.5, [4.0, 2.0, 0.5, 0.6, 5.0, 9.0])
    steady = rows(0.9, [4.0, 2.0, 1.0, 1.2, 1.5, 3.0])
    chosen, lines = sweep.choose(fragile + steady)
    assert (chosen["lr"], chosen["beta"]) == (lrs[2], 0.9)
    assert any("not robust" in line for line in lines)
    better = rows(0.6, [4.0, 2.0, 0.8, 0.9, 1.2, 3.0])
    chosen, _ = sweep.choose(fragile + steady + better)
    assert (chosen["lr"], chosen["damping"], chosen["beta"]) == (lrs[2], 0.3, 0.6)
    assert chosen["shared_beta"] == 0.6  # (None: the same as beta)
    split = rows(0.9, [4.0, 2.0, 0.7, 0.8, 1.1, 3.0], shared_beta=0.5)
    chosen, lines = sweep.choose(fragile + steady + better + split)
    assert (chosen["beta"], chosen["shared_beta"]) == (0.9, 0.5)
    assert any("beta 0.9 / 0.5" in line for line in lines)
    old = {k: str(v) for k, v in steady[0].items() if k not in ("beta", "shared_beta")}
    assert [sweep._read_rows([old])[0][k] for k in ("beta", "shared_beta")] == [0.9, 0.9]


def test_sweep_defaults_keeps_the_shipped_setting_within_the_seeds_noise():
    """A robust setting whose score is within two combined standard errors of the best is a tie,
    and among ties the shipped setting stays; once the seeds tell them apart the best wins. A
    csv without standard errors reads as exact."""
    sweep = _load("sweep_defaults")
    lrs = [1e-3 * f for f in (1 / 9, 1 / 3, 1, 3, 9, 27)]

    def rows(damping: float, losses: list[float], se: float) -> list[dict]:
        return [dict(task=t, optimizer="mbf", lr=lr, damping=damping, beta=0.9, shared_beta=0.3,
                     t1=10, t2=100, loss=x, loss_se=se * x)
                for t in ("digits_cnn", "tanh_ae") for lr, x in zip(lrs, losses)]

    shipped = (1e-3, 0.3, 0.9, 0.3)
    steady = [4.0, 2.0, 1.05, 1.1, 1.5, 3.0]
    better = [4.0, 2.0, 1.0, 1.05, 1.4, 3.0]
    for se, want in ((0.05, 0.3), (0.005, 0.1)):  # 5% noise: a tie; 0.5%: 0.1 is better
        chosen, lines = sweep.choose(rows(0.3, steady, se) + rows(0.1, better, se), shipped)
        assert (chosen["lr"], chosen["damping"]) == (lrs[2], want)
        assert any(line.startswith("Within the seeds' noise") for line in lines)
        assert ("the shipped setting, kept" in lines[-1]) == (want == 0.3)
    other = (1e-3, 0.03, 0.9, 0.3)
    chosen, _ = sweep.choose(rows(0.3, steady, 0.05) + rows(0.1, better, 0.05), other)
    assert chosen["damping"] == 0.1  # another shipped setting: the best wins the tie
    old = {k: str(v) for k, v in rows(0.3, steady, 0.05)[0].items() if k != "loss_se"}
    assert sweep._read_rows([old])[0]["loss_se"] == 0.0


def test_bench_graft_norms_toy(tmp_path):
    """The ratio runs (20 steps: past the warm-up) and one training cell per graft_norms."""
    bench = _load("bench_graft_norms")
    assert bench.main(["--tasks", "digits_cnn", "--steps", "20", "--seeds", "1",
                       "--lr-factors", "1", "--epochs-scale", "0.05",
                       "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "graft_norms.csv")))
    assert [r["graft_norms"] for r in rows] == ["current", "previous"]
    assert all(0 < float(r["loss"]) < 10 and float(r["s_per_epoch"]) > 0 for r in rows)
    md = (tmp_path / "graft_norms.md").read_text()
    # one ratio row per unit in buckets (the small CNN's two convs and BatchNorms, with biases)
    assert md.count("| digits_cnn | features.") == 8
    assert "| digits_cnn | 0.001 | previous |" in md


def test_bench_distributed_toy(tmp_path):
    """Two ranks, DDP sharded and not, and FSDP2: ResNet-32's units balance, so each sharded rank
    keeps about half the curvature (the small CNN would not: one shared block is 97% of it);
    under FSDP2 each rank keeps its rows' blocks, all of them between the ranks (its 65-wide
    head's shared block on both)."""
    bench = _load("bench_distributed")
    assert bench.main(["--model", "resnet32", "--worlds", "1", "2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "distributed.csv")))
    assert [(r["world"], r["wrapping"]) for r in rows] == [
        ("1", "ddp"), ("2", "ddp"), ("2", "ddp"), ("2", "ddp_sharded"), ("2", "ddp_sharded"),
        ("2", "fsdp2"), ("2", "fsdp2")]
    whole = float(rows[0]["curvature_mb"])
    for wrapping in ("ddp_sharded", "fsdp2"):
        per_rank = [float(r["curvature_mb"]) for r in rows if r["wrapping"] == wrapping]
        assert whole <= sum(per_rank) < 1.05 * whole and max(per_rank) < 0.55 * whole, wrapping
    assert "| 2 | ddp_sharded |" in (tmp_path / "distributed.md").read_text()


def test_bench_host_toy():
    """The Triton step's host time on the CPU: every kind of step timed, and the kernels it
    stood in for are back afterwards (later tests launch them)."""
    bench = _load("bench_host")
    kernels = (bench.triton_step._bucket_step_kernel, bench.triton_step._bucket_refactor_kernel)
    times = bench.host_times("resnet32", rounds=1, steps=2)
    assert set(times) == {"cached", "refresh", "refactor"}
    assert all(len(v) == 1 and v[0] > 0 for v in times.values())
    assert (bench.triton_step._bucket_step_kernel,
            bench.triton_step._bucket_refactor_kernel) == kernels
    assert bench.markdown(times).count("\n") == 4


def test_bench_dead_units_toy(tmp_path):
    """Every optimizer's row over the windows the steps fill, with the flush mode reset after."""
    bench = _load("bench_dead_units")
    assert bench.main(["--steps", "150", "--models", "Conv2d(512, 512, 3)",
                       "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "dead_units.json").read_text())
    assert [r["optimizer"] for r in doc["rows"]] == list(bench.OPTIMIZERS)
    for r in doc["rows"]:
        assert len(r["window_ms"]) == 2 and all(t > 0 for t in r["window_ms"])
        assert r["slowest_vs_first"] >= 1.0
    assert (tmp_path / "dead_units.md").read_text().count("| Conv2d(512, 512, 3) |") == 3
    assert (torch.tensor([torch.finfo(torch.float32).tiny / 8]) * 0.5).item() > 0
    # A process that flushes denormals itself keeps doing so after the flushing row.
    torch.set_flush_denormal(True)
    try:
        bench.step_times("Conv2d(512, 512, 3)", "AdamW(fused), set_flush_denormal", 1, 0.1)
        assert bench.flush_denormal_enabled()
        assert (torch.tensor([torch.finfo(torch.float32).tiny / 8]) * 0.5).item() == 0
    finally:
        torch.set_flush_denormal(False)
