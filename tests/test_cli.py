"""The `mbf` command end to end at toy size (`mbf info`, `mbf train`, `mbf bench`, `mbf profile`),
from the main job's environment and from a plain install without the extras."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import mbf_kernels as mk
from mbf_kernels.apps import cli, report, training
from mbf_kernels.apps.data import load_dataset
from test_models_data import write_cifar, write_svhn


def test_mbf_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name, status in mk.backends().items():
        assert name in out
    assert "torch" in out and torch.__version__ in out


def test_mbf_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--sizes", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "mbf_kernels.apps.cli", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "backends" in out


def _read_curves(out):
    return list(csv.DictReader(open(out / "curves.csv")))


def test_train_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "3", "--optimizers", "mbf,sgd,adamw",
                     "--models", "small_cnn,autoencoder", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _read_curves(out)
    runs = {(r["task"], r["optimizer"]) for r in rows}
    assert runs == {(t, o) for t in ("digits/small_cnn", "digits/autoencoder")
                    for o in ("mbf", "sgd", "adamw")}
    for task, opt in runs:
        curve = [r for r in rows if (r["task"], r["optimizer"]) == (task, opt)]
        assert [float(r["epoch"]) for r in curve] == [1.0, 2.0, 3.0]
        losses = [float(r["train_loss"]) for r in curve]
        assert all(math.isfinite(v) and v >= -1e-6 for v in losses)
        assert losses[-1] < losses[0], (task, opt, losses)
        times = [float(r["time_s"]) for r in curve]
        assert times == sorted(times) and times[0] > 0
        if task.endswith("small_cnn"):
            assert 0.5 < float(curve[-1]["test_acc"]) <= 1.0  # 10 classes: far above chance
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["summary"]) == 6 and doc["config"]["epochs"] == 3
    assert doc["environment"]["torch"] == torch.__version__
    for row in doc["summary"]:
        # Every run that did not diverge reached the common loss, and took time to.
        assert row["s_to_common_loss"] is not None and row["s_to_common_loss"] > 0
    md = (out / "summary.md").read_text()
    assert md.count("| digits/") == 6 and "MBF" in md and "AdamW" in md
    assert (out / "loss.png").stat().st_size > 20_000
    assert "digits/small_cnn" in printed and "SGD(momentum)" in printed


def test_train_over_seeds_reports_mean_and_range(tmp_path):
    out = tmp_path / "seeds"
    assert cli.main(["train", "--epochs", "2", "--optimizers", "mbf,adamw", "--models",
                     "small_cnn", "--seeds", "0,1", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    runs = doc["runs"]
    # seed by seed, so that the runs whose times are compared ran close together
    assert [(r["optimizer"], r["seed"]) for r in runs] == [
        ("mbf", 0), ("adamw", 0), ("mbf", 1), ("adamw", 1)]
    by_seed = {(r["optimizer"], r["seed"]): r["points"][-1]["train_loss"] for r in runs}
    assert by_seed[("adamw", 0)] != by_seed[("adamw", 1)]  # different weights and batches
    for row in doc["summary"]:
        name = "adamw" if row["optimizer"] == "AdamW" else "mbf"
        finals = [by_seed[(name, 0)], by_seed[(name, 1)]]
        assert row["seeds"] == [0, 1]
        assert math.isclose(row["train_loss"], sum(finals) / 2, rel_tol=1e-12)
        assert row["train_loss_range"] == [min(finals), max(finals)]
        paces = [p["time_s"] / p["epoch"] for p in
                 (r["points"][-1] for r in runs if r["optimizer"] == name)]
        assert row["s_per_epoch_range"] == [min(paces), max(paces)]
        assert min(paces) - 1e-3 <= row["s_per_epoch"] <= max(paces) + 1e-3  # (rounded to ms)
    # seconds per epoch over both seeds, against AdamW's, per task
    def pace(name: str) -> float:
        finals = [r["points"][-1] for r in runs if r["optimizer"] == name]
        return sum(p["time_s"] for p in finals) / sum(p["epoch"] for p in finals)

    ratios = {row["optimizer"]: row["epoch_vs_adamw"] for row in doc["summary"]}
    assert ratios["AdamW"] == 1.0
    assert math.isclose(ratios["MBF"], pace("mbf") / pace("adamw"), rel_tol=1e-12)
    md = (out / "summary.md").read_text()
    assert md.count("| digits/small_cnn") == 2 and "[" in md  # one row per optimizer, ranges
    assert "| epoch x AdamW |" in md and "| 1.00x |" in md


def test_train_same_data_order_and_init_for_every_optimizer():
    """Same seed: identical runs; a different optimizer still starts from the same weights."""
    ds = load_dataset("digits")
    task = training.make_task(ds, "small_cnn")
    cfg = training.TrainConfig(epochs=1)
    a = training.train_run(task, "sgd", 0.05, cfg)
    b = training.train_run(task, "sgd", 0.05, cfg)
    assert a.final.train_loss == b.final.train_loss  # seeded init and order: bit-identical
    c = training.train_run(task, "sgd", 0.05, training.TrainConfig(epochs=1, seed=1))
    assert c.final.train_loss != a.final.train_loss
    torch.manual_seed(cfg.seed)
    w0 = task.build_model().state_dict()
    torch.manual_seed(cfg.seed)
    w1 = task.build_model().state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_train_runs_in_turns_are_the_runs_made_alone():
    """compare() advances a seed's runs an epoch each in turn (their times then taken close
    together); each run, MBF-True's sampled labels included, is still the one made alone."""
    task = training.make_task(load_dataset("digits"), "small_cnn")
    # (T2 = T1: each refresh's sampled curvature reaches the step; SGD at lr 1e20 diverges in
    # its first epoch, and the others' turns go on without it)
    cfg = training.TrainConfig(epochs=2, seeds=(1,), batch_size=128, inverse_update_freq=10,
                               lr={"sgd": 1e20})
    names = ["mbf_true", "sgd", "adamw"]
    results, _ = training.compare([task], names, cfg)
    assert [r.optimizer for r in results] == names
    assert [len(r.points) for r in results] == [2, 1, 2] and results[1].diverged

    def losses(run: training.RunResult) -> list[float]:
        return [x for p in run.points for x in (p.train_loss, p.test_loss)]

    for r in results:
        alone = training.train_run(task, r.optimizer, r.lr, replace(cfg, seed=1))
        # bit for bit (NaN where SGD diverged)
        assert losses(r) == pytest.approx(losses(alone), rel=0, abs=0, nan_ok=True)


def test_train_tune_picks_the_best_trial(tmp_path):
    out = tmp_path / "tuned"
    assert cli.main(["train", "--epochs", "1", "--tune", "--tune-epochs", "1",
                     "--optimizers", "mbf,adamw", "--models", "small_cnn",
                     "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    for opt in ("mbf", "adamw"):
        trials = [t for t in doc["tuning"] if t["optimizer"] == opt]
        # The same-size sweep for every optimizer, around its default.
        assert len(trials) == len(training.TUNE_FACTORS)
        lrs = sorted(t["lr"] for t in trials)
        assert lrs[0] == pytest.approx(training.DEFAULT_LR[opt] * min(training.TUNE_FACTORS))
        best = min(trials, key=lambda t: t["train_loss"])
        run = next(r for r in doc["runs"] if r["optimizer"] == opt)
        assert run["lr"] == best["lr"]


def test_train_time_budget_and_step_decay():
    ds = load_dataset("digits")
    task = training.make_task(ds, "small_cnn")
    cfg = training.TrainConfig(epochs=10_000, budget_s=0.5)
    run = training.train_run(task, "adamw", 1e-3, cfg, budget_s=cfg.budget_s)
    assert 0.5 <= run.final.time_s < 5.0 and run.final.epoch < 10_000
    cfg = training.TrainConfig(epochs=4, lr_milestones=(1, 3), lr_gamma=0.5)
    run = training.train_run(task, "mbf", 0.01, cfg)
    assert [p.lr for p in run.points] == pytest.approx([0.01, 0.005, 0.005, 0.0025])


def test_train_bf16_autocast_runs_finite():
    task = training.make_task(load_dataset("digits"), "small_cnn")
    run = training.train_run(task, "mbf", 0.01, training.TrainConfig(epochs=2, amp="bf16"))
    assert all(math.isfinite(p.train_loss) for p in run.points)
    assert run.points[-1].train_loss < run.points[0].train_loss


def test_train_compiled_model_matches_eager(tmp_path):
    """--compile: MBF is built on the eager module, the compiled wrapper shares its weights."""
    write_cifar(tmp_path, 10, n_train=20, n_test=10)
    task = training.make_task(load_dataset("cifar10", tmp_path), "small_cnn")
    eager = training.train_run(task, "mbf", 0.01, training.TrainConfig(epochs=2, batch_size=10))
    compiled = training.train_run(task, "mbf", 0.01,
                                  training.TrainConfig(epochs=2, batch_size=10, compile=True))
    first, second = (p.train_loss for p in eager.points)
    # Inductor's kernels round differently from eager's, and MBF's damped solves amplify that
    # by up to the curvature's condition number at every step: epoch 1's losses (before and
    # after one step) agreed to 5e-5 relative, epoch 2's (after two and three) to 1.4e-3 on an
    # Intel Xeon host (under 1e-3 on the AMD ones). Weights the optimizer did not share with
    # the compiled wrapper would leave its loss where training started: epoch 2 is held to 2%
    # of the distance eager training went (1.4e-3 / 0.88 here).
    assert compiled.points[0].train_loss == pytest.approx(first, rel=1e-3)
    assert second < 0.8 * first
    assert abs(compiled.points[1].train_loss - second) <= 0.02 * (first - second)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn"])
def test_train_reads_each_on_disk_format(tmp_path, dataset, capsys):
    if dataset == "svhn":
        write_svhn(tmp_path)
    else:
        write_cifar(tmp_path, 10 if dataset == "cifar10" else 100)
    out = tmp_path / "out"
    assert cli.main(["train", "--dataset", dataset, "--data-dir", str(tmp_path), "--models",
                     "small_cnn", "--optimizers", "mbf,sgd", "--epochs", "3", "--batch-size",
                     "10", "--out", str(out)]) == 0
    rows = _read_curves(out)
    assert {r["optimizer"] for r in rows} == {"mbf", "sgd"}
    assert all(r["task"] == f"{dataset}/small_cnn" for r in rows)
    for opt in ("mbf", "sgd"):
        losses = [float(r["train_loss"]) for r in rows if r["optimizer"] == opt]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
        assert losses[-1] < losses[0]


@pytest.mark.skipif(importlib.util.find_spec("pytorch_optimizer") is None,
                    reason="pytorch-optimizer (SOAP, Shampoo) is not installed")
@pytest.mark.parametrize("optimizer", ["soap", "shampoo"])
def test_train_soap_and_shampoo_baselines(optimizer):
    task = training.make_task(load_dataset("digits"), "small_cnn")
    run = training.train_run(task, optimizer, training.DEFAULT_LR[optimizer],
                             training.TrainConfig(epochs=2))
    assert run.points[-1].train_loss < run.points[0].train_loss


@pytest.mark.parametrize("optimizer", ["mbf", "mbf_true"])
@pytest.mark.parametrize("model", ["small_cnn", "autoencoder", "tanh_autoencoder"])
def test_train_mbf_dropin_variants(optimizer, model):
    """MBF as an AdamW drop-in (grafted, relative damping) and MBF-True, whose loop adds the
    sampled backward (cross-entropy labels, or Bernoulli pixels for the autoencoder) on refresh
    steps: they train, and MBF-True's curvature refreshes were fed."""
    task = training.make_task(load_dataset("digits"), model)
    cfg = training.TrainConfig(epochs=2, curvature_update_freq=2)
    run = training.train_run(task, optimizer, training.DEFAULT_LR[optimizer], cfg)
    assert not run.diverged and run.points[-1].train_loss < run.points[0].train_loss


def test_train_graft_norms_beta_and_matmul_flags_reach_the_optimizer(tmp_path, monkeypatch):
    """``--graft-norms previous --beta 0.5 --shared-matmul float32`` builds MBF with them
    (recorded in results.json) and trains."""
    built = []
    make = training.OPTIMIZERS["mbf"]
    monkeypatch.setitem(training.OPTIMIZERS, "mbf", lambda *a: built.append(make(*a)) or built[-1])
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "2", "--optimizers", "mbf", "--models", "small_cnn",
                     "--graft-norms", "previous", "--beta", "0.5", "--shared-matmul", "float32",
                     "--out", str(out)]) == 0
    assert [(g["graft_norms"], g["beta"], g["shared_matmul"]) for g in built[0].param_groups] == [
        ("previous", 0.5, "float32")]
    doc = json.loads((out / "results.json").read_text())
    assert (doc["config"]["graft_norms"], doc["config"]["beta"],
            doc["config"]["shared_matmul"]) == ("previous", 0.5, "float32")
    curve = [float(r["train_loss"]) for r in _read_curves(out)]
    assert curve[-1] < curve[0]


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar10"], "pass --data-dir"),
    (["--optimizers", "mbf,lion"], "unknown optimizer 'lion'"),
    (["--models", "transformer"], "unknown model 'transformer'"),
    (["--models", "autoencoder", "--dataset", "cifar10", "--data-dir", "{tmp}"],
     "autoencoder reconstructs pixels in \\[0, 1\\]"),
    (["--models", "resnet32"], "resnet32 expects 32x32 images"),
])
def test_train_bad_input_names_the_problem(tmp_path, argv, message):
    write_cifar(tmp_path, 10)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", "--epochs", "1", "--out", str(tmp_path / "o"), *argv])


def test_train_rejects_bad_numbers(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "0"])
    assert "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--lr-mbf", "-1"])
    assert "must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--beta", "1"])
    assert "must be in [0, 1), got 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# mbf bench and mbf profile


def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "--device", "cpu", "--dims", "1", "9", "--sizes", "7", "64",
                     "--dtypes", "float32,float64", "--budget", "0.01", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "bench.csv")))
    ours = [b for b, s in mk.backends().items() if s.available and b in ("torch", "cpu")]
    expected_impls = {
        "solve_spd": {"torch cholesky+cholesky_solve", "torch.linalg.solve"},
        "cholesky_ex": {"torch.linalg.cholesky_ex"},
        "inv_spd": {"torch.linalg.inv"},
    }
    for op, baselines in expected_impls.items():
        impls = baselines | {f"mbf_kernels[{b}]" for b in ours}
        for dtype in ("float32", "float64"):
            for d in ("1", "9"):
                for n in ("7", "64"):
                    got = {r["impl"] for r in rows
                           if (r["op"], r["dtype"], r["d"], r["n"]) == (op, dtype, d, n)}
                    assert got == impls, (op, dtype, d, n)
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["speedup_vs_torch"]) > 0
        assert float(r["roof_fraction"]) > 0 and float(r["blocks_per_s"]) > 0
        if r["impl"].startswith("mbf_kernels"):
            assert float(r["max_abs_err"]) < (1e-4 if r["dtype"] == "float32" else 1e-10)
    first = [r for r in rows if r["impl"] == "torch cholesky+cholesky_solve"]
    assert all(float(r["speedup_vs_torch"]) == 1.0 for r in first)
    doc = json.loads((out / "bench.json").read_text())
    env = doc["environment"]
    assert env["copy_bandwidth_gb_s"] > 0 and env["adamw_bandwidth_gb_s"] > 0
    assert env["roof_gb_s"] == max(env["copy_bandwidth_gb_s"], env["adamw_bandwidth_gb_s"])
    assert (out / "bench.png").stat().st_size > 20_000
    assert "roof" in capsys.readouterr().out


def test_bench_rejects_unknown_op():
    with pytest.raises(SystemExit, match="unknown op 'qr'"):
        cli.main(["bench", "--ops", "qr", "--quick"])


def test_profile_end_to_end(tmp_path, capsys):
    out = tmp_path / "prof"
    assert cli.main(["profile", "--model", "small_cnn", "--device", "cpu", "--steps", "2",
                     "--batch-size", "8", "--out", str(out)]) == 0
    doc = json.loads((out / "profile.json").read_text())
    names = [r["variant"] for r in doc["results"]]
    expected = ["AdamW(fused)", "AdamW(foreach)", "SGD(fused)", "MBF [torch] (torch ops)"]
    if mk.backends()["cpu"].available:
        expected.append("MBF [cpu] (kernels)")
    assert names == expected + ["ReferenceMBF (dense torch.linalg)"]
    for r in doc["results"]:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["mean_ms"] > 0
        assert r["top_ops"] and all(0 <= o["share"] <= 1 for o in r["top_ops"])
        trace = json.loads((out / r["trace"]).read_text())
        assert any(e.get("name") == "optimizer.step" for e in trace["traceEvents"])
    assert doc["results"][0]["ratio_vs_adamw"] == 1.0
    if mk.backends()["cpu"].available:
        kernels = next(r for r in doc["results"] if r["variant"] == "MBF [cpu] (kernels)")
        assert any(o["op"] == "mbf_kernels::mbf_bucket_step_" for o in kernels["top_ops"])
    md = (out / "profile.md").read_text()
    assert "x AdamW" in md and "top operators" in md
    assert "ReferenceMBF" in capsys.readouterr().out


def test_profile_rejects_unknown_model(tmp_path):
    with pytest.raises(SystemExit, match="unknown model 'gpt'"):
        cli.main(["profile", "--model", "gpt", "--device", "cpu", "--out", str(tmp_path)])


def test_bench_and_train_without_matplotlib_write_everything_but_the_plot(tmp_path, capsys,
                                                                          monkeypatch):
    """matplotlib is an extra: without it the tables and data files are written, and the
    commands say why there is no plot instead of failing after the work is done."""
    import mbf_kernels.apps.benchmark as benchmark
    monkeypatch.setattr(benchmark, "can_plot", lambda: False)
    monkeypatch.setattr(report, "can_plot", lambda: False)
    out = tmp_path / "bench"
    assert cli.main(["bench", "--device", "cpu", "--dims", "4", "--sizes", "16", "--dtypes",
                     "float32", "--budget", "0.01", "--out", str(out)]) == 0
    assert (out / "bench.csv").stat().st_size > 0 and not (out / "bench.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out
    out = tmp_path / "train"
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert cli.main(["train", "--epochs", "1", "--optimizers", "adamw", "--models",
                         "small_cnn", "--out", str(out)]) == 0
    assert (out / "summary.md").exists() and not (out / "loss.png").exists()


#: Runs ``mbf`` as after a plain ``pip install .``: every package that only an extra brings
#: (and numpy, which torch does not require) is absent to the import system.
_WITHOUT_EXTRAS = """
import importlib.machinery, sys
EXTRAS = {"matplotlib", "scipy", "sklearn", "pytorch_optimizer", "triton", "numpy"}
class WithoutExtras(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in EXTRAS:
            return None
        return super().find_spec(name, path, target)
sys.meta_path = [WithoutExtras if f is importlib.machinery.PathFinder else f
                 for f in sys.meta_path]
from mbf_kernels.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv, writes, says", [
    (["info"], [], ["triton is not installed"]),
    (["train", "--epochs", "1", "--models", "relu_autoencoder", "--out", "{out}"],
     ["summary.md", "curves.csv", "results.json"],
     ["skipping soap: pytorch-optimizer is not installed", "mbf-kernels[bench]"]),
    (["bench", "--dims", "4", "--sizes", "16", "--dtypes", "float32", "--budget", "0.01",
      "--out", "{out}"], ["bench.csv", "bench.json"], ["pip install 'mbf-kernels[bench]'"]),
    (["profile", "--model", "small_cnn", "--steps", "1", "--optimizers", "adamw,mbf[cpu]",
      "--out", "{out}"], ["profile.md", "profile.json"], []),
], ids=["info", "train", "bench", "profile"])
def test_every_subcommand_runs_without_the_extras(tmp_path, argv, writes, says):
    """Issue 13: the command works from a plain install. A missing optional package costs a line
    that says how to get it, never the run's results."""
    argv = [a.replace("{out}", str(tmp_path)) for a in argv]
    run = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *argv], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    text = run.stdout + run.stderr
    assert run.returncode == 0, text
    for name in writes:
        assert (tmp_path / name).stat().st_size > 0, name
    assert not list(tmp_path.glob("*.png"))
    for line in says:
        assert line in text, line
