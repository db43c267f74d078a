"""``mbf profile``: where one optimizer step's time goes, for MBF on each backend, the same
update written with dense ``torch.linalg`` (ReferenceMBF), and AdamW / SGD.

Each variant gets its own copy of the model with the same gradients (from one forward and
backward pass on a seeded random batch, so the curvature is real). After one warm-up step
(which allocates the state, and for MBF does the first curvature refresh and factorisation),
``steps`` consecutive steps are timed without the profiler (mean and median per step; with
T1 = curvature_update_freq, every T1 consecutive steps contain one curvature refresh), then
the same number of steps run under ``torch.profiler``, whose per-operator table and Chrome
trace are written out. Ratios are against AdamW's mean step time in the same run.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from . import models
from .benchmark import kernel_backends, sync
from ..optim import MBF, ReferenceMBF

__all__ = ["Variant", "ProfileResult", "variants", "profile_step", "PROFILE_MODELS"]

#: Models and the input they are profiled with: (constructor, input shape per sample).
PROFILE_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet32": (lambda: models.ResNet32(10), (3, 32, 32)),
    "vgg11": (lambda: models.vgg11(100), (3, 32, 32)),
    "vgg16": (lambda: models.vgg16(100), (3, 32, 32)),
    "small_cnn": (lambda: models.SmallCNN(10), (1, 8, 8)),
}


@dataclass
class Variant:
    name: str
    make: Callable[[nn.Module], torch.optim.Optimizer]
    is_baseline: bool = False


def variants(device: torch.device, mbf_options: dict) -> list[Variant]:
    """MBF on every backend that runs on ``device``, the dense torch.linalg reference, and the
    torch.optim baselines: AdamW(fused=True) first, the fastest first-order step, which ratios
    refer to; AdamW(foreach=True) and fused SGD beside it."""
    out = [Variant("AdamW(fused)", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3,
                                                               fused=True), True),
           Variant("AdamW(foreach)", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3,
                                                                 foreach=True), True),
           Variant("SGD(fused)", lambda m: torch.optim.SGD(m.parameters(), lr=0.01,
                                                           momentum=0.9, fused=True), True)]
    for backend in kernel_backends(device):
        label = "torch ops" if backend == "torch" else "kernels"
        out.append(Variant(f"MBF [{backend}] ({label})",
                           lambda m, b=backend: MBF.from_model(m, backend=b, **mbf_options)))
    out.append(Variant("ReferenceMBF (dense torch.linalg)",
                       lambda m: ReferenceMBF.from_model(m, **mbf_options)))
    return out


@dataclass
class ProfileResult:
    variant: str
    mean_ms: float
    median_ms: float
    min_ms: float
    max_ms: float
    ratio_vs_adamw: float = float("nan")
    top_ops: list[dict] = field(default_factory=list)
    trace: str = ""


def _model_with_grads(model_name: str, batch_size: int, device: torch.device) -> nn.Module:
    if model_name not in PROFILE_MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(PROFILE_MODELS)}")
    make, shape = PROFILE_MODELS[model_name]
    torch.manual_seed(0)
    model = make().to(device)
    x = torch.randn(batch_size, *shape, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    F.cross_entropy(model(x), y).backward()
    return model


def profile_step(model_name: str, device: torch.device, out: Path, *, batch_size: int = 32,
                 steps: int = 10, top: int = 8, mbf_options: dict | None = None,
                 only: list[str] | None = None, on_variant: Callable[[str], None] | None = None
                 ) -> list[ProfileResult]:
    """Time and profile ``steps`` optimizer steps of every variant (or those whose name starts
    with one of ``only``); writes trace_<variant>.json per variant into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    base = _model_with_grads(model_name, batch_size, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    results = []
    for var in variants(device, mbf_options or {}):
        if only and not any(var.name.lower().startswith(o.lower()) for o in only):
            continue
        if on_variant is not None:
            on_variant(var.name)
        model = copy.deepcopy(base)
        for p, q in zip(base.parameters(), model.parameters()):
            q.grad = p.grad.clone()
        opt = var.make(model)
        opt.step()  # warm-up: state allocation, first curvature refresh and factorisation
        sync(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - start)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                with record_function("optimizer.step"):
                    opt.step()
            sync(device)
        slug = re.sub(r"[^a-z0-9]+", "_", var.name.lower()).strip("_")
        trace = out / f"trace_{slug}.json"
        prof.export_chrome_trace(str(trace))
        averages = prof.key_averages()
        total = sum(getattr(e, sort_key) for e in averages) or 1.0
        ranked = sorted((e for e in averages if e.key != "optimizer.step"),
                        key=lambda e: getattr(e, sort_key), reverse=True)[:top]
        top_ops = [dict(op=e.key, calls_per_step=e.count / steps,
                        self_ms_per_step=getattr(e, sort_key) / 1e3 / steps,
                        share=getattr(e, sort_key) / total) for e in ranked]
        results.append(ProfileResult(var.name, statistics.fmean(times) * 1e3,
                                     statistics.median(times) * 1e3, min(times) * 1e3,
                                     max(times) * 1e3, top_ops=top_ops, trace=trace.name))
    adamw = next((r for r in results if r.variant.startswith("AdamW")), None)
    for r in results:
        if adamw is not None:
            r.ratio_vs_adamw = r.mean_ms / adamw.mean_ms
    return results


def write_outputs(out: Path, results: list[ProfileResult], meta: dict) -> dict[str, Path]:
    """profile.json (every number) and profile.md (the step table and each top-op table)."""
    paths = {"json": out / "profile.json", "md": out / "profile.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": [r.__dict__ for r in results]},
                                        indent=1, default=str))
    lines = ["| optimizer | mean ms/step | median (min-max) ms | x AdamW | trace |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.variant} | {r.mean_ms:.2f} | {r.median_ms:.2f} ({r.min_ms:.2f}-"
                     f"{r.max_ms:.2f}) | {r.ratio_vs_adamw:.2f} | {r.trace} |")
    for r in results:
        lines += ["", f"{r.variant}: top operators by self time", "",
                  "| op | calls/step | self ms/step | share |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls_per_step']:.1f} | {o['self_ms_per_step']:.3f} | "
                  f"{100 * o['share']:.0f}% |" for o in r.top_ops]
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths
