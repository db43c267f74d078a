"""Per-rank optimizer memory and step time of MBF under DDP (curvature sharded or not) and FSDP2.

    python bench/bench_distributed.py --model resnet32 --worlds 1 2 4 --out bench/results

Spawns each world size as local processes (gloo, one thread each), trains a few steps on random
images under each wrapping (DDP; DDP with shard_curvature; FSDP2, every conv, linear and norm
layer and the root fully_shard'ed), and reports per rank: the curvature and factor bytes it keeps (block_summary),
its whole optimizer state (state_bytes), and the median time of ``step()`` (which, sharded,
includes the all-gather of the updated parameters). Processes on one machine show the memory
exactly; the time only shows the work each rank drops, not a speed-up, when the ranks share
fewer cores than there are of them. Writes <out>/distributed.{csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import queue as queue_module
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

import mbf_kernels as mk
from mbf_kernels.apps import models

STEPS = 12


#: How the model is wrapped: DDP with the curvature replicated or sharded, or FSDP2.
WRAPPINGS = ("ddp", "ddp_sharded", "fsdp2")


def _wrap(net: torch.nn.Module, wrapping: str) -> torch.nn.Module:
    if wrapping != "fsdp2":
        return torch.nn.parallel.DistributedDataParallel(net)
    from torch.distributed.fsdp import fully_shard
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)):
            fully_shard(m)
    return fully_shard(net)


def _rank(rank: int, world: int, model_name: str, wrapping: str, init: str, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _wrap(models.MODELS[model_name](num_classes=10, in_channels=3), wrapping)
    opt = mk.MBF.from_model(model, shard_curvature=wrapping == "ddp_sharded")
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(STEPS):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    queue.put(dict(world=world, wrapping=wrapping, rank=rank,
                   curvature_mb=sum(r["bytes"] for r in opt.block_summary()) / 2**20,
                   state_mb=opt.state_bytes() / 2**20,
                   step_ms=statistics.median(times[2:]) * 1e3))
    dist.barrier()
    dist.destroy_process_group()


def run(model: str, world: int, wrapping: str) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        procs = [ctx.Process(target=_rank, args=(r, world, model, wrapping, init, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        rows, deadline = [], time.monotonic() + 600
        while len(rows) < world:
            try:
                rows.append(queue.get(timeout=2))
            except queue_module.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"a rank failed (exit codes {failed}) or timed out; "
                                       "its traceback is above") from None
        for p in procs:
            p.join(60)
    return sorted(rows, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet32", choices=sorted(models.MODELS))
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--wrappings", nargs="+", choices=WRAPPINGS, default=list(WRAPPINGS),
                    help="at world sizes > 1 (world 1 is one DDP process, the reference)")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args(argv)
    rows = []
    runs = [(w, wrapping) for w in args.worlds
            for wrapping in (("ddp",) if w == 1 else args.wrappings)]
    for world, wrapping in runs:
        rows += run(args.model, world, wrapping)
    whole = next(r["curvature_mb"] for r in rows if r["wrapping"] == "ddp")
    lines = [f"{args.model} on gloo, {os.cpu_count()} cores shared by the ranks", "",
             "| world | wrapping | curvature MB per rank (max) | x (1 / world) of one process | "
             "state MB per rank (max) | step ms (median over ranks) |",
             "|---|---|---|---|---|---|"]
    for world, wrapping in runs:
        rs = [r for r in rows if r["world"] == world and r["wrapping"] == wrapping]
        top = max(r["curvature_mb"] for r in rs)
        lines.append(f"| {world} | {wrapping} | {top:.2f} | {top / (whole / world):.3f} | "
                     f"{max(r['state_mb'] for r in rs):.2f} | "
                     f"{statistics.median(r['step_ms'] for r in rs):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.md").write_text(text)
    with open(args.out / "distributed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
