"""Which kernel backends exist on this machine, and which one serves a call.

Backends:

``torch``   the plain-PyTorch reference (:mod:`mbf_kernels.reference`); always available,
            the only differentiable one, and the oracle for the others.
``cpu``     the C++ kernels of the compiled extension, on CPU tensors.
``cuda``    the CUDA kernels of the compiled extension, on CUDA tensors.
``triton``  fused Triton kernels, on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

``"auto"`` picks, for CUDA tensors, Triton, then the CUDA extension, then torch; for CPU
tensors the C++ kernels, then torch; and torch whenever autograd has to flow through the call.
It never fails where the torch reference would work. An explicitly requested backend that
cannot serve the call raises, naming the reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _extension, reference

BACKEND_NAMES = ("torch", "cpu", "cuda", "triton")
CHOICES = ("auto", *BACKEND_NAMES)


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend; ``detail`` says why it is unavailable, or what it runs."""

    name: str
    available: bool
    detail: str


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus("triton", False, "triton is not installed")
    # Triton kernels exist for the optimizer's fused step and compact ops only (reached with
    # MBF(backend="triton")); the dense linalg API has none yet, so it reports unavailable.
    import triton

    return BackendStatus(
        "triton", False, f"triton {triton.__version__}: kernels for MBF(backend='triton') and "
        "mbf_kernels.triton only; none yet for the linalg API"
    )


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
    return BackendStatus(
        "cpu", True, f"C++ kernels ({info.get('compiler', '?')}, simd: {info.get('simd', '?')})"
    )


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
    return _STATUS


def backends() -> dict[str, BackendStatus]:
    """Status of every backend on this machine, keyed by name."""
    return dict(_status())


def _serves_device(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu"
    return device.type == "cuda"


def select(backend: str, device: torch.device, *, differentiable: bool, fn: str) -> ModuleType:
    """The module whose flat-batch functions serve a call (see :mod:`mbf_kernels.reference`)."""
    if backend not in CHOICES:
        raise ValueError(f"{fn}: backend must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        if differentiable:
            return reference
        order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        status = _status()
        for name in order:
            if status[name].available and _serves_device(name, device):
                return _MODULES[name]
        return reference
    if backend == "torch":
        return reference
    status = _status()[backend]
    if not status.available:
        raise RuntimeError(f"{fn}: backend {backend!r} is not available: {status.detail}")
    if not _serves_device(backend, device):
        raise ValueError(f"{fn}: backend {backend!r} cannot run on {device.type} tensors")
    if differentiable:
        raise RuntimeError(
            f"{fn}: backend {backend!r} is not differentiable; use backend='torch' "
            "(or 'auto') when gradients must flow through this call"
        )
    return _MODULES[backend]


_MODULES: dict[str, ModuleType] = {"torch": reference, "cpu": _extension, "cuda": _extension}
