"""Kernel benchmark: batched SPD solves of every backend against torch.linalg, and the fused
MBF step of every backend against the device's memory roof, measured in one run.

    python bench/bench_kernels.py                       # CPU, full grid (several minutes)
    python bench/bench_kernels.py --quick               # CPU, a few points (under a minute)
    python bench/bench_kernels.py --device cuda --quick # GPU: Triton and CUDA kernels, d = 9 and
                                                        # 16, and the issue-4 bar at N = 1.6M

Every number is the median of repeated timed calls after a warm-up (which includes any JIT
compilation and tuning), with the spread (min and max) beside it; GPU calls are synchronised,
so the time is the kernels', not the launch's. Ratios are against torch.linalg measured in the
same run; the roof is the bytes an operation must move divided by the best bandwidth measured
in the same run with all threads (mbf_kernels.apps.benchmark.memory_roof: a large tensor copy,
read + write, or the bytes AdamW(fused=True) moves per second, whichever is higher). Writes
<out>/<device>_kernels.csv, .json (device and versions), .md and .png.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict
from pathlib import Path

import torch

from mbf_kernels import _extension as mk_extension
from mbf_kernels import compact, dispatch
from mbf_kernels.apps.benchmark import (OPS, Row, bench_linalg, environment, memory_roof,
                                   kernel_backends, make_row, timed)
from mbf_kernels.packed import tril_size

DIMS = (4, 9, 10, 16, 25, 32)
SIZES = tuple(2**e for e in range(10, 22))
QUICK_DIMS = {"cpu": (9, 25), "cuda": (9, 16)}
QUICK_SIZES = {"cpu": (2**10, 2**14, 2**18), "cuda": (2**10, 2**14, 2**18, 1_600_000)}
#: Issue 4's bar, on a GPU, float32, d = 9, N = 1.6M (VGG16's mini-blocks): the fused step at
#: >= 60% of the copy bandwidth, solve_spd >= 50x torch's Cholesky + cholesky_solve.
BAR_D, BAR_N, BAR_ROOF, BAR_SPEEDUP = 9, 1_600_000, 0.60, 50.0

BASELINE = next(iter(OPS["solve_spd"].baselines))  # torch's Cholesky + cholesky_solve


def step_backends(device: torch.device) -> list[str]:
    """Backends with a fused step for ``device`` (the torch reference steps through the
    canonical layout: its cost is in `mbf profile`, not here)."""
    return [b for b in kernel_backends(device) if b != "torch"]


def bench_solve(d, n, dtype, device, roof_bw, budget_s) -> list[Row]:
    """solve_spd on every kernel backend that takes d against torch's Cholesky + solve."""
    backends = [b for b in step_backends(device) if dispatch.covers(b, d)]
    return bench_linalg("solve_spd", d, n, dtype, device, roof_bw, budget_s, backends,
                        all_baselines=False)


def bench_step(d, n, dtype, device, roof_bw, budget_s, backend) -> list[Row]:
    """The fused optimizer step of ``backend`` on one bucket, in its three variants."""
    t = tril_size(d)
    p = torch.randn(n, d, dtype=dtype, device=device)
    g = torch.randn(n, d, dtype=dtype, device=device) * 1e-2
    m = torch.zeros(n, d, dtype=dtype, device=device)
    F = torch.zeros(compact.compact_shape(n, d), dtype=dtype, device=device)
    L = compact.to_compact(compact.identity_factor(d, dtype, device).expand(n, t))
    stats = torch.zeros(2, dtype=torch.int64, device=device)
    step = dispatch.module(backend).mbf_step_
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
    step(p, g, m, F, L, stats, **hyper, update_curvature=True, first_curvature=True,
         refactor=True)
    for name, (flags, nbytes) in variants.items():
        times = timed(lambda: step(p, g, m, F, L, stats, **hyper, **flags), min_repeats=5,
                      budget_s=budget_s, device=device)
        rows.append(make_row(name, f"mbf_kernels[{backend}]", dtype, d, n, times, nbytes,
                             roof_bw))
    return rows


def _levels(backend: str, every: bool) -> list[str | None]:
    """The C++ kernels' ISA levels to time (None: the active one, for every other backend)."""
    if backend != "cpu" or not every:
        return [None]
    return list(mk_extension.build_info().get("cpu_levels_supported", [])) or [None]


def _size(n: int) -> str:
    if n > 0 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return f"{n / 1e6:g}M" if n >= 100_000 else str(n)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solve = [r for r in rows if r.op == "solve_spd"]
    impls = sorted({r.impl for r in solve if r.impl != BASELINE})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10")
    styles = ["-", "-.", ":"]
    for c, d in enumerate(sorted({r.d for r in solve})):
        # One colour per block size; dashed = torch.linalg, one line style per backend.
        for impl, style in ((BASELINE, "--"), *zip(impls, styles)):
            pts = sorted((r.n, r.blocks_per_s) for r in solve if r.d == d and r.impl == impl)
            if pts:
                ax1.plot(*zip(*pts), style, color=colors(c), marker="o", ms=3,
                         label=f"{impl} d={d}")
        for impl, style in zip(impls, styles):
            pts = sorted((r.n, r.speedup_vs_torch) for r in solve
                         if r.d == d and r.impl == impl and r.speedup_vs_torch)
            if pts:
                ax2.plot(*zip(*pts), style, color=colors(c), marker="o", ms=3,
                         label=f"{impl} d={d}")
    ax1.set(xscale="log", yscale="log", xlabel="blocks N", ylabel="blocks / s (median)",
            title="solve_spd throughput, float32 (dashed: torch.linalg)")
    ax2.set(xscale="log", xlabel="blocks N", ylabel="speed-up vs torch.linalg (same run)",
            title="solve_spd speed-up")
    ax1.legend(fontsize=6, ncol=2)
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown_summary(rows: list[Row], env: dict) -> str:
    """Markdown tables: solve_spd speed-ups over (d, N) per backend, the fused step's roof
    share, and (on a GPU) issue 4's bar."""
    solve = {(r.d, r.n, r.impl): r for r in rows if r.op == "solve_spd"}
    dims = sorted({d for d, _, _ in solve})
    sizes = sorted({n for _, n, _ in solve})
    impls = sorted({i for _, _, i in solve if i != BASELINE})
    device = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    lines = [
        f"Device: {device}; torch {env['torch']}"
        + (f"; triton {env['triton']}" if "triton" in env else "")
        + f"; mbf_kernels {env['mbf_kernels']} (commit {env['commit']}); roof "
        f"{env['roof_gb_s']:.1f} GB/s: the best of a copy ({env['copy_bandwidth_gb_s']:.1f}, "
        f"read + write) and AdamW(fused=True) ({env['adamw_bandwidth_gb_s']:.1f}), all threads.",
        "",
        "`solve_spd`, float32: speed-up of `mk.linalg.solve_spd(A, b, damping)` over "
        "`torch.cholesky_solve(b, torch.linalg.cholesky(A + damping I))` in the same run "
        "(median of repeats each; ours in ms in brackets).",
        "",
        "| backend | d \\ N | " + " | ".join(_size(n) for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for impl in impls:
        for d in dims:
            cells = []
            for n in sizes:
                ours = solve.get((d, n, impl))
                cells.append(f"{ours.speedup_vs_torch:.1f}x ({ours.median_ms:.2f})"
                             if ours else "-")
            lines.append(f"| {impl} | {d} | " + " | ".join(cells) + " |")
    steps = [r for r in rows if r.op.startswith("step")]
    if steps:
        lines += ["", "Fused MBF step (compact layout), float32, one bucket: median ms "
                  "(min-max) and the share of the roof for the bytes it must move "
                  "(MBF_SPEC section 6).", "",
                  "| backend | d | N | variant | median ms | min-max ms | roof |",
                  "|---|---|---|---|---|---|---|"]
        for r in steps:
            lines.append(f"| {r.impl} | {r.d} | {_size(r.n)} | {r.op} | {r.median_ms:.3f} | "
                         f"{r.min_ms:.3f}-{r.max_ms:.3f} | {100 * r.roof_fraction:.0f}% |")
    if "gpu" in env:
        lines += ["", f"Issue 4's bar (float32, d = {BAR_D}, N = {BAR_N:,}): fused step >= "
                  f"{BAR_ROOF:.0%} of the roof, solve_spd >= {BAR_SPEEDUP:.0f}x torch.", ""]
        for r in rows:
            if (r.d, r.n) != (BAR_D, BAR_N) or r.impl == BASELINE:
                continue
            if r.op == "step (cached factor)":
                met = r.roof_fraction >= BAR_ROOF
                lines.append(f"- {r.impl} step: {100 * r.roof_fraction:.0f}% of the roof: "
                             f"{'met' if met else 'NOT met'}")
            elif r.op == "solve_spd" and r.speedup_vs_torch:
                met = r.speedup_vs_torch >= BAR_SPEEDUP
                lines.append(f"- {r.impl} solve_spd: {r.speedup_vs_torch:.1f}x: "
                             f"{'met' if met else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a few points, under a minute")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per point")
    parser.add_argument("--max-gib", type=float, default=2.0,
                        help="skip points whose matrices A exceed this many GiB")
    parser.add_argument("--dims", type=int, nargs="+", help="block sizes d (overrides the grid)")
    parser.add_argument("--sizes", type=int, nargs="+", help="block counts N (overrides the grid)")
    parser.add_argument("--step-n", type=int, help="blocks per bucket for the fused step")
    parser.add_argument("--cpu-levels", action="store_true",
                        help="time the C++ fused step at every ISA level this CPU runs (forced "
                        "lower levels included), not only the one chosen at import")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")

    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    console = Console(width=160)
    device = torch.device(args.device)
    quick_dims, quick_sizes = QUICK_DIMS[device.type], QUICK_SIZES[device.type]
    dims, sizes = (quick_dims, quick_sizes) if args.quick else (DIMS, SIZES)
    dims, sizes = tuple(args.dims or dims), tuple(args.sizes or sizes)
    measured = memory_roof(device)
    roof_bw = measured.best
    env = environment(device)
    console.print(f"{env.get('gpu', env['cpu'])}: torch {env['torch']}; "
                  f"{measured.describe()}; backends {step_backends(device)}")
    points = [(d, n) for d in dims for n in sizes if n * d * d * 4 <= args.max_gib * 2**30]
    skipped = [(d, n) for d in dims for n in sizes if (d, n) not in points]
    rows: list[Row] = []
    for d, n in track(points, description="solve_spd", console=console):
        rows += bench_solve(d, n, torch.float32, device, roof_bw, args.budget)
    default_step_n = BAR_N if device.type == "cuda" else 2**18 if args.quick else 2**20
    step_n = args.step_n or default_step_n
    import_level = mk_extension.cpu_capability()
    step_points = [(d, b) for d in dims for b in step_backends(device)
                   if dispatch.covers(b, d, step=True)]
    for d, backend in track(step_points, description="fused step", console=console):
        for level in _levels(backend, args.cpu_levels):
            if level:
                mk_extension.set_cpu_capability(level)
            step_rows = bench_step(d, step_n, torch.float32, device, roof_bw, args.budget,
                                   backend)
            for r in step_rows:
                r.impl += f":{level}" if level else ""
            rows += step_rows
        if import_level:
            mk_extension.set_cpu_capability(import_level)

    table = Table(title=f"{device.type} kernels, float32 (median of repeats; "
                        f"{measured.describe()})")
    for col in ("op", "impl", "d", "N", "median ms", "min-max ms", "Mblocks/s", "GB/s",
                "roof %", "vs torch"):
        table.add_column(col, justify="right" if col not in ("op", "impl") else "left")
    for r in rows:
        table.add_row(r.op, r.impl.replace("[", "\\["), str(r.d), _size(r.n),
                      f"{r.median_ms:.3f}", f"{r.min_ms:.3f}-{r.max_ms:.3f}",
                      f"{r.blocks_per_s / 1e6:.2f}", f"{r.gbytes_per_s:.1f}",
                      f"{100 * r.roof_fraction:.0f}",
                      f"{r.speedup_vs_torch:.1f}x" if r.speedup_vs_torch else "")
    console.print(table)
    if skipped:
        console.print(f"skipped (A over {args.max_gib} GiB): " +
                      ", ".join(f"d={d} N={_size(n)}" for d, n in skipped))

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{device.type}_kernels"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    env.update(copy_bandwidth_gb_s=measured.copy / 1e9,
               adamw_bandwidth_gb_s=measured.adamw / 1e9, roof_gb_s=roof_bw / 1e9)
    Path(f"{stem}.json").write_text(json.dumps(env, indent=2))
    plot(rows, Path(f"{stem}.png"))
    summary = markdown_summary(rows, env)
    Path(f"{stem}.md").write_text(summary)
    console.print(summary, markup=False)
    console.print(f"wrote {stem}.csv, .json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
