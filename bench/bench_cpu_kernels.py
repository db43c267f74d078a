"""CPU kernel benchmark: batched SPD solves against torch.linalg, and the fused MBF step
against the machine's memory roof, measured in one run.

    python bench/bench_cpu_kernels.py            # full grid (several minutes)
    python bench/bench_cpu_kernels.py --quick    # a few points (under a minute)

Every number is the median of repeated timed calls after a warm-up, with the spread (min and
max) beside it. Ratios are against torch.linalg measured in the same run; the roof is the bytes
an operation must move divided by the copy bandwidth measured in the same run (a large
tensor copy, read + write). Writes <out>/cpu_kernels.csv, <out>/cpu_kernels.json (device and
versions) and <out>/cpu_kernels.png.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict
from pathlib import Path

import torch

import mbf_kernels as mk
from mbf_kernels import compact
from mbf_kernels.benchmark import (OPS, Row, bench_linalg, copy_bandwidth, environment,
                                   make_row, timed)
from mbf_kernels.packed import tril_size

DIMS = (4, 9, 10, 16, 25, 32)
SIZES = tuple(2**e for e in range(10, 22))
QUICK_DIMS = (9, 25)
QUICK_SIZES = (2**10, 2**14, 2**18)


BASELINE = next(iter(OPS["solve_spd"].baselines))  # torch's Cholesky + cholesky_solve


def bench_solve(d, n, dtype, roof_bw, budget_s) -> list[Row]:
    """solve_spd on the C++ kernels against torch's Cholesky + cholesky_solve."""
    return bench_linalg("solve_spd", d, n, dtype, torch.device("cpu"), roof_bw, budget_s, ["cpu"],
                        all_baselines=False)


def bench_step(d, n, dtype, roof_bw, budget_s) -> list[Row]:
    """The fused optimizer step on one bucket, in its three variants."""
    t = tril_size(d)
    p = torch.randn(n, d, dtype=dtype)
    g = torch.randn(n, d, dtype=dtype) * 1e-2
    m = torch.zeros(n, d, dtype=dtype)
    F = torch.zeros(compact.compact_shape(n, d), dtype=dtype)
    L = compact.to_compact(compact.identity_factor(d, dtype).expand(n, t))
    stats = torch.zeros(2, dtype=torch.int64)
    hyper = dict(lr=1e-3, momentum_coef=0.9, beta=0.9, damping=1e-2, weight_decay=1e-4,
                 decoupled_weight_decay=False)
    size = p.element_size()
    # MBF_SPEC section 6: read g, m, p and the factor, write m and p; a curvature refresh adds
    # a read and a write of F; a refactor adds a read of F and a write of the factor.
    base = n * (5 * d + t) * size
    variants = {
        "step (cached factor)": (dict(update_curvature=False, first_curvature=False, refactor=False), base),
        "step + curvature": (dict(update_curvature=True, first_curvature=False, refactor=False), base + 2 * n * t * size),
        "step + curvature + refactor": (dict(update_curvature=True, first_curvature=False, refactor=True), base + 3 * n * t * size),
    }
    rows = []
    mk._extension.mbf_step_(p, g, m, F, L, stats, **hyper, update_curvature=True,
                            first_curvature=True, refactor=True)
    for name, (flags, nbytes) in variants.items():
        times = timed(lambda: mk._extension.mbf_step_(p, g, m, F, L, stats, **hyper, **flags),
                      min_repeats=5, budget_s=budget_s)
        rows.append(make_row(name, "mbf_kernels[cpu]", dtype, d, n, times, nbytes, roof_bw))
    return rows


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solve = [r for r in rows if r.op == "solve_spd"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10")
    for c, d in enumerate(sorted({r.d for r in solve})):
        # One colour per block size; solid = mbf_kernels, dashed = torch.linalg.
        for impl, style in ((BASELINE, "--"), ("mbf_kernels[cpu]", "-")):
            pts = sorted((r.n, r.blocks_per_s) for r in solve if r.d == d and r.impl == impl)
            if pts:
                ax1.plot(*zip(*pts), style, color=colors(c), marker="o", ms=3,
                         label=f"{impl} d={d}")
        pts = sorted((r.n, r.speedup_vs_torch) for r in solve if r.d == d and r.speedup_vs_torch)
        if pts:
            ax2.plot(*zip(*pts), color=colors(c), marker="o", ms=3, label=f"d={d}")
    ax1.set(xscale="log", yscale="log", xlabel="blocks N", ylabel="blocks / s (median)",
            title="solve_spd throughput, float32 (solid: mbf_kernels, dashed: torch.linalg)")
    ax2.set(xscale="log", xlabel="blocks N", ylabel="speed-up vs torch.linalg (same run)",
            title="solve_spd speed-up")
    ax1.legend(fontsize=6, ncol=2)
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown_summary(rows: list[Row], env: dict) -> str:
    """Two Markdown tables: solve_spd speed-ups over (d, N), and the fused step's roof share."""
    solve = {(r.d, r.n, r.impl): r for r in rows if r.op == "solve_spd"}
    dims = sorted({d for d, _, _ in solve})
    sizes = sorted({n for _, n, _ in solve})
    lines = [
        f"Device: {env['cpu']}, {env['threads']} threads; torch {env['torch']}; "
        f"mbf_kernels {env['mbf_kernels']} (commit {env['commit']}); copy bandwidth "
        f"{env['copy_bandwidth_gb_s']:.1f} GB/s (read + write).",
        "",
        "`solve_spd`, float32: speed-up of `mk.linalg.solve_spd(A, b, damping)` [cpu] over "
        "`torch.cholesky_solve(b, torch.linalg.cholesky(A + damping I))` in the same run "
        "(median of repeats each; ours in ms in brackets).",
        "",
        "| d \\ N | " + " | ".join(f"2^{n.bit_length() - 1}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for d in dims:
        cells = []
        for n in sizes:
            ours = solve.get((d, n, "mbf_kernels[cpu]"))
            cells.append(f"{ours.speedup_vs_torch:.1f}x ({ours.median_ms:.2f})" if ours else "-")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    steps = [r for r in rows if r.op.startswith("step")]
    if steps:
        lines += ["", "Fused MBF step (compact layout), float32, one bucket: median ms "
                  "(min-max) and the share of the copy roof for the bytes it must move "
                  "(MBF_SPEC section 6).", "",
                  "| d | N | variant | median ms | min-max ms | roof |", "|---|---|---|---|---|---|"]
        for r in steps:
            lines.append(f"| {r.d} | 2^{r.n.bit_length() - 1} | {r.op} | {r.median_ms:.2f} | "
                         f"{r.min_ms:.2f}-{r.max_ms:.2f} | {100 * r.roof_fraction:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few points, under a minute")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per point")
    parser.add_argument("--max-gib", type=float, default=2.0,
                        help="skip points whose matrices A exceed this many GiB")
    parser.add_argument("--dims", type=int, nargs="+", help="block sizes d (overrides the grid)")
    parser.add_argument("--sizes", type=int, nargs="+", help="block counts N (overrides the grid)")
    parser.add_argument("--step-n", type=int, help="blocks per bucket for the fused step")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    console = Console(width=160)
    dims, sizes = (QUICK_DIMS, QUICK_SIZES) if args.quick else (DIMS, SIZES)
    dims, sizes = tuple(args.dims or dims), tuple(args.sizes or sizes)
    roof_bw = copy_bandwidth()
    env = environment()
    console.print(f"CPU: {env['cpu']}, {env['threads']} threads; torch {env['torch']}; "
                  f"copy bandwidth (read+write) {roof_bw / 1e9:.1f} GB/s")
    points = [(d, n) for d in dims for n in sizes if n * d * d * 4 <= args.max_gib * 2**30]
    skipped = [(d, n) for d in dims for n in sizes if (d, n) not in points]
    rows: list[Row] = []
    for d, n in track(points, description="solve_spd", console=console):
        rows += bench_solve(d, n, torch.float32, roof_bw, args.budget)
    step_n = args.step_n or (2**18 if args.quick else 2**20)
    step_points = [(d, step_n) for d in dims]
    for d, n in track(step_points, description="fused step", console=console):
        rows += bench_step(d, n, torch.float32, roof_bw, args.budget)

    table = Table(title=f"CPU kernels, float32 (median of repeats; copy roof {roof_bw / 1e9:.1f} GB/s)")
    for col in ("op", "impl", "d", "N", "median ms", "min-max ms", "Mblocks/s", "GB/s",
                "roof %", "vs torch"):
        table.add_column(col, justify="right" if col not in ("op", "impl") else "left")
    for r in rows:
        table.add_row(r.op, r.impl.replace("[", "\\["), str(r.d), f"2^{r.n.bit_length() - 1}",
                      f"{r.median_ms:.3f}", f"{r.min_ms:.3f}-{r.max_ms:.3f}",
                      f"{r.blocks_per_s / 1e6:.2f}", f"{r.gbytes_per_s:.1f}",
                      f"{100 * r.roof_fraction:.0f}",
                      f"{r.speedup_vs_torch:.1f}x" if r.speedup_vs_torch else "")
    console.print(table)
    if skipped:
        console.print(f"skipped (A over {args.max_gib} GiB): " +
                      ", ".join(f"d={d} N=2^{n.bit_length() - 1}" for d, n in skipped))

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "cpu_kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    env["copy_bandwidth_gb_s"] = roof_bw / 1e9
    (args.out / "cpu_kernels.json").write_text(json.dumps(env, indent=2))
    plot(rows, args.out / "cpu_kernels.png")
    (args.out / "cpu_kernels.md").write_text(markdown_summary(rows, env))
    console.print(f"wrote {args.out}/cpu_kernels.csv, .json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
