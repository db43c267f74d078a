"""Host-side pieces every Triton op family shares (private): the tile configs and their
autotuning, the checks for direct calls, and the launch and registration helpers.

Naming ladder (as Liger-Kernel): ``_name_kernel`` (``@triton.jit``) and its host launcher live
together in the op family's module (:mod:`.linalg`, :mod:`.compact`, :mod:`.step`); the public
API (:mod:`mbf_kernels.linalg`, :mod:`mbf_kernels.compact`, the optimizer) reaches them through
:mod:`mbf_kernels.dispatch`.

* The linalg and compact ops are ``torch.library.triton_op``s: ``torch.compile`` sees through
  them to the kernels (``wrap_triton``). In Triton's interpreter, where ``wrap_triton`` cannot
  be traced (pytorch/pytorch#152868: an interpreted kernel carries no JIT metadata, and tracing
  would drop the launch), they are opaque ``custom_op``s instead, with the same function as
  their fake implementation (which skips the launch on fake tensors).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ..layout import COMPACT_TILE, check_mode, compact_shape
from ..limits import TRITON_MAX_D as MAX_D
from ..limits import triton_autotune, triton_interpreted
from ..packed import tril_dim

#: (BLOCK, num_warps) candidates. BLOCK >= 32 * num_warps: each block has exactly one owning
#: thread (two per thread only when registers allow: fits).
CONFIGS = ((128, 4), (64, 2), (256, 4), (128, 2), (32, 1))


def fits(block: int, warps: int, d: int) -> bool:
    """Whether a (BLOCK, num_warps) config is worth trying for block size d: two blocks per
    thread only while a block's triangle leaves room in the 255 registers."""
    per_thread = block // (32 * warps)
    return per_thread == 1 or (per_thread == 2 and d <= 10)


def _prune(configs, named_args, **kwargs):
    if not triton_autotune():
        # The interpreter ignores warps, and MBF_TRITON_AUTOTUNE=0 asks for no tuning: the
        # first config, which fits every d.
        return [configs[0]]
    d = kwargs.get("D", named_args.get("D"))
    kept = [c for c in configs if fits(c.kwargs["BLOCK"], c.num_warps, d)]
    return kept or [configs[0]]


def autotune(restore=()):
    """Tile size and warps tuned per block size (and size class, and dtype) on first use; the
    kernels that update in place restore their output between the trial runs."""
    return triton.autotune(
        configs=[triton.Config({"BLOCK": b}, num_warps=w, num_stages=1) for b, w in CONFIGS],
        key=["D", "NBIN"], restore_value=list(restore),
        prune_configs_by={"early_config_prune": _prune})


def check_float(name: str, X: Tensor) -> None:
    if X.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"mbf_kernels triton: {name} must be float32 or float64, got {X.dtype}")


def check_d(d: int) -> None:
    if not 1 <= d <= MAX_D:
        raise ValueError(f"mbf_kernels triton: block size d = {d} is outside the Triton kernels' "
                         f"range 1..{MAX_D}; use backend='cuda' or 'auto' for larger blocks")


def check_like(name: str, X: Tensor, ref_name: str, ref: Tensor) -> None:
    if X.dtype != ref.dtype or X.device != ref.device:
        raise ValueError(f"mbf_kernels triton: {name} must match {ref_name} ({ref.dtype} on "
                         f"{ref.device}), got {X.dtype} on {X.device}")


def square_blocks(name: str, A: Tensor) -> tuple[int, int]:
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"mbf_kernels triton: {name} must have shape (N, d, d), got "
                         f"{tuple(A.shape)}")
    check_float(name, A)
    check_d(A.shape[1])
    return A.shape[0], A.shape[1]


def rhs_columns(B: Tensor, A: Tensor, a_name: str) -> int:
    if B.ndim != 3 or B.shape[:2] != A.shape[:2]:
        raise ValueError(f"mbf_kernels triton: B must have shape ({A.shape[0]}, {A.shape[1]}, k) "
                         f"to match {a_name}, got {tuple(B.shape)}")
    check_like("B", B, a_name, A)
    return B.shape[2]


def check_compact(name: str, C: Tensor, n: int, d: int) -> None:
    check_float(name, C)
    check_d(d)
    if tuple(C.shape) != compact_shape(n, d):
        raise ValueError(f"mbf_kernels triton: {name} must have the compact shape "
                         f"{compact_shape(n, d)} for {n} blocks of size {d}, got {tuple(C.shape)}")


def vector_rows(name: str, X: Tensor) -> tuple[int, int]:
    if X.ndim != 2:
        raise ValueError(f"mbf_kernels triton: {name} must have shape (N, d), got {tuple(X.shape)}")
    return X.shape[0], X.shape[1]


def launch(kernel, grid, *args, **meta) -> None:
    """``wrap_triton(kernel)[grid](...)``, which torch.compile traces into. Triton's interpreter
    (CI) cannot run on the fake tensors that tracing passes: there the kernel is skipped, the
    outputs being allocated by the torch ops around it."""
    if triton_interpreted() and any(is_fake(a) for a in args if isinstance(a, Tensor)):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def register_op(name: str, mutates_args):
    """Register ``fn`` as the op ``name``: see the module docstring."""
    def register(fn):
        if triton_interpreted():
            op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
            op.register_fake(fn)
            return op
        return triton_op(name, mutates_args=mutates_args)(fn)
    return register


def grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def nbin(n: int) -> int:
    """Size class in the tuning key: small and large batches may want different tiles."""
    return int(n >= 1 << 16)


class LruCache:
    """The ``size`` most recently used values, each built once by ``get``'s ``build`` on a miss:
    the segment tables' launch plans (tables.py) and their device copies (:data:`TABLES`)."""

    def __init__(self, size: int = 64) -> None:
        self._values: OrderedDict[tuple, object] = OrderedDict()
        self._size = size

    def get(self, key: tuple, build):
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = build()
            if len(self._values) > self._size:
                self._values.popitem(last=False)
        else:
            self._values.move_to_end(key)
        return value


def _device_table(values: list, device: torch.device, dtype: torch.dtype) -> Tensor:
    table = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table


class DeviceTables(LruCache):
    """Device copies of recent tables, keyed by their contents: the same parameters and
    gradient buffers give the same segment table every step, which then costs no host-to-device
    copy."""

    def table(self, values: list, device: torch.device,
              dtype: torch.dtype = torch.int64) -> Tensor:
        return self.get((device, dtype, tuple(values)),
                        lambda: _device_table(values, device, dtype))


TABLES = DeviceTables()


def check_step_tensors(params, grads, momenta, F, L, stats, second_moments, tile_damping,
                        tile_scale, tile_norms, directions, mode: int,
                        block_second_moment=None) -> int:
    """The bucket op's tensor arguments checked against the curvature F: its block size d."""
    if F.ndim != 3 or F.shape[2] != COMPACT_TILE:
        raise ValueError(f"mbf_kernels triton: curvature must be a compact tensor (tiles, T, "
                         f"{COMPACT_TILE}), got {tuple(F.shape)}")
    d = tril_dim(F.shape[1])
    check_float("curvature", F)
    check_d(d)
    if not (L.dtype == torch.bfloat16 and F.dtype == torch.float32):  # (factor_dtype)
        check_like("factor", L, "curvature", F)
    elif L.device != F.device:
        raise ValueError(f"mbf_kernels triton: factor must be on {F.device}, got {L.device}")
    if L.shape != F.shape or not (F.is_contiguous() and L.is_contiguous()):
        raise ValueError("mbf_kernels triton: factor must have curvature's shape, and both "
                         "must be contiguous (they are updated in place)")
    if stats.dtype != torch.int64 or stats.numel() != 2 or stats.device != F.device:
        raise ValueError(f"mbf_kernels triton: stats must be an int64 tensor of 2 counters "
                         f"on {F.device}")
    if not len(params) == len(grads) == len(momenta):
        raise ValueError("mbf_kernels triton: params, grads and momenta must have the same "
                         "length")
    # (dtypes are singletons and get_device() an int: the checks of a ResNet-32's hundred
    # tensors, per call, without building device objects. A CPU and a meta tensor both give
    # -1, so off CUDA, where Triton is its interpreter, every device is compared in full.)
    dtype, device = F.dtype, F.get_device()
    full = device < 0
    for i, (p, g, m) in enumerate(zip(params, grads, momenta)):
        if full or not (p.dtype is dtype and g.dtype is dtype and m.dtype is dtype
                and p.get_device() == device and g.get_device() == device
                and m.get_device() == device):
            for name, t in (("params", p), ("grads", g), ("momenta", m)):
                check_like(f"{name}[{i}]", t, "curvature", F)
        if g.shape != p.shape or m.shape != p.shape:
            raise ValueError(f"mbf_kernels triton: grads[{i}] and momenta[{i}] must have "
                             f"shape {tuple(p.shape)}, got {tuple(g.shape)} and "
                             f"{tuple(m.shape)}")
        if not (p.is_contiguous() and m.is_contiguous()):
            raise ValueError(f"mbf_kernels triton: params[{i}] and momenta[{i}] are updated "
                             "in place and must be contiguous")
    for name, t, shape in (("tile_damping", tile_damping, (F.shape[0],)),
                           ("tile_scale", tile_scale, (F.shape[0],)),
                           ("tile_norms", tile_norms, (F.shape[0], 2, COMPACT_TILE)),
                           ("directions", directions, (F.shape[0], d, COMPACT_TILE)),
                           ("block_second_moment", block_second_moment,
                            (F.shape[0], COMPACT_TILE))):
        if t is not None:
            check_like(name, t, "curvature", F)
            if tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(f"mbf_kernels triton: {name} must be a contiguous tensor "
                                 f"of shape {shape}, got {tuple(t.shape)}")
    mode = check_mode("mbf_kernels triton", mode, tile_scale, tile_norms, directions)
    if mode.measures and block_second_moment is not None:
        if len(second_moments):
            raise ValueError("mbf_kernels triton: a grafted step takes Adam's v per block "
                             "(block_second_moment) or per entry (second_moments), not both")
    elif mode.measures:
        if len(second_moments) != len(params):
            raise ValueError(f"mbf_kernels triton: a grafted step needs one second moment "
                             f"per params tensor, got {len(second_moments)} for "
                             f"{len(params)}")
        for i, (p, v) in enumerate(zip(params, second_moments)):
            if full or not (v.dtype is dtype and v.get_device() == device):
                check_like(f"second_moments[{i}]", v, "curvature", F)
            if v.shape != p.shape or not v.is_contiguous():
                raise ValueError(f"mbf_kernels triton: second_moments[{i}] must be "
                                 f"contiguous with shape {tuple(p.shape)}")
    return d
