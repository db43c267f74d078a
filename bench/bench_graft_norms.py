"""graft_norms="previous" against "current": is the one-pass grafted step safe, and as good?

    python bench/bench_graft_norms.py --out bench/results

Two measurements (bench/RESULTS.md, "A one-pass grafted step"):

* ``ratios``: the per-unit graft ratio r_k = |a| / |u| at every step of a run with the exact
  (two-pass) graft, and how far a lagged step would overshoot, r_{k-1} / r_k: at step 2, over
  the warm-up (steps 3 to ceil(1 / (1 - beta1))), and after it (refactor steps left out: they
  measure their own ratios). This is what chose the warm-up (options.graft_lag_warmup).
* ``train``: the four panel tasks of bench/sweep_defaults.py (the CNNs' conv layers in
  buckets, their classifiers and the autoencoders' layers shared blocks), MBF's defaults with
  each graft_norms, at AdamW's lr 1e-3 times 1/3, 1 and 3, over seeds: final training loss,
  test accuracy and seconds per epoch.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

import mbf_kernels as mk
from mbf_kernels.apps import training
from mbf_kernels.apps.data import load_dataset
from mbf_kernels.optim.options import DEFAULTS, graft_lag_warmup
from sweep_defaults import BASE_LR, PANEL

TASKS = tuple(PANEL)
LR_FACTORS = (1 / 3, 1.0, 3.0)


def ratios(task_name: str, steps: int, seed: int = 0) -> list[str]:
    """Markdown rows: per unit, the lagged step's overshoot r_{k-1} / r_k."""
    spec = PANEL[task_name]
    task = training.make_task(load_dataset(spec.dataset), spec.model)
    torch.manual_seed(seed)
    model = task.build_model()
    opt = mk.MBF.from_model(model, weight_decay=spec.weight_decay, graft_norms="current")
    plan = opt._plans[0]
    units = [u for u in plan.units if plan.graft_ratios(u)]
    x, y = task.data.x_train, task.data.y_train
    order = torch.Generator().manual_seed(seed)
    history = []
    while len(history) < steps:
        for idx in torch.randperm(len(x), generator=order).split(64):
            loss = task.loss(model(x[idx]), x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            # after step k, tile_scale holds the ratio step k measured
            history.append([plan.graft_ratios(u)[0][0].item() for u in units])
            if len(history) == steps:
                break
    r = torch.tensor(history, dtype=torch.float64)
    over = r[:-1] / r[1:]  # row j: step j + 2 lagged at step j + 1's ratio
    k = torch.arange(2, steps + 1)
    refactor = (k - 1) % DEFAULTS["inverse_update_freq"] == 0
    warm = graft_lag_warmup(DEFAULTS)
    warmup = (k > 2) & (k <= warm)
    after = (k > warm) & ~refactor
    rows = []
    for j, u in enumerate(units):
        o = over[:, j]
        rows.append(f"| {task_name} | {u.name} | {o[0]:.1f} | {o[warmup].max():.2f} | "
                    f"{o[after].quantile(0.99):.2f} | {o[after].max():.2f} | "
                    f"{o[after].min():.2f} |")
    return rows


def train(task_name: str, graft_norms: str, lr: float, seed: int,
          epochs_scale: float = 1.0) -> dict:
    spec = PANEL[task_name]
    task = training.make_task(load_dataset(spec.dataset), spec.model)
    epochs = max(1, round(spec.epochs * epochs_scale))
    cfg = training.TrainConfig(epochs=epochs, seed=seed, weight_decay=spec.weight_decay,
                               graft_norms=graft_norms)
    start = time.perf_counter()
    result = training.train_run(task, "mbf", lr, cfg)
    wall = time.perf_counter() - start
    return dict(task=task_name, graft_norms=graft_norms, lr=lr, seed=seed,
                loss=float("inf") if result.diverged else result.final.train_loss,
                test_acc=result.final.test_acc, s_per_epoch=result.final.time_s / epochs,
                wall_s=wall)


def summary(rows: list[dict]) -> list[str]:
    """Markdown: mean (min-max) over seeds per task, lr and graft_norms."""
    lines = ["| task | lr | graft_norms | final train loss, mean (min-max) | test acc | "
             "s / epoch |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["task"], r["lr"], r["graft_norms"]) for r in rows})
    for task, lr, gn in keys:
        cell = [r for r in rows if (r["task"], r["lr"], r["graft_norms"]) == (task, lr, gn)]
        loss = [r["loss"] for r in cell]
        acc = [r["test_acc"] for r in cell]
        sec = [r["s_per_epoch"] for r in cell]
        acc_text = "-" if None in acc else f"{statistics.mean(acc):.3f}"
        lines.append(f"| {task} | {lr:.2g} | {gn} | {statistics.mean(loss):.4f} "
                     f"({min(loss):.4f}-{max(loss):.4f}) | {acc_text} | "
                     f"{statistics.median(sec):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", nargs="+", choices=("ratios", "train"),
                    default=["ratios", "train"])
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--steps", type=int, default=300, help="steps of the ratio runs")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr-factors", type=float, nargs="+", default=LR_FACTORS,
                    help=f"multiples of AdamW's lr {BASE_LR:g}")
    ap.add_argument("--epochs-scale", type=float, default=1.0,
                    help="multiply every task's epochs (a quick look; RESULTS.md used 1)")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    if "ratios" in args.what:
        lines += ["| task | unit | step 2 | warm-up max | after: p99 | after: max | after: min |",
                  "|---|---|---|---|---|---|---|"]
        for t in args.tasks:
            rows = ratios(t, args.steps)
            print("\n".join(rows), flush=True)
            lines += rows
    if "train" in args.what:
        rows = []
        for t in args.tasks:
            for f in args.lr_factors:
                for seed in range(args.seeds):
                    for gn in ("current", "previous"):
                        rows.append(train(t, gn, BASE_LR * f, seed, args.epochs_scale))
                        print(rows[-1], flush=True)
        with open(args.out / "graft_norms.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        lines += [""] + summary(rows)
    (args.out / "graft_norms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
