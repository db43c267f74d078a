"""Step time when units die: the optimizer state of a unit whose gradient stays zero.

    python bench/bench_dead_units.py                  # 10% of units dead from step 10, 1200 steps
    python bench/bench_dead_units.py --steps 300 --dead 0.2 --out bench/out

A ReLU unit that stops firing gets exactly zero gradient from then on, and its momentum decays
by the momentum coefficient every step. In IEEE arithmetic an EMA whose coefficient exceeds 1/2
never reaches zero: about 900 steps after the unit died the momentum is among the smallest
denormals and stays there (0.9 times one ulp rounds back to one ulp), and on Intel cores every
multiply that reads or writes a denormal takes a microcode assist. This times each optimizer's
step through that: a Linear(4096, 4096) and a Conv2d(512, 512, 3), the given fraction of their
output units dead from step 10 on, fixed random gradients otherwise. MBF's C++ step ops flush
denormals to zero (csrc/cpu/ops.cpp, FlushDenormals); torch's AdamW does not, unless the process
calls ``torch.set_flush_denormal(True)`` (the third row). Medians of windows of 100 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mbf_kernels as mk
from mbf_kernels.apps.benchmark import environment

MODELS = {
    "Linear(4096, 4096)": lambda: torch.nn.Linear(4096, 4096),
    "Conv2d(512, 512, 3)": lambda: torch.nn.Conv2d(512, 512, 3),
}
OPTIMIZERS = {
    "MBF": (lambda params: mk.MBF(params, lr=1e-3), False),
    "AdamW(fused)": (lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True), False),
    "AdamW(fused), set_flush_denormal": (
        lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True), True),
}
WINDOW = 100
DIES_AT = 10  # the step from which the dead units get zero gradient


def flush_denormal_enabled() -> bool:
    """Whether this thread flushes denormals (``torch.set_flush_denormal``, which has no
    getter): with DAZ set, the smallest float64 denormal reads as zero."""
    return torch.tensor([5e-324], dtype=torch.float64).mul(1.0).item() == 0.0


def step_times(model: str, optimizer: str, steps: int, dead: float) -> list[float]:
    """Seconds per step of ``optimizer`` on ``model``, ``dead`` of its output units getting zero
    gradient from step DIES_AT on."""
    torch.manual_seed(0)
    module = MODELS[model]()
    params = list(module.parameters())
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    dead_grads = [g.clone() for g in grads]
    n_dead = int(dead * params[0].shape[0])
    for g in dead_grads:
        g[:n_dead] = 0
    make, flush = OPTIMIZERS[optimizer]
    opt = make(params)
    was_flushing = flush_denormal_enabled()  # restored after the rows, whatever it was
    if flush and not torch.set_flush_denormal(True):
        raise SystemExit("torch.set_flush_denormal is not supported on this CPU")
    times = []
    try:
        for step in range(steps):
            for p, g, g_dead in zip(params, grads, dead_grads):
                p.grad = g if step < DIES_AT else g_dead
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_flush_denormal(was_flushing)
    return times


def windows(times: list[float]) -> list[float]:
    return [statistics.median(times[i:i + WINDOW]) for i in range(0, len(times), WINDOW)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--dead", type=float, default=0.1, help="fraction of output units dead")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, help="folder for dead_units.md and .json")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = []
    for model in args.models:
        for optimizer in OPTIMIZERS:
            w = windows(step_times(model, optimizer, args.steps, args.dead))
            rows.append(dict(model=model, optimizer=optimizer, window_ms=[t * 1e3 for t in w],
                             slowest_vs_first=max(w) / w[0]))
            console.print(f"{model}, {optimizer}: done")
    starts = [f"{i}" for i in range(0, args.steps, WINDOW)]
    table = Table(title=f"ms per step, medians of {WINDOW} steps ({args.dead:.0%} of units dead "
                        f"from step {DIES_AT})")
    for col in ("model", "optimizer", "first", "slowest (from step)", "last", "slowest / first"):
        table.add_column(col, justify="left" if col in ("model", "optimizer") else "right")
    md = [f"| model | optimizer | {' | '.join(starts)} | slowest / first |",
          "|---|---|" + "---|" * (len(starts) + 1)]
    for r in rows:
        w = r["window_ms"]
        slowest = max(range(len(w)), key=w.__getitem__)
        table.add_row(r["model"], r["optimizer"], f"{w[0]:.1f}",
                      f"{w[slowest]:.1f} ({starts[slowest]})", f"{w[-1]:.1f}",
                      f"{r['slowest_vs_first']:.1f}x")
        md.append(f"| {r['model']} | {r['optimizer']} | {' | '.join(f'{t:.1f}' for t in w)} | "
                  f"{r['slowest_vs_first']:.1f}x |")
    console.print(table)
    env = environment()
    console.print(f"CPU: {env['cpu']}, {env['threads']} threads, torch {env['torch']}, "
                  f"commit {env['commit']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dead_units.md").write_text("\n".join(md) + "\n")
        (args.out / "dead_units.json").write_text(json.dumps(
            dict(steps=args.steps, dead=args.dead, window=WINDOW, rows=rows, env=env), indent=1,
            default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
