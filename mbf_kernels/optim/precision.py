"""The precision of the shared blocks' GEMMs (option ``shared_matmul``, docs/options.md).

``"tf32"`` runs the float32 GEMMs of the shared (and low-rank) blocks with inputs rounded to
TF32's 10-bit mantissa and float32 accumulation: on CUDA on the tensor cores (torch's
``fp32_precision`` switch, set for the optimizer's own GEMMs only and restored after), elsewhere
emulated by rounding the inputs, so that its effect on training can be measured and tested
without a GPU (slower than float32 there: emulation is for checking, not speed). ``"auto"`` is
``"tf32"`` on CUDA and ``"float32"`` elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

MATMUL = ("auto", "float32", "tf32")

# The GEMMs by where their two matrix operands sit: first in the arguments, or after the
# added-to operand (addmm, addmv).
_PRODUCTS = {torch.mm, torch.matmul, Tensor.__matmul__, Tensor.matmul, Tensor.mm}
_ADDED_PRODUCTS = {torch.addmm, torch.addmv, Tensor.addmm, Tensor.addmm_, Tensor.addmv,
                   Tensor.addmv_}


def round_tf32(t: Tensor) -> Tensor:
    """float32 rounded to the nearest value with a 10-bit mantissa (TF32's), ties away from 0."""
    bits = t.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class _EmulatedTF32(TorchFunctionMode):
    """Rounds the matrix operands of every float32 GEMM to TF32 (the accumulator stays float32,
    as on the tensor cores); the added-to operand of addmm is not a GEMM input and is left."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS or func in _ADDED_PRODUCTS:
            first = 1 if func in _ADDED_PRODUCTS else 0
            args = tuple(round_tf32(a) if i in (first, first + 1) and isinstance(a, Tensor)
                         and a.dtype == torch.float32 else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def resolve(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "tf32" if device.type == "cuda" else "float32"
    return mode


@contextlib.contextmanager
def shared_matmul(mode: str, device: torch.device) -> Iterator[None]:
    """The GEMMs inside run at ``mode`` (resolved for ``device``)."""
    if resolve(mode, device) != "tf32":
        yield
    elif device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        with _EmulatedTF32():
            yield
