"""Block-solve throughput of every available backend against ``torch.linalg`` (``mbf bench``),
and the timing helpers the scripts under bench/ share.

Every number is the median of repeated timed calls after a warm-up, with min and max beside
it. Ratios are against the torch.linalg baseline measured in the same run, interleaved point
by point; the roof is the bytes an operation must move divided by the best bandwidth the
device reaches in the same run with all its threads (:func:`memory_roof`: a large tensor copy,
read + write counted, or the bytes a fused AdamW step moves, whichever is higher).
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, _extension, dispatch, linalg

__all__ = ["Row", "sync", "timed", "Roof", "memory_roof", "copy_bandwidth", "adamw_bandwidth",
           "random_spd", "environment", "make_row",
           "bench_linalg", "OPS"]


@dataclass
class Row:
    op: str
    impl: str
    dtype: str
    d: int
    n: int
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    blocks_per_s: float
    gbytes_per_s: float
    roof_fraction: float
    speedup_vs_torch: float | None = None
    max_abs_err: float | None = None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): timings count work, not launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], *, min_repeats: int, budget_s: float,
          device: torch.device | str = "cpu", max_repeats: int = 50) -> list[float]:
    """Seconds per call: one warm-up, then at least min_repeats calls within about budget_s
    (each call synchronised with the device, so GPU time is counted, not launch time)."""
    device = torch.device(device)
    fn()
    sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_repeats or (time.perf_counter() < deadline and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 512 * 2**20) -> float:
    """Bytes per second of a large tensor copy on ``device``, counting the read and the write
    (torch's copy runs on all the threads torch uses)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = timed(lambda: dst.copy_(src), min_repeats=7, budget_s=2.0, device=device)
    return 2 * nbytes / statistics.median(times)


def adamw_bandwidth(device: torch.device | str = "cpu", nbytes: int = 512 * 2**20) -> float:
    """Bytes per second that ``torch.optim.AdamW(fused=True)`` moves stepping one large float32
    parameter: it reads p, g, m, v and writes p, m, v, 7 x 4 bytes per element. The strongest
    first-order step on the device, and a memory roof of its own: a fused MBF step that moves
    bytes as fast runs at AdamW's speed per byte."""
    n = nbytes // (7 * 4)
    p = torch.zeros(n, device=device, requires_grad=True)
    p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    times = timed(opt.step, min_repeats=7, budget_s=2.0, device=device)
    return 7 * 4 * n / statistics.median(times)


@dataclass(frozen=True)
class Roof:
    """The memory roof measured in one run: bytes per second of a large copy and of a fused
    AdamW step; ``best`` (the higher) is what benchmarks divide by."""

    copy: float
    adamw: float

    @property
    def best(self) -> float:
        return max(self.copy, self.adamw)

    def describe(self) -> str:
        return (f"roof {self.best / 1e9:.1f} GB/s (copy {self.copy / 1e9:.1f}, "
                f"AdamW(fused) {self.adamw / 1e9:.1f}; all {torch.get_num_threads()} threads)")


def memory_roof(device: torch.device | str = "cpu", nbytes: int = 512 * 2**20) -> Roof:
    return Roof(copy_bandwidth(device, nbytes), adamw_bandwidth(device, nbytes))


def random_spd(n: int, d: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded, well-conditioned batch of SPD matrices: M M^T / d + I."""
    g = torch.Generator().manual_seed(d * 1000 + n % 997)
    M = torch.randn(n, d, d, generator=g, dtype=dtype)
    return (M @ M.mT / d + torch.eye(d, dtype=dtype)).to(device)


def environment(device: torch.device | str = "cpu") -> dict:
    """Device, versions and commit: stored beside every measurement."""
    try:
        # "-dirty" when the tracked files differ from HEAD: a tree sent to another machine
        # (the device tool) carries the session's starting HEAD beside uncommitted changes.
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--exclude=*"],
                                capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "mbf_kernels": __version__, "commit": commit, "extension": _extension.build_info()}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def make_row(op: str, impl: str, dtype: torch.dtype, d: int, n: int, times: list[float],
             nbytes: int, roof_bw: float) -> Row:
    med = statistics.median(times)
    return Row(op, impl, str(dtype).removeprefix("torch."), d, n, med * 1e3, min(times) * 1e3,
               max(times) * 1e3, len(times), n / med, nbytes / med / 1e9,
               (nbytes / roof_bw) / med)


@dataclass(frozen=True)
class _Op:
    """One public block op: how to call ours, the torch.linalg baselines (the first is the one
    ratios refer to), and the bytes one call must move per block, in elements."""

    ours: Callable
    baselines: dict[str, Callable]
    elements: Callable[[int], int]


DAMPING = 1e-3


def _damped(A: torch.Tensor) -> torch.Tensor:
    return A + DAMPING * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


OPS: dict[str, _Op] = {
    # read A and b, write x
    "solve_spd": _Op(
        ours=lambda A, b, be: linalg.solve_spd(A, b, DAMPING, backend=be),
        baselines={
            "torch cholesky+cholesky_solve": lambda A, b: torch.cholesky_solve(
                b.unsqueeze(-1), torch.linalg.cholesky(_damped(A))).squeeze(-1),
            "torch.linalg.solve": lambda A, b: torch.linalg.solve(_damped(A), b),
        },
        elements=lambda d: d * d + 2 * d),
    # read A, write L (and one int per block)
    "cholesky_ex": _Op(
        ours=lambda A, b, be: linalg.cholesky_ex(A, DAMPING, backend=be)[0],
        baselines={"torch.linalg.cholesky_ex": lambda A, b: torch.linalg.cholesky_ex(_damped(A))[0]},
        elements=lambda d: 2 * d * d),
    # read A, write A^-1
    "inv_spd": _Op(
        ours=lambda A, b, be: linalg.inv_spd(A, DAMPING, backend=be),
        baselines={"torch.linalg.inv": lambda A, b: torch.linalg.inv(_damped(A))},
        elements=lambda d: 2 * d * d),
}


def kernel_backends(device: torch.device) -> list[str]:
    """Our backends that are available and run on ``device`` (the torch reference included);
    never Triton's CPU interpreter, which is there to test the kernels, not to time them."""
    return [name for name, status in dispatch.backends().items()
            if status.available and dispatch._serves_device(name, device)
            and not (name == "triton" and device.type == "cpu")]


def bench_linalg(op: str, d: int, n: int, dtype: torch.dtype, device: torch.device,
                 roof_bw: float, budget_s: float, backends: list[str],
                 all_baselines: bool = True) -> list[Row]:
    """One (op, d, N, dtype) point: the torch.linalg baselines (only the first, which ratios
    refer to, unless ``all_baselines``), then each of our backends, each checked against the
    first baseline before it is timed (never time a wrong answer)."""
    spec = OPS[op]
    baselines = list(spec.baselines.items())
    if not all_baselines:
        baselines = baselines[:1]
    A = random_spd(n, d, dtype, device)
    b = torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(n)).to(device)
    nbytes = n * spec.elements(d) * A.element_size()
    rows: list[Row] = []
    expected = baselines[0][1](A, b)
    for name, fn in baselines:
        times = timed(lambda: fn(A, b), min_repeats=3, budget_s=budget_s, device=device)
        rows.append(make_row(op, name, dtype, d, n, times, nbytes, roof_bw))
    base_ms = rows[0].median_ms
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10)
    for backend in backends:
        out = spec.ours(A, b, backend)
        torch.testing.assert_close(out, expected, **tol, msg=lambda m: f"{op} [{backend}]: {m}")
        times = timed(lambda: spec.ours(A, b, backend), min_repeats=3, budget_s=budget_s,
                      device=device)
        row = make_row(op, f"mbf_kernels[{backend}]", dtype, d, n, times, nbytes, roof_bw)
        row.max_abs_err = float((out - expected).abs().max()) if n else 0.0
        rows.append(row)
    for row in rows:
        row.speedup_vs_torch = base_ms / row.median_ms
    return rows


#: What a command prints instead of a plot when matplotlib is missing (it is in the [bench]
#: extra): the tables and data files are still written.
NO_PLOT = "matplotlib is not installed (pip install 'mbf-kernels[bench]'): no plot written"


def can_plot() -> bool:
    """Whether matplotlib is importable (checked without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_linalg(rows: list[Row], path: Path) -> None:
    """Speed-up over the first torch baseline against N, one panel per op, a line per
    (implementation, d), float32 solid and float64 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10")
    lines = sorted({(r.impl, r.d) for r in rows})
    for ax, op in zip(axes[0], ops):
        for c, (impl, d) in enumerate(lines):
            for dtype, style in (("float32", "-"), ("float64", "--")):
                pts = sorted((r.n, r.speedup_vs_torch) for r in rows
                             if (r.op, r.impl, r.d, r.dtype) == (op, impl, d, dtype))
                if pts:
                    ax.plot(*zip(*pts), style, color=colors(c % 10), marker="o", ms=3,
                            label=f"{impl} d={d} {dtype}")
        ax.set(xscale="log", yscale="log", xlabel="blocks N",
               ylabel="speed-up vs torch baseline (same run)", title=op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
