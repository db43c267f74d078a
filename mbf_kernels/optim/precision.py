"""The precision of the shared blocks' GEMMs (option ``shared_matmul``, docs/options.md).

``"tf32"`` runs the float32 GEMMs of the shared (and low-rank) blocks with inputs rounded to
TF32's 10-bit mantissa and float32 accumulation: on CUDA on the tensor cores (torch's
``fp32_precision`` switch, set for the optimizer's own GEMMs only and restored after), elsewhere
emulated by rounding the inputs, so that its effect on training can be measured and tested
without a GPU (slower than float32 there: emulation is for checking, not speed). ``"auto"``:
:func:`resolve`.

``"bfloat16"`` applies an exact shared block of a float32 state whose GEMM has at least
:data:`BF16_MIN_FLOPS` as ``U = bf16(bf16(M) bf16(inv))``: the rows and a bfloat16 copy of the
inverse (made where the inverse is derived) multiplied with float32 accumulation, the product
rounded to bfloat16 (oneDNN's and the tensor cores' bfloat16 GEMMs write bfloat16) and widened.
Smaller blocks, low-rank blocks' thin GEMMs (memory-bound) and the refresh's stay float32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

MATMUL = ("auto", "float32", "tf32", "bfloat16")

#: The smallest GEMM (2 n d^2 FLOPs) that shared_matmul="bfloat16" runs in bfloat16. oneDNN's
#: call costs about 15 us whatever the size (2-core Zen 4): 10 x 65 rows took 16 us against MKL's
#: float32 4 us, 256 x 65 (2.2 MFLOP) 30 us against 28, 128 x 257 (17 MFLOP) 67-77 against
#: 117-169, 64 x 513 (34 MFLOP) 118 against 248-291.
BF16_MIN_FLOPS = 1 << 22

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


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX), where oneDNN's
    bfloat16 GEMM runs at about twice the float32 rate (elsewhere it converts, and is slower)."""
    # (torch's private probes; a torch without them counts as no)
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                          "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def resolve(mode: str, device: torch.device, damping_mode: str = "absolute") -> str:
    """``mode`` for ``device`` and the group's ``damping_mode``: "auto" is "tf32" on CUDA; on
    a CPU "bfloat16" under relative damping where the CPU multiplies bfloat16 in hardware
    (:func:`native_bfloat16`), else "float32". Relative damping bounds the blocks' conditioning
    (as for factor_dtype), and the paper's options (absolute damping) keep section 3's float32
    update."""
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "tf32"
    if device.type == "cpu" and damping_mode == "relative" and native_bfloat16():
        return "bfloat16"
    return "float32"


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
