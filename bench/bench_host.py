"""The host time of an MBF step on the Triton path, measured without a GPU.

    python bench/bench_host.py                 # ResNet-32, 7 rounds of 50 steps per kind
    python bench/bench_host.py --rounds 3 --steps 20

On a GPU the MBF step was bound by its host side (bench/RESULTS.md, the first H200 run): the
Python that turns a step into kernel launches. This times that part on the CPU. The model lives
on CPU tensors with ``backend="triton"`` (Triton's interpreter only serves the import), and the
bucket step's two kernels are replaced by no-ops, so a step's time is its host work: the checks,
the segment tables, the per-step scalars, the graft's reductions and the shared blocks' torch
calls. Those calls compute on the CPU here, so the figure is the host time only for models whose
shared blocks are small: ResNet-32's (one 65-wide head) cost a few microseconds. Medians over
rounds that alternate the kinds of step, min-max beside.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch  # noqa: E402

import mbf_kernels as mk  # noqa: E402
from bench_optimizer import KINDS, build, set_freqs  # noqa: E402  (a script beside this one)
from mbf_kernels.triton import step as triton_step  # noqa: E402


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` queues nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_times(model: str, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each kind of ``model`` (bench_optimizer.py's, with its random
    gradients), one value per round (the kernels not launched)."""
    opt = mk.MBF.from_model(build(model, 10, torch.device("cpu")), backend="triton")
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with (mock.patch.object(triton_step, "_bucket_step_kernel", _NoLaunch()),
          mock.patch.object(triton_step, "_bucket_refactor_kernel", _NoLaunch())):
        for r in range(rounds + 1):  # round 0 warms every kind up
            for kind, (t1, t2) in KINDS.items():
                set_freqs(opt, t1, t2)
                start = time.perf_counter()
                for _ in range(steps):
                    opt.step()
                if r:
                    times[kind].append((time.perf_counter() - start) / steps)
    return times


def markdown(times: dict[str, list[float]]) -> str:
    lines = ["| step | host ms (median) | min-max |", "|---|---|---|"]
    lines += [f"| {kind} | {statistics.median(v) * 1e3:.2f} | "
              f"{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f} |" for kind, v in times.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50, help="steps per round and kind")
    args = parser.parse_args(argv)
    times = host_times("resnet32", args.rounds, args.steps)
    print(f"ResNet-32, backend='triton', kernels not launched; {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}")
    print(markdown(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
