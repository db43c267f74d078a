"""The ``mbf`` command line: ``mbf info`` (what runs here) and ``mbf demo`` (solve_spd vs torch)."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, _extension, backends, linalg


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


def _random_spd(n: int, d: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A well-conditioned batch of SPD matrices: M M^T / d + I."""
    M = torch.randn(n, d, d, dtype=dtype, generator=generator)
    return M @ M.mT / d + torch.eye(d, dtype=dtype)


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """Median and (max - min) of ``repeats`` timed calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times) - min(times)


def _demo(args: argparse.Namespace, console: Console) -> int:
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    A = _random_spd(args.n, args.d, dtype, gen)
    B = torch.randn(args.n, args.d, dtype=dtype, generator=gen)
    damping = 1e-3

    def torch_baseline():
        L = torch.linalg.cholesky(A + damping * torch.eye(args.d, dtype=dtype))
        return torch.cholesky_solve(B.unsqueeze(-1), L).squeeze(-1)

    expected = torch_baseline()
    table = Table(title=f"solve_spd: N={args.n}, d={args.d}, {args.dtype}, damping={damping}, "
                  f"median of {args.repeats}")
    for col in ("method", "median ms", "spread ms", "speed-up vs torch", "max |err|"):
        table.add_column(col)
    t_ref, s_ref = _median_time(torch_baseline, args.repeats)
    table.add_row("torch.linalg (baseline)", f"{t_ref * 1e3:.2f}",
                  f"{s_ref * 1e3:.2f}", "1.00x", "0")
    for name, status in backends().items():
        if not status.available or name == "cuda":
            continue
        X = linalg.solve_spd(A, B, damping, backend=name)
        t, s = _median_time(lambda: linalg.solve_spd(A, B, damping, backend=name), args.repeats)
        err = (X - expected).abs().max().item()
        table.add_row(escape(f"mk.linalg.solve_spd [{name}]"), f"{t * 1e3:.2f}",
                      f"{s * 1e3:.2f}", f"{t_ref / t:.2f}x", f"{err:.1e}")
    console.print(table)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbf", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mbf-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="report the backends available here and why any is not")
    demo = sub.add_parser("demo", help="time solve_spd on each backend against torch.linalg")
    demo.add_argument("--n", type=_positive_int, default=65536, help="number of blocks")
    demo.add_argument("--d", type=_positive_int, default=9, help="block size")
    demo.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    demo.add_argument("--repeats", type=_positive_int, default=7, help="timed calls per method")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Rich wraps at 80 columns when writing to a pipe or file; tables read better unwrapped.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    handler = {"info": _info, "demo": _demo}[args.command]
    return handler(args, console)


if __name__ == "__main__":
    sys.exit(main())
