"""The sweep behind MBF's default lr and damping (mbf_kernels.optim.DEFAULTS).

    python bench/sweep_defaults.py --out bench/results

Both bundled tasks (scikit-learn's 8x8 digits: the small CNN with cross-entropy, and the deep
autoencoder with binary cross-entropy on its reconstruction, less the targets' entropy: the KL
divergence, whose floor is 0), every (lr, damping) of the grid,
T1 = 10 and T2 = 100 (the defaults), two seeds. Criterion, as the paper's tuning: training loss,
averaged over the last epoch and the seeds. A default must be good on both tasks and survive a
user's 3x larger lr: a pair's score is the worst, over the tasks, of its loss and of the loss at
the next larger lr (same damping), each relative to that task's best pair; the lowest score wins.
Writes defaults_sweep.csv and defaults_sweep.md (``--summarize CSV`` redoes only the choice).
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import math
from pathlib import Path

from mbf_kernels import training
from mbf_kernels.data import load_dataset

LRS = (0.003, 0.01, 0.03, 0.1, 0.3)
DAMPINGS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
DIGITS = functools.cache(lambda: load_dataset("digits"))


def run(task: str, lr: float, damping: float, seed: int, epochs: int) -> float:
    """MBF's training loss over the last epoch (mbf train's loop: seeded init and data order)."""
    model = "small_cnn" if task == "cnn" else "autoencoder"
    cfg = training.TrainConfig(epochs=epochs, seed=seed, batch_size=64, damping=damping)
    result = training.train_run(training.make_task(DIGITS(), model), "mbf", lr, cfg)
    return math.inf if result.diverged else result.final.train_loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lrs", type=float, nargs="+", default=LRS)
    ap.add_argument("--dampings", type=float, nargs="+", default=DAMPINGS)
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--summarize", type=Path, help="choose from an existing defaults_sweep.csv")
    args = ap.parse_args(argv)
    rows = []
    if args.summarize:
        rows = [dict(task=r["task"], lr=float(r["lr"]), damping=float(r["damping"]),
                     loss=float(r["loss"])) for r in csv.DictReader(open(args.summarize))]
        args.lrs = sorted({r["lr"] for r in rows})
        args.dampings = sorted({r["damping"] for r in rows})
    else:
        for task, lr, damping in itertools.product(("cnn", "autoencoder"), args.lrs,
                                                   args.dampings):
            losses = [run(task, lr, damping, s, args.epochs) for s in range(args.seeds)]
            rows.append(dict(task=task, lr=lr, damping=damping, loss=sum(losses) / len(losses)))
            print(rows[-1], flush=True)
    best = {t: min(r["loss"] for r in rows if r["task"] == t) for t in ("cnn", "autoencoder")}
    rel = {}
    for r in rows:
        r["x_best"] = r["loss"] / best[r["task"]]
        rel[r["task"], r["lr"], r["damping"]] = r["x_best"]
    lrs = sorted(args.lrs)
    score = {}
    for (task, lr, damping), x in rel.items():
        i = lrs.index(lr)
        worse = rel.get((task, lrs[i + 1], damping), math.inf) if i + 1 < len(lrs) else math.inf
        key = (lr, damping)
        score[key] = max(score.get(key, 0.0), x, worse)
    choice = min(score, key=score.get)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "defaults_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"Training loss (last of {args.epochs} epochs, mean of {args.seeds} seeds), "
             "T1 = 10, T2 = 100. Cell: cnn / autoencoder loss.", "",
             "| lr \\ damping | " + " | ".join(f"{d:g}" for d in args.dampings) + " |",
             "|---|" + "---|" * len(args.dampings)]
    table = {(r["task"], r["lr"], r["damping"]): r["loss"] for r in rows}
    for lr in args.lrs:
        cells = []
        for d in args.dampings:
            mark = "**" if (lr, d) == choice else ""
            cells.append(f"{mark}{table['cnn', lr, d]:.3g} / {table['autoencoder', lr, d]:.3g}{mark}")
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Chosen: lr = {choice[0]:g}, damping = {choice[1]:g} (score {score[choice]:.2f}: "
              "its loss and the loss at the next larger lr are within that factor of each "
              "task's best)."]
    (args.out / "defaults_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
