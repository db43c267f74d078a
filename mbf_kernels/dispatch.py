"""Which kernel backends exist on this machine, and which one serves a call.

Backends:

``torch``   the plain-PyTorch reference (:mod:`mbf_kernels.reference`); always available,
            the only differentiable one, and the oracle for the others.
``cpu``     the C++ kernels of the compiled extension, on CPU tensors.
``cuda``    the CUDA kernels of the compiled extension, on CUDA tensors (the fused step and the
            compact ops up to d = 64, the dense ops for any d).
``triton``  fused Triton kernels for d <= TRITON_MAX_D, on CUDA tensors (or on CPU tensors in
            Triton's interpreter, TRITON_INTERPRET=1: how CI tests them).

``"auto"`` picks, for CUDA tensors, Triton where it covers the block size, then the CUDA
extension where it does, then torch; for CPU tensors the C++ kernels, then torch (never the
interpreter); and torch whenever autograd has to flow through the call. It never fails where
the torch reference would work. An explicitly requested backend that cannot serve the call
raises, naming the reason.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _extension, reference
from .limits import (CUDA_STEP_MAX_D, TRITON_INTERPRETER_MIN, TRITON_MAX_D, triton_interpreted,
                     version_tuple)

BACKEND_NAMES = ("torch", "cpu", "cuda", "triton")
CHOICES = ("auto", *BACKEND_NAMES)

@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend; ``detail`` says why it is unavailable, or what it runs."""

    name: str
    available: bool
    detail: str


def _triton_status() -> BackendStatus:
    # No import of triton here (seconds, and it must follow TRITON_INTERPRET): its metadata says
    # whether it is installed.
    if importlib.util.find_spec("triton") is None:
        return BackendStatus("triton", False, "triton is not installed")
    version = importlib.metadata.version("triton")
    if triton_interpreted():
        if version_tuple(version) < TRITON_INTERPRETER_MIN:
            oldest = ".".join(map(str, TRITON_INTERPRETER_MIN))
            return BackendStatus("triton", False, f"triton {version}'s CPU interpreter cannot run "
                                 f"these kernels (TRITON_INTERPRET=1 needs triton >= {oldest}; "
                                 "compiled for a GPU, older versions serve)")
        return BackendStatus("triton", True, f"triton {version} in its CPU interpreter "
                             f"(TRITON_INTERPRET=1; for tests), d <= {TRITON_MAX_D}")
    if not torch.cuda.is_available():
        return BackendStatus("triton", False, f"triton {version}: no CUDA device visible "
                             "(TRITON_INTERPRET=1 runs the kernels in its CPU interpreter)")
    return BackendStatus("triton", True, f"triton {version} kernels, d <= {TRITON_MAX_D}, on "
                         f"{torch.cuda.get_device_name()}")


def _cuda_status() -> BackendStatus:
    if not _extension.AVAILABLE:
        return BackendStatus("cuda", False, f"extension not loaded: {_extension.LOAD_ERROR}")
    if not _extension.build_info().get("cuda", False):
        why = "torch is a CPU build" if torch.version.cuda is None else "built with MBF_NO_CUDA"
        return BackendStatus("cuda", False, f"extension built without CUDA ({why})")
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "no CUDA device visible")
    return BackendStatus("cuda", True, f"CUDA kernels on {torch.cuda.get_device_name()}")


def _cpu_status() -> BackendStatus:
    if not _extension.AVAILABLE:
        return BackendStatus("cpu", False, f"extension not loaded: {_extension.LOAD_ERROR}")
    info = _extension.build_info()
    runs = ", ".join(info.get("cpu_levels_supported", ()))
    return BackendStatus("cpu", True, f"C++ kernels ({info.get('compiler', '?')}; ISA level "
                                      f"{info.get('cpu_level')}, this CPU runs {runs})")


_STATUS: dict[str, BackendStatus] = {}


def _status() -> dict[str, BackendStatus]:
    # Computed once per process: what is built and which devices exist do not change while it
    # runs, and select() sits on every op call (and inside torch.compile'd code).
    if not _STATUS:
        _STATUS.update(
            torch=BackendStatus("torch", True, f"plain PyTorch {torch.__version__} reference"),
            cpu=_cpu_status(),
            cuda=_cuda_status(),
            triton=_triton_status(),
        )
        if _STATUS["triton"].available:
            module("triton")
    return _STATUS


def backends() -> dict[str, BackendStatus]:
    """Status of every backend on this machine, keyed by name."""
    return dict(_status())


def cpu_ops(group: dict, device: torch.device) -> bool:
    """Whether a param group's tensors on ``device`` take the CPU-only C++ ops of the optimizer
    (the shared blocks' row passes, the graft's per-unit sums): on the CPU, its backend "auto"
    or "cpu", the extension built."""
    return (device.type == "cpu" and group["backend"] in ("auto", "cpu")
            and backends()["cpu"].available)


def _serves_device(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "triton" and triton_interpreted():
        return device.type in ("cuda", "cpu")
    return device.type == "cuda"


def max_block_size(name: str, *, step: bool = False) -> int | None:
    """Largest block size ``name`` takes (None: any); ``step``: for the fused step and the
    compact ops rather than the dense linalg ops."""
    if name == "triton":
        return TRITON_MAX_D
    if name == "cuda" and step:
        return CUDA_STEP_MAX_D
    return None


def covers(name: str, d: int | None, *, step: bool = False) -> bool:
    """Whether backend ``name`` takes blocks of size ``d`` (None: any size is fine)."""
    limit = max_block_size(name, step=step)
    return d is None or limit is None or d <= limit


def select(backend: str, device: torch.device, *, differentiable: bool, fn: str,
           d: int | None = None, step: bool = False) -> ModuleType:
    """The module whose flat-batch functions serve a call (see :mod:`mbf_kernels.reference`)
    on blocks of size ``d`` (``step``: the fused step or a compact op)."""
    if backend not in CHOICES:
        raise ValueError(f"{fn}: backend must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        if differentiable:
            return reference
        order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        status = _status()
        for name in order:
            if (status[name].available and _serves_device(name, device)
                    and covers(name, d, step=step)):
                return module(name)
        return reference
    if backend == "torch":
        return reference
    status = _status()[backend]
    if not status.available:
        raise RuntimeError(f"{fn}: backend {backend!r} is not available: {status.detail}")
    if not _serves_device(backend, device):
        raise ValueError(f"{fn}: backend {backend!r} cannot run on {device.type} tensors")
    if not covers(backend, d, step=step):
        raise ValueError(f"{fn}: backend {backend!r} takes blocks up to d = "
                         f"{max_block_size(backend, step=step)}, got d = {d}; backend='auto' "
                         "picks a backend per block size")
    if differentiable:
        raise RuntimeError(
            f"{fn}: backend {backend!r} is not differentiable; use backend='torch' "
            "(or 'auto') when gradients must flow through this call"
        )
    return module(backend)


_MODULES: dict[str, ModuleType] = {"torch": reference, "cpu": _extension, "cuda": _extension}


def module(name: str) -> ModuleType:
    """The flat-batch functions of backend ``name``: a dict lookup, which torch.compile traces
    without a graph break. The Triton ones are imported with the backends' status (importing
    Triton takes a while, so not before a backend is asked for)."""
    loaded = _MODULES.get(name)
    if loaded is None:  # only "triton" is loaded lazily
        loaded = _MODULES[name] = importlib.import_module("mbf_kernels.triton")
    return loaded
