"""Shared test helpers: random SPD batches, the backends under test, fp64-anchored tolerances."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it is chosen
# when a kernel is defined, so it is set before any test imports mbf_kernels.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns once per process until this is chosen; 1 keeps its current default (fused
# multiply-adds), which the tolerances here allow for.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import mbf_kernels as mk

#: A file to which each failure's report is appended as it happens (python/tools/gpu_check.sh
#: sets it): a run that its time bound cuts short, before pytest's summary, still says what
#: failed and why, a crashed xdist worker included.
FAILURE_LOG_ENV = "MBF_TEST_FAILURE_LOG"


def pytest_runtest_logreport(report):
    path = os.environ.get(FAILURE_LOG_ENV)
    # Under xdist the controller sees every worker's reports: only it writes, once each.
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n"
                    f"{report.longreprtext}\n\n")


# Awkward sizes on purpose (STYLE.md): d = 1, non-powers of two, both sides of the hot sizes.
BLOCK_DIMS = (1, 2, 9, 10, 25, 27, 33)
BATCH_SIZES = (0, 1, 7, 1000)
DTYPES = (torch.float32, torch.float64)


def batch_sizes_for(d: int) -> tuple[int, ...]:
    # 1000 blocks of 33x33 would only slow the suite without covering anything new.
    return BATCH_SIZES if d <= 10 else (0, 1, 7, 64)


def random_spd(*batch: int, d: int, dtype=torch.float64, seed: int = 0, ridge: float = 0.1):
    """Well-conditioned SPD matrices M M^T / d + ridge * I with shape (*batch, d, d)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(*batch, d, d, dtype=torch.float64, generator=g)
    A = M @ M.mT / d + ridge * torch.eye(d, dtype=torch.float64)
    return ((A + A.mT) / 2).to(dtype)  # exactly symmetric, whatever the matmul rounding


def randn(*shape: int, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype)


def unit_and_pivots(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What an int8 unit factor codes, per block of (n, T) factor rows (diagonal inverted, as
    the optimizer stores them), in float64: U's strictly lower entries U_ij = L_ij / L_jj
    (row-major) and the pivots r_i = 1 / L_ii^2."""
    from mbf_kernels.packed import unpack_tril

    L = unpack_tril(rows.double(), symmetric=False)
    inv = L.diagonal(dim1=-2, dim2=-1)
    i, j = torch.tril_indices(L.shape[-1], L.shape[-1], -1)
    return L[:, i, j] * inv[:, j], inv * inv


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a strided (non-contiguous) view."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    view = big[..., ::2]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


@dataclass(frozen=True)
class Target:
    """A compiled backend and the device of the tensors it is tested on; for the C++ CPU
    kernels, also the ISA level they run at (None: the one chosen at import)."""

    backend: str
    device: str
    level: str | None = None

    def to(self, *tensors: torch.Tensor):
        moved = tuple(t.to(self.device) for t in tensors)
        return moved[0] if len(moved) == 1 else moved

    @property
    def interpreted(self) -> bool:
        """Triton in its CPU interpreter: slow, so tests keep N small there."""
        return self.backend == "triton" and self.device == "cpu"


def targets(*, covering: int | None = None, step: bool = False, gpu_only: bool = False) -> list:
    """pytest params, one per compiled backend and the device it runs on here: the C++ kernels
    on CPU tensors, the Triton kernels on the GPU (in Triton's interpreter on CPU tensors when
    there is none, set above), the CUDA kernels on the GPU. The GPU is a parameter, not a file:
    a target whose backend or device is missing skips only its own cases, saying why (marked
    ``gpu`` when it needs one). ``covering``: only backends whose ops (``step``: whose fused
    step) take blocks up to that size."""
    from mbf_kernels import dispatch

    status = mk.backends()
    gpu = torch.cuda.is_available()
    params = []
    triton_device = "cuda" if gpu or gpu_only else "cpu"
    for name, device in (("cpu", "cpu"), ("triton", triton_device), ("cuda", "cuda")):
        if covering is not None and not dispatch.covers(name, covering, step=step):
            continue
        if gpu_only and device != "cuda":
            continue
        marks = [pytest.mark.gpu] if device == "cuda" else []
        if not status[name].available:
            marks.append(pytest.mark.skip(reason=status[name].detail))
        elif device == "cuda" and not gpu:
            marks.append(pytest.mark.skip(reason="needs a CUDA device"))
        params.append(pytest.param(Target(name, device), marks=marks, id=f"{name}-{device}"))
        if name == "cpu" and status[name].available:
            params += _lower_cpu_levels()
    return params


# The C++ kernels' ISA level chosen at import (the best this CPU runs, unless
# MBF_CPU_CAPABILITY forces another): the "cpu" target runs at it, and every other level the
# build has gets a target of its own, so that one machine tests every path it can execute.
IMPORT_LEVEL = mk._extension.cpu_capability()


def _lower_cpu_levels() -> list:
    info = mk._extension.build_info()
    supported = info.get("cpu_levels_supported", [])
    params = []
    for level in info.get("cpu_levels", []):
        if level == IMPORT_LEVEL:
            continue
        marks = [] if level in supported else [
            pytest.mark.skip(reason=f"this CPU cannot run the {level} kernels")]
        params.append(pytest.param(Target("cpu", "cpu", level), marks=marks,
                                   id=f"cpu[{level}]-cpu"))
    return params


def cpu_levels() -> list:
    """pytest params (``target``) of the C++ CPU kernels at every ISA level this CPU runs, for
    the CPU-only ops (the shared blocks' row passes)."""
    status = mk.backends()["cpu"]
    if not status.available:
        return [pytest.param(Target("cpu", "cpu"), id="cpu-cpu",
                             marks=pytest.mark.skip(reason=status.detail))]
    return [pytest.param(Target("cpu", "cpu"), id="cpu-cpu"), *_lower_cpu_levels()]


@pytest.fixture(autouse=True)
def _cpu_kernel_level(request):
    """A test whose ``target`` names an ISA level runs the C++ kernels at that level."""
    callspec = getattr(request.node, "callspec", None)
    target = callspec.params.get("target") if callspec is not None else None
    level = getattr(target, "level", None)
    if level is None:
        yield
        return
    mk._extension.set_cpu_capability(level)
    try:
        yield
    finally:
        mk._extension.set_cpu_capability(IMPORT_LEVEL)


def compiled_backends(*, covering: int | None = None) -> list:
    """pytest params of the compiled backends that run on CPU tensors here (the optimizer
    tests, which build their models on the CPU), by name."""
    return [pytest.param(p.values[0].backend, marks=p.marks, id=p.values[0].backend)
            for p in targets(covering=covering, step=covering is not None)
            if p.values[0].device == "cpu" and p.values[0].level is None]


def assert_refuses_block_size(backend: str, d: int, call) -> None:
    """An explicitly chosen backend refuses a block size it does not cover, naming its limit."""
    with pytest.raises(ValueError, match=rf"backend '{backend}' takes blocks up to d = \d+, got d = {d}"):
        call()


def assert_close_fp64_anchored(ours, theirs, exact, *, factor: float = 2.0, what: str = "",
                               cond: float = 1.0):
    """``ours`` is at most ``factor`` x further from the fp64 ``exact`` than ``theirs``.

    ``theirs`` is torch's result at the same precision as ``ours``: a backend is judged
    against what plain PyTorch achieves, not against an absolute tolerance (flash-attention's
    rule). For float64 ``theirs`` and ``exact`` are the same computation, so a floor of
    O(d) ulps of the data's scale (the textbook error growth of a d x d Cholesky solve on these
    well-conditioned inputs) stands in for the unavailable higher-precision anchor. An op
    whose forward error grows with the condition number (an inverse) passes ``cond``, the
    largest 2-norm condition number of its inputs, which scales the floor (the standard
    ``|dX| / |X| <= c d eps cond`` bound).
    """
    ours64, theirs64, exact = ours.double(), theirs.double(), exact.double()
    assert ours.shape == exact.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    if exact.numel() == 0:
        return
    d = exact.shape[-1]
    scale = exact.abs().max().clamp_min(1.0)
    floor = 4 * d * torch.finfo(ours.dtype).eps * scale * cond
    err_ours = (ours64 - exact).abs().max()
    err_theirs = (theirs64 - exact).abs().max()
    bound = factor * err_theirs + floor
    if not err_ours <= bound:
        diff = (ours64 - exact).abs()
        worst = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{what}: error {err_ours:.3e} vs fp64 exceeds {factor} x torch's {err_theirs:.3e} "
            f"(+ floor {floor:.1e}); worst at {worst}: ours {ours64[worst]:.8g}, "
            f"exact {exact[worst]:.8g}"
        )


#: Fused-step tolerances against the reference step (float32 after a few refactorisations).
STEP_TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


class StepBucket:
    """One bucket's state in both forms, stepped by the reference (canonical packed rows) and by
    a fused-step kernel ``step_fn`` with ``mbf_step_``'s signature (compact layout)."""

    def __init__(self, n, d, dtype, step_fn, *, device="cpu", seed=0):
        from mbf_kernels import compact
        from mbf_kernels.packed import tril_size

        self.n, self.d, self.step_fn = n, d, step_fn
        self.p_ref = randn(n, d, dtype=dtype, seed=seed).to(device)
        self.m_ref = torch.zeros_like(self.p_ref)
        self.F_ref = torch.zeros(n, tril_size(d), dtype=dtype, device=device)
        identity = compact.identity_factor(d, dtype).to(device)
        self.L_ref = identity.expand(n, -1).clone()
        self.stats_ref = torch.zeros(2, dtype=torch.int64, device=device)
        self.p, self.m = self.p_ref.clone(), self.m_ref.clone()
        self.F = compact.to_compact(self.F_ref)
        self.L = compact.to_compact(self.L_ref, pad=identity)
        self.stats = torch.zeros(2, dtype=torch.int64, device=device)

    def step(self, grad, **cfg):
        from mbf_kernels import reference

        reference.mbf_step_(self.p_ref, grad, self.m_ref, self.F_ref, self.L_ref, self.stats_ref,
                            **cfg)
        self.step_fn(self.p, grad, self.m, self.F, self.L, self.stats, **cfg)

    def assert_matches(self, dtype, what=""):
        from mbf_kernels import compact

        # A NaN gradient makes that block's momentum and parameter NaN in both (MBF_SPEC
        # protects the curvature only; GradScaler skips such steps before they happen).
        tol = dict(STEP_TOL[dtype], equal_nan=True)
        torch.testing.assert_close(self.p, self.p_ref, **tol, msg=lambda m: f"param {what}: {m}")
        torch.testing.assert_close(self.m, self.m_ref, **tol, msg=lambda m: f"momentum {what}: {m}")
        torch.testing.assert_close(compact.from_compact(self.F, self.n), self.F_ref, **tol,
                                   msg=lambda m: f"curvature {what}: {m}")
        torch.testing.assert_close(compact.from_compact(self.L, self.n), self.L_ref, **tol,
                                   msg=lambda m: f"factor {what}: {m}")
        assert self.stats.tolist() == self.stats_ref.tolist(), what
