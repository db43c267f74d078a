"""Checks at the public boundary: every error names the argument and the function."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_matrix_batch(fn: str, name: str, A: object) -> Tensor:
    """A batch of square float matrices (..., d, d)."""
    if not isinstance(A, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"{fn}: {name} must be a square matrix or a batch of them with shape (..., d, d), "
            f"got shape {tuple(A.shape)}"
        )
    check_float_dtype(fn, name, A)
    if A.layout != torch.strided:
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor, got layout {A.layout}")
    return A


def check_float_dtype(fn: str, name: str, t: Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        kind = "complex" if t.is_complex() else ("integer" if not t.is_floating_point() else "")
        raise TypeError(
            f"{fn}: {name} must be float32 or float64, got {kind + ' ' if kind else ''}{t.dtype}"
        )


def check_same_kind(fn: str, name: str, t: object, ref_name: str, ref: Tensor) -> Tensor:
    """``t`` is a tensor with ``ref``'s dtype and device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_float_dtype(fn, name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(
            f"{fn}: {name} is on device {t.device} but {ref_name} is on device {ref.device}"
        )
    return t


def check_nonnegative(fn: str, name: str, value: object) -> float:
    """A finite real number >= 0 (damping)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{fn}: {name} must be finite and >= 0, got {value}")
    return v


def check_unit_interval(fn: str, name: str, value: object) -> float:
    """A real number in [0, 1] (EMA decay)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}")
    return v


def broadcast_batch(fn: str, names: tuple[str, str], *shapes: torch.Size) -> torch.Size:
    """Broadcast batch shapes as torch.linalg does, naming both arguments when it fails."""
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        a, b = names
        raise ValueError(
            f"{fn}: the batch dimensions of {a} {tuple(shapes[0])} and {b} {tuple(shapes[1])} "
            "do not broadcast"
        ) from None
