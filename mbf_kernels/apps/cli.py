"""The ``mbf`` command line.

  mbf info      the backends available here, and why any is not
  mbf train     MBF against SGD / AdamW / SOAP on one data set: table, curves (CSV/JSON), plot
  mbf bench     block-solve throughput of every backend against torch.linalg: table, CSV, plot
  mbf profile   one optimizer step under torch.profiler, per MBF backend and baseline
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn)
from rich.table import Table

from .. import __version__, _extension, backends
from ..optim.blocks import LARGE_LINEAR
from ..optim.options import DEFAULTS, FACTOR_DTYPE, GRAFT_NORMS, PAPER_DAMPING, SHARED_BETA
from ..optim.precision import MATMUL
from . import benchmark, profiling, report, training
from .benchmark import environment
from .data import DATASETS, load_dataset
from .training import DEFAULT_LR, MODEL_CHOICES, OPTIMIZERS, TUNE_FACTORS


def _info(args: argparse.Namespace, console: Console) -> int:
    console.print(
        f"mbf-kernels {__version__}  torch {torch.__version__}  "
        f"python {platform.python_version()}  {platform.machine()}"
    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    console.print(f"GPU: {gpu}   CPU threads used by torch: {torch.get_num_threads()}")
    table = Table(title="backends")
    table.add_column("backend")
    table.add_column("available")
    table.add_column("detail")
    for status in backends().values():
        table.add_row(status.name, "yes" if status.available else "no", escape(status.detail))
    console.print(table)
    build = _extension.build_info()
    if build:
        console.print("extension build: " + ", ".join(f"{k}={v}" for k, v in build.items()))
    return 0


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"mbf: --device {name}: no CUDA device is visible "
                         f"(torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"mbf: --device must be cpu, cuda[:i] or auto, got {name}")
    return device


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _train(args: argparse.Namespace, console: Console) -> int:
    usable = training.available_optimizers()
    if args.optimizers is None:
        optimizers = [o for o, why in usable.items() if not why]
        for o, why in usable.items():
            if why:
                console.print(f"[yellow]skipping {o}: {escape(why)}[/yellow]")
    else:
        optimizers = _csv_list(args.optimizers)
        for o in optimizers:
            if o not in usable:
                raise SystemExit(f"mbf train: unknown optimizer {o!r}; choose from "
                                 f"{', '.join(usable)}")
            if usable[o]:
                raise SystemExit(f"mbf train: optimizer {o!r} is unavailable: {usable[o]}")
    device = _device(args.device)
    try:
        data = load_dataset(args.dataset, args.data_dir)
        model_names = (_csv_list(args.models) if args.models else
                       {"digits": ["relu_autoencoder"], "shapes": ["small_cnn"]}.get(
                           args.dataset, ["resnet32"]))
        tasks = [training.make_task(data, m) for m in model_names]
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"mbf train: {exc}") from None
    lrs = {name: getattr(args, f"lr_{name}") for name in training.OPTIMIZERS
           if getattr(args, f"lr_{name}") is not None}
    cfg = training.TrainConfig(
        epochs=args.epochs, budget_s=args.budget_seconds, batch_size=args.batch_size,
        seed=args.seed, seeds=tuple(int(x) for x in _csv_list(args.seeds or "")),
        device=str(device), compile=args.compile,
        amp=None if args.amp == "none" else args.amp, weight_decay=args.weight_decay, lr=lrs,
        momentum=args.momentum, damping=args.damping, beta=args.beta,
        shared_beta=args.shared_beta, paper_damping=args.paper_damping,
        curvature_update_freq=args.curvature_update_freq,
        inverse_update_freq=args.inverse_update_freq, mbf_backend=args.mbf_backend,
        factor_dtype=args.factor_dtype, graft_norms=args.graft_norms,
        shared_matmul=args.shared_matmul,
        lr_milestones=tuple(int(m) for m in _csv_list(args.lr_milestones or "")),
        lr_gamma=args.lr_gamma, tune=args.tune, tune_epochs=args.tune_epochs)
    console.print(f"mbf train: {data.name} ({len(data.y_train)} train / {len(data.y_test)} test "
                  f"images), models {', '.join(model_names)}, optimizers {', '.join(optimizers)}; "
                  f"{cfg.epochs} epochs" + (f" or {cfg.budget_s:g} s" if cfg.budget_s else "") +
                  f" per run, batch {cfg.batch_size}, seed {', '.join(map(str, cfg.seeds or (cfg.seed,)))},"
                  f" device {device}"
                  + (", lr tuned by a sweep of "
                     f"{len(training.TUNE_FACTORS)} x {cfg.tune_epochs} epochs each" if cfg.tune else ""))
    with _progress(console) as progress:
        results, trials = training.compare(tasks, optimizers, cfg, progress)
    paths = report.write_outputs(args.out, results, trials, cfg, environment(device))
    rows = report.summary_rows(results)
    table = Table(title="mbf train: final epoch of each run (same data order, seed, budget)")
    for col in report.COLUMNS:
        table.add_column(col, justify="left" if col in ("task", "optimizer") else "right")
    for r in rows:
        table.add_row(*report.format_row(r))
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _bench(args: argparse.Namespace, console: Console) -> int:
    device = _device(args.device)
    ops = _csv_list(args.ops)
    for op in ops:
        if op not in benchmark.OPS:
            raise SystemExit(f"mbf bench: unknown op {op!r}; choose from {', '.join(benchmark.OPS)}")
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if args.quick:
        dims, sizes, dtype_names, budget = (9, 25), (2**10, 2**14), ["float32"], 0.2
    else:
        dims, sizes, dtype_names, budget = (4, 9, 16, 25, 32), (2**10, 2**14, 2**18), \
            ["float32", "float64"], args.budget
    dims = tuple(args.dims or dims)
    sizes = tuple(args.sizes or sizes)
    dtype_names = _csv_list(args.dtypes) if args.dtypes else dtype_names
    for name in dtype_names:
        if name not in dtypes:
            raise SystemExit(f"mbf bench: --dtypes takes float32 and/or float64, got {name!r}")
    ours = benchmark.kernel_backends(device)
    measured = benchmark.memory_roof(device, 64 * 2**20 if args.quick else 512 * 2**20)
    roof = measured.best
    env = benchmark.environment(device)
    env.update(copy_bandwidth_gb_s=measured.copy / 1e9, adamw_bandwidth_gb_s=measured.adamw / 1e9,
               roof_gb_s=roof / 1e9)
    where = env.get("gpu", f"{env['cpu']}, {env['threads']} threads")
    console.print(f"mbf bench on {device} ({where}); {measured.describe()}; our backends "
                  f"here: {', '.join(ours)}")
    points = [(op, dt, d, n) for op in ops for dt in dtype_names for d in dims for n in sizes
              if n * d * d * dtypes[dt].itemsize <= args.max_gib * 2**30]
    rows: list[benchmark.Row] = []
    with _progress(console) as progress:
        bar = progress.add_task("block ops", total=len(points), status="")
        for op, dt, d, n in points:
            progress.update(bar, status=f"{op} {dt} d={d} N={n}")
            rows += benchmark.bench_linalg(op, d, n, dtypes[dt], device, roof, budget, ours)
            progress.advance(bar)
    table = Table(title=f"block ops on {device}: median of repeats; ratio vs the first torch "
                  f"baseline of each op; {measured.describe()}")
    for col in ("op", "impl", "dtype", "d", "N", "median ms", "min-max ms", "Mblocks/s",
                "GB/s", "roof %", "vs torch"):
        table.add_column(col, justify="left" if col in ("op", "impl", "dtype") else "right")
    for r in rows:
        table.add_row(r.op, escape(r.impl), r.dtype, str(r.d), str(r.n), f"{r.median_ms:.3f}",
                      f"{r.min_ms:.3f}-{r.max_ms:.3f}", f"{r.blocks_per_s / 1e6:.2f}",
                      f"{r.gbytes_per_s:.2f}", f"{100 * r.roof_fraction:.1f}",
                      f"{r.speedup_vs_torch:.2f}x")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])) if rows else ["op"])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    (args.out / "bench.json").write_text(json.dumps(
        {"environment": env, "device": str(device), "rows": [asdict(r) for r in rows]}, indent=1))
    written = ["bench.csv", "bench.json"]
    if rows and benchmark.can_plot():
        benchmark.plot_linalg(rows, args.out / "bench.png")
        written.append("bench.png")
    elif rows:
        console.print(escape(benchmark.NO_PLOT))
    console.print(f"wrote {args.out}/" + ", ".join(written))
    return 0


def _profile(args: argparse.Namespace, console: Console) -> int:
    device = _device(args.device)
    options = dict(curvature_update_freq=args.curvature_update_freq,
                   inverse_update_freq=args.inverse_update_freq, large_linear=args.large_linear)
    console.print(f"mbf profile: {args.model}, batch {args.batch_size}, device {device}; "
                  f"{args.steps} timed + {args.steps} profiled steps per optimizer after one "
                  f"warm-up step (T1 = {args.curvature_update_freq}, "
                  f"T2 = {args.inverse_update_freq})")
    try:
        with console.status("profiling") as status:
            results = profiling.profile_step(
                args.model, device, args.out, batch_size=args.batch_size, steps=args.steps,
                top=args.top, mbf_options=options,
                only=_csv_list(args.optimizers) if args.optimizers else None,
                on_variant=lambda name: status.update(f"profiling {name}"))
    except ValueError as exc:
        raise SystemExit(f"mbf profile: {exc}") from None
    meta = dict(model=args.model, batch_size=args.batch_size, steps=args.steps, device=str(device),
                options=options, environment=environment(device))
    paths = profiling.write_outputs(args.out, results, meta)
    table = Table(title=f"one optimizer step, {args.model} on {device} "
                  f"(mean over {args.steps} steps; x AdamW in the same run)")
    for col in ("optimizer", "mean ms", "median (min-max) ms", "x AdamW", "top ops (self time share)"):
        table.add_column(col, justify="left" if col in ("optimizer", "top ops (self time share)")
                         else "right")
    for r in results:
        top = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in r.top_ops[:3])
        table.add_row(escape(r.variant), f"{r.mean_ms:.2f}",
                      f"{r.median_ms:.2f} ({r.min_ms:.2f}-{r.max_ms:.2f})",
                      f"{r.ratio_vs_adamw:.2f}", escape(top))
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()) +
                  " and a Chrome trace per optimizer (trace_*.json, chrome://tracing or Perfetto)")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _decay(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_mbf_schedule(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curvature-update-freq", type=_positive_int,
                   default=DEFAULTS["curvature_update_freq"], help="MBF's T1")
    p.add_argument("--inverse-update-freq", type=_positive_int,
                   default=DEFAULTS["inverse_update_freq"], help="MBF's T2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mbf-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="report the backends available here and why any is not")

    _add_train(sub)
    _add_bench(sub)
    _add_profile(sub)
    return parser


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train with MBF and baselines; table, curves, plot",
                           description="Train one model with MBF and with baseline optimizers "
                           "on the same data, seed and budget (see mbf_kernels/apps/training.py). "
                           "A seed's runs advance an epoch each in turn, so that their epoch "
                           "times meet the same machine speed; every optimizer's model and state "
                           "are then held at once (--optimizers picks fewer).")
    train.add_argument("--dataset", choices=tuple(DATASETS), default="digits",
                       help="digits ships with the package and shapes is generated; the "
                       "others are read from --data-dir")
    train.add_argument("--data-dir", type=Path, help="folder with the CIFAR/SVHN files "
                       "(cifar-10-batches-py/, cifar-100-python/, or svhn/*_32x32.mat)")
    train.add_argument("--models", help=f"comma-separated, from {', '.join(MODEL_CHOICES)} "
                       "(default: small_cnn,autoencoder on digits, resnet32 otherwise)")
    train.add_argument("--optimizers", help=f"comma-separated, from {', '.join(OPTIMIZERS)} "
                       "(default: every one installed)")
    train.add_argument("--epochs", type=_positive_int, default=10, help="epochs per run")
    train.add_argument("--budget-seconds", type=_positive_float,
                       help="also stop each run after this much training time")
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    train.add_argument("--seeds", help="comma-separated seeds: every run is repeated for each, "
                       "and the tables show the mean and [min, max] (e.g. 0,1)")
    train.add_argument("--device", default="auto", help="cpu, cuda[:i] or auto")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--amp", choices=("none", "bf16"), default="none",
                       help="autocast the forward pass to bfloat16")
    train.add_argument("--weight-decay", type=_nonnegative_float, default=0.0,
                       help="every optimizer's own weight decay (L2 for SGD and MBF, decoupled "
                       "for AdamW and SOAP)")
    for name in OPTIMIZERS:
        train.add_argument(f"--lr-{name}", type=_positive_float,
                           help=f"{name}'s learning rate (default {DEFAULT_LR[name]:g})")
    train.add_argument("--momentum", type=float, default=0.9,
                       help="SGD's and mbf_paper's momentum (mbf's is Adam's beta1, 0.9)")
    train.add_argument("--damping", type=_nonnegative_float, default=DEFAULTS["damping"],
                       help="mbf's and mbf_true's damping: a fraction of each unit's mean "
                       "curvature eigenvalue (docs/options.md)")
    train.add_argument("--beta", type=_decay, default=DEFAULTS["beta"],
                       help="mbf's and mbf_true's curvature EMA decay (docs/options.md)")
    train.add_argument("--shared-beta", type=_decay, default=DEFAULTS["shared_beta"],
                       help="the same for their shared blocks (default: "
                       f"{SHARED_BETA:g} with grafting; docs/options.md)")
    train.add_argument("--paper-damping", type=_nonnegative_float, default=PAPER_DAMPING,
                       help="mbf_paper's (absolute) damping")
    _add_mbf_schedule(train)
    train.add_argument("--mbf-backend", default="auto", help="MBF's kernel backend")
    train.add_argument("--factor-dtype", default=DEFAULTS["factor_dtype"], choices=FACTOR_DTYPE,
                       help="mbf's and mbf_true's factor storage (docs/options.md)")
    train.add_argument("--shared-matmul", default=DEFAULTS["shared_matmul"], choices=MATMUL,
                       help="mbf's and mbf_true's shared blocks' GEMMs (auto: bfloat16 on a "
                       "CPU with AVX512_BF16 or AMX, tf32 on CUDA; docs/options.md)")
    train.add_argument("--graft-norms", default=DEFAULTS["graft_norms"], choices=GRAFT_NORMS,
                       help="mbf's and mbf_true's graft ratios: this step's (two passes over "
                       "the blocks) or the previous step's (one pass; docs/options.md)")
    train.add_argument("--lr-milestones", help="step decay: comma-separated epochs after which "
                       "every learning rate is multiplied by --lr-gamma (e.g. 30,60)")
    train.add_argument("--lr-gamma", type=_positive_float, default=0.1)
    train.add_argument("--tune", action="store_true",
                       help=f"pick each optimizer's lr from default x "
                       f"{{{', '.join(f'{f:.3g}' for f in TUNE_FACTORS)}}} by training loss")
    train.add_argument("--tune-epochs", type=_positive_int, default=2,
                       help="epochs per tuning trial")
    train.add_argument("--out", type=Path, default=Path("out/train"), help="output folder")


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="block-solve throughput of every backend vs torch.linalg")
    bench.add_argument("--device", default="auto", help="cpu, cuda[:i] or auto")
    bench.add_argument("--ops", default="solve_spd,cholesky_ex,inv_spd",
                       help="comma-separated block ops")
    bench.add_argument("--dims", type=_positive_int, nargs="+", help="block sizes d")
    bench.add_argument("--sizes", type=_positive_int, nargs="+", help="block counts N")
    bench.add_argument("--dtypes", help="comma-separated: float32,float64")
    bench.add_argument("--budget", type=_positive_float, default=0.5,
                       help="seconds of timing per point and implementation")
    bench.add_argument("--max-gib", type=_positive_float, default=2.0,
                       help="skip points whose matrices exceed this many GiB")
    bench.add_argument("--quick", action="store_true", help="a small grid, under a minute")
    bench.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder")


def _add_profile(sub) -> None:
    prof = sub.add_parser("profile", help="one optimizer step under torch.profiler")
    prof.add_argument("--model", default="resnet32", help="resnet32, vgg11, vgg16 or small_cnn")
    prof.add_argument("--device", default="auto", help="cpu, cuda[:i] or auto")
    prof.add_argument("--batch-size", type=_positive_int, default=32)
    prof.add_argument("--steps", type=_positive_int, default=10,
                      help="steps timed, then as many profiled, per optimizer")
    prof.add_argument("--top", type=_positive_int, default=8, help="operators listed per optimizer")
    prof.add_argument("--optimizers", help="comma-separated name prefixes to run "
                      "(e.g. 'adamw,mbf [cpu]'); default all")
    prof.add_argument("--large-linear", choices=LARGE_LINEAR, default="auto",
                      help="what large linear layers get (docs/options.md)")
    _add_mbf_schedule(prof)
    prof.add_argument("--out", type=Path, default=Path("out/profile"), help="output folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Rich wraps at 80 columns when writing to a pipe or file; tables read better unwrapped.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    handler = {"info": _info, "train": _train, "bench": _bench, "profile": _profile}[args.command]
    return handler(args, console)


if __name__ == "__main__":
    sys.exit(main())
