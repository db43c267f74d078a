"""What ``mbf train`` reports: one summary row per task and optimizer (mean and spread over
seeds, time to the task's common loss), the terminal and markdown tables, curves.csv,
results.json and the plot (matplotlib is optional: without it, everything else is written)."""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import asdict
from pathlib import Path

from .benchmark import NO_PLOT, can_plot
from .training import LABELS, OPTIMIZERS, RunResult, TrainConfig

__all__ = ["COLUMNS", "summary_rows", "markdown_table", "format_row", "write_outputs"]

#: The summary table's columns, as :func:`format_row` fills them (terminal and summary.md).
COLUMNS = ("task", "optimizer", "lr", "epochs", "train s", "s/epoch", "epoch x AdamW",
           "train loss", "s to common loss", "test loss", "test acc")


def summary_rows(results: list[RunResult]) -> list[dict]:
    """One row per task and optimizer: what its runs reached (the mean over seeds, with the
    min and max beside it when there are several), and how long they took to reach the task's
    common loss (the highest final training loss among the task's runs that did not diverge: a
    level every such run reached, so the times compare like with like)."""
    common = {}
    for task in dict.fromkeys(r.task for r in results):
        finals = [r.final.train_loss for r in results if r.task == task and not r.diverged]
        common[task] = max(finals) if finals else math.nan

    def pace_of(runs: list[RunResult]) -> float:  # seconds per epoch over the runs together
        finals = [r.final for r in runs]
        return sum(p.time_s for p in finals) / max(sum(p.epoch for p in finals), 1e-9)

    rows = []
    for task, optimizer in dict.fromkeys((r.task, r.optimizer) for r in results):
        runs = [r for r in results if (r.task, r.optimizer) == (task, optimizer)]
        adamw = [r for r in results if (r.task, r.optimizer) == (task, "adamw")]
        finals = [r.final for r in runs]
        reach = [next((p.time_s for p in r.points if p.train_loss <= common[task]), None)
                 for r in runs]

        def stat(values: list[float]) -> dict:
            return dict(mean=sum(values) / len(values), min=min(values), max=max(values))

        loss, acc = stat([p.train_loss for p in finals]), None
        # each run's own seconds per epoch: the spread over seeds beside the mean
        pace = stat([p.time_s / max(p.epoch, 1e-9) for p in finals])
        s_per_epoch = pace_of(runs)
        if finals[0].test_acc is not None:
            acc = stat([p.test_acc for p in finals])
        rows.append(dict(
            task=task, optimizer=LABELS[optimizer], lr=runs[0].lr, seeds=[r.seed for r in runs],
            epochs=round(stat([p.epoch for p in finals])["mean"], 2),
            train_s=round(stat([p.time_s for p in finals])["mean"], 2),
            s_per_epoch=round(s_per_epoch, 3), s_per_epoch_range=(pace["min"], pace["max"]),
            # (the runs of a seed ran in turns: the ratio compares epochs taken close together)
            epoch_vs_adamw=s_per_epoch / pace_of(adamw) if adamw else None,
            train_loss=loss["mean"], train_loss_range=(loss["min"], loss["max"]),
            test_loss=stat([p.test_loss for p in finals])["mean"],
            test_acc=None if acc is None else acc["mean"],
            test_acc_range=None if acc is None else (acc["min"], acc["max"]),
            diverged=any(r.diverged for r in runs), common_loss=common[task],
            s_to_common_loss=None if None in reach else sum(reach) / len(reach)))
    return rows


def _plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in results))
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 4 * len(tasks)), squeeze=False)
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(OPTIMIZERS)}
    for row, task in zip(axes, tasks):
        for r in (r for r in results if r.task == task):
            first = r is next(q for q in results if (q.task, q.optimizer) == (task, r.optimizer))
            kw = dict(color=colors[r.optimizer], marker="o", ms=3,
                      label=f"{LABELS[r.optimizer]} (lr {r.lr:.3g})" if first else None)
            row[0].plot([p.time_s for p in r.points], [p.train_loss for p in r.points], **kw)
            row[1].plot([p.epoch for p in r.points], [p.train_loss for p in r.points], **kw)
            if r.points[0].test_acc is not None:
                row[2].plot([p.epoch for p in r.points], [100 * p.test_acc for p in r.points], **kw)
                row[2].set_ylabel("test accuracy %")
            else:
                row[2].plot([p.epoch for p in r.points], [p.test_loss for p in r.points], **kw)
                row[2].set_ylabel("test loss")
        row[0].set(xlabel="training time s", ylabel="training loss", yscale="log",
                   title=f"{task}: loss vs time")
        row[1].set(xlabel="epoch", ylabel="training loss", yscale="log",
                   title=f"{task}: loss vs epoch")
        row[2].set(xlabel="epoch", title=f"{task}: test")
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = format_row(r)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_row(r: dict) -> list[str]:
    """A summary row as the table cells (:data:`COLUMNS`) both the terminal and summary.md show:
    over several seeds, the mean and [min, max] (of the runs' own seconds per epoch, for
    s/epoch)."""
    several = len(r["seeds"]) > 1
    acc = f"{100 * r['test_acc']:.1f}%" if r["test_acc"] is not None else "-"
    if several and r["test_acc"] is not None:
        acc += " [{:.1f}, {:.1f}]".format(*(100 * a for a in r["test_acc_range"]))
    reach = (f"{r['s_to_common_loss']:.1f} (<= {r['common_loss']:.3g})"
             if r["s_to_common_loss"] is not None else "never")
    loss = f"{r['train_loss']:.3g}"
    if several:
        loss += " [{:.3g}, {:.3g}]".format(*r["train_loss_range"])
    loss += " diverged" if r["diverged"] else ""
    pace = f"{r['s_per_epoch']:.3g}"
    if several:
        pace += " [{:.3g}, {:.3g}]".format(*r["s_per_epoch_range"])
    vs_adamw = "-" if r["epoch_vs_adamw"] is None else f"{r['epoch_vs_adamw']:.2f}x"
    return [r["task"], r["optimizer"], f"{r['lr']:.3g}", f"{r['epochs']:g}", f"{r['train_s']:.1f}",
            pace, vs_adamw, loss, reach, f"{r['test_loss']:.3g}", acc]


def write_outputs(out: Path, results: list[RunResult], trials: list[dict], cfg: TrainConfig,
                  env: dict) -> dict[str, Path]:
    """curves.csv (one row per run and epoch), results.json (config, environment, summary,
    curves, tuning trials), summary.md and loss.png (without matplotlib, no plot: a warning);
    returns the paths written by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / n for k, n in (("csv", "curves.csv"), ("json", "results.json"),
                                     ("md", "summary.md"), ("png", "loss.png"))}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "optimizer", "lr", "epoch", "time_s", "train_loss", "test_loss",
                    "test_acc", "epoch_lr"])
        for r in results:
            for p in r.points:
                w.writerow([r.task, r.optimizer, r.lr, p.epoch, p.time_s, p.train_loss,
                            p.test_loss, "" if p.test_acc is None else p.test_acc, p.lr])
    rows = summary_rows(results)
    doc = {"config": asdict(cfg), "environment": env, "summary": rows, "tuning": trials,
           "runs": [dict(task=r.task, optimizer=r.optimizer, lr=r.lr, seed=r.seed,
                         diverged=r.diverged,
                         mbf_stats=r.stats, points=[asdict(p) for p in r.points])
                    for r in results]}
    paths["json"].write_text(json.dumps(doc, indent=1, default=str))
    paths["md"].write_text(markdown_table(rows))
    if can_plot():
        _plot(results, paths["png"])
    else:
        warnings.warn(NO_PLOT, stacklevel=2)
        del paths["png"]
    return paths

