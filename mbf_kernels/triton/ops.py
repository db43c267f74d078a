"""Host launchers of the Triton kernels, registered as torch ops in the ``mbf_kernels`` namespace.

The functions here take the flat batches of :mod:`mbf_kernels.reference` (same names, same
results) and are what ``backend="triton"`` dispatches to. They run on CUDA tensors, or on CPU
tensors under ``TRITON_INTERPRET=1`` (how CI tests them).

* The linalg and compact ops are ``torch.library.triton_op``s: ``torch.compile`` sees through
  them to the kernels (``wrap_triton``). In Triton's interpreter, where ``wrap_triton`` cannot
  be traced (pytorch/pytorch#152868: an interpreted kernel carries no JIT metadata, and tracing
  would drop the launch), they are opaque ``custom_op``s instead, with the same function as
  their fake implementation (which skips the launch on fake tensors).
* The bucket step is an opaque ``torch.library.custom_op`` with its mutations declared: its
  kernel reaches every parameter, gradient and momentum of a bucket through offsets in a
  segment table (one launch for any number of tensors), which no tracer can follow.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ..layout import COMPACT_TILE, SegmentFlags, StepMode, check_segments, compact_shape
from ..limits import triton_interpreted
from ..packed import tril_dim
from ..reference import graft_bias_corrections
from . import kernels as K

__all__ = ["cholesky_ex", "cholesky_solve", "solve_spd_ex", "inv_spd_ex", "outer_ema_",
           "compact_outer_ema_", "compact_cholesky_ex", "compact_solve", "mbf_step_",
           "mbf_bucket_step_", "MAX_D"]

MAX_D = K.MAX_D
_REFRESH, _FIRST, _REFACTOR = SegmentFlags.REFRESH, SegmentFlags.FIRST, SegmentFlags.REFACTOR


# ---------------------------------------------------------------------------------------------
# Checks for direct calls (the public API validates first, with friendlier messages)


def _check_float(name: str, X: Tensor) -> None:
    if X.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"mbf_kernels triton: {name} must be float32 or float64, got {X.dtype}")


def _check_d(d: int) -> None:
    if not 1 <= d <= MAX_D:
        raise ValueError(f"mbf_kernels triton: block size d = {d} is outside the Triton kernels' "
                         f"range 1..{MAX_D}; use backend='cuda' or 'auto' for larger blocks")


def _check_like(name: str, X: Tensor, ref_name: str, ref: Tensor) -> None:
    if X.dtype != ref.dtype or X.device != ref.device:
        raise ValueError(f"mbf_kernels triton: {name} must match {ref_name} ({ref.dtype} on "
                         f"{ref.device}), got {X.dtype} on {X.device}")


def _blocks(name: str, A: Tensor) -> tuple[int, int]:
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"mbf_kernels triton: {name} must have shape (N, d, d), got "
                         f"{tuple(A.shape)}")
    _check_float(name, A)
    _check_d(A.shape[1])
    return A.shape[0], A.shape[1]


def _rhs(B: Tensor, A: Tensor, a_name: str) -> int:
    if B.ndim != 3 or B.shape[:2] != A.shape[:2]:
        raise ValueError(f"mbf_kernels triton: B must have shape ({A.shape[0]}, {A.shape[1]}, k) "
                         f"to match {a_name}, got {tuple(B.shape)}")
    _check_like("B", B, a_name, A)
    return B.shape[2]


def _compact(name: str, C: Tensor, n: int, d: int) -> None:
    _check_float(name, C)
    _check_d(d)
    if tuple(C.shape) != compact_shape(n, d):
        raise ValueError(f"mbf_kernels triton: {name} must have the compact shape "
                         f"{compact_shape(n, d)} for {n} blocks of size {d}, got {tuple(C.shape)}")


def _rows(name: str, X: Tensor) -> tuple[int, int]:
    if X.ndim != 2:
        raise ValueError(f"mbf_kernels triton: {name} must have shape (N, d), got {tuple(X.shape)}")
    return X.shape[0], X.shape[1]


def _launch(kernel, grid, *args, **meta) -> None:
    """``wrap_triton(kernel)[grid](...)``, which torch.compile traces into. Triton's interpreter
    (CI) cannot run on the fake tensors that tracing passes: there the kernel is skipped, the
    outputs being allocated by the torch ops around it."""
    if triton_interpreted() and any(is_fake(a) for a in args if isinstance(a, Tensor)):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def _op(name: str, mutates_args):
    """Register ``fn`` as the op ``name``: see the module docstring."""
    def register(fn):
        if triton_interpreted():
            op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
            op.register_fake(fn)
            return op
        return triton_op(name, mutates_args=mutates_args)(fn)
    return register


def _grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def _nbin(n: int) -> int:
    """Size class in the tuning key: small and large batches may want different tiles."""
    return int(n >= 1 << 16)


# ---------------------------------------------------------------------------------------------
# Dense linalg ops


def _factor_op(kernel, A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Launch a kernel that factors each damped block of A into an (N, d, d) output and info."""
    n, d = _blocks("A", A)
    A = A.contiguous()
    out = torch.empty_like(A)
    info = torch.zeros(n, dtype=torch.int32, device=A.device)
    if n:
        _launch(kernel, _grid(n), A, out, info, n, damping, _nbin(n), D=d)
    return out, info


@_op("mbf_kernels::triton_cholesky_ex", mutates_args=())
def cholesky_ex(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """A (N, d, d) -> (L (N, d, d) lower, zero where info != 0; info (N,) int32)."""
    return _factor_op(K._dense_cholesky_kernel, A, damping)


@_op("mbf_kernels::triton_cholesky_solve", mutates_args=())
def cholesky_solve(B: Tensor, L: Tensor) -> Tensor:
    """B (N, d, k), L (N, d, d) lower -> X (N, d, k) = (L L^T)^{-1} B."""
    n, d = _blocks("L", L)
    k = _rhs(B, L, "L")
    L, B = L.contiguous(), B.contiguous()
    X = torch.empty_like(B)
    if n and k:
        _launch(K._dense_cholesky_solve_kernel, _grid(n), L, B, X, n, k, _nbin(n), D=d)
    return X


@_op("mbf_kernels::triton_solve_spd_ex", mutates_args=())
def solve_spd_ex(A: Tensor, B: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """A (N, d, d), B (N, d, k) -> (X (N, d, k), zero where info != 0; info (N,) int32)."""
    n, d = _blocks("A", A)
    k = _rhs(B, A, "A")
    A, B = A.contiguous(), B.contiguous()
    X = torch.zeros_like(B)
    info = torch.zeros(n, dtype=torch.int32, device=A.device)
    if n:
        # k = 0 still factors: info reports the failures.
        _launch(K._dense_solve_spd_kernel, _grid(n), A, B, X, info, n, k, damping, _nbin(n),
                D=d)
    return X, info


@_op("mbf_kernels::triton_inv_spd_ex", mutates_args=())
def inv_spd_ex(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """A (N, d, d) -> ((A + damping I)^{-1}, zero where info != 0; info (N,) int32)."""
    return _factor_op(K._dense_inv_spd_kernel, A, damping)


@_op("mbf_kernels::triton_outer_ema_", mutates_args={"F"})
def outer_ema_(F: Tensor, G: Tensor, beta: float) -> None:
    """In place on F (N, d, d) contiguous: F = beta F + (1 - beta) mean_s g_s g_s^T, G (N, S, d)."""
    n, d = _blocks("F", F)
    if G.ndim != 3 or G.shape[0] != n or G.shape[2] != d or G.shape[1] < 1:
        raise ValueError(f"mbf_kernels triton: G must have shape ({n}, S, {d}) with S >= 1, got "
                         f"{tuple(G.shape)}")
    _check_like("G", G, "F", F)
    if not F.is_contiguous():
        raise ValueError("mbf_kernels triton: F is updated in place and must be contiguous")
    G = G.contiguous()
    if n:
        _launch(K._dense_outer_ema_kernel, _grid(n), F, G, n, G.shape[1], beta, _nbin(n), D=d)


# ---------------------------------------------------------------------------------------------
# Compact-layout ops: the step's phases alone


@_op("mbf_kernels::triton_compact_outer_ema_", mutates_args={"F"})
def compact_outer_ema_(F: Tensor, G: Tensor, beta: float) -> None:
    """F compact (ceil(N/16), T, 16), in place; G (N, d): F = beta F + (1 - beta) g g^T."""
    n, d = _rows("G", G)
    _compact("F", F, n, d)
    _check_like("G", G, "F", F)
    if not F.is_contiguous():
        raise ValueError("mbf_kernels triton: F is updated in place and must be contiguous")
    G = G.contiguous()
    if n:
        _launch(K._compact_outer_ema_kernel, _grid(n), F, G, n, beta, _nbin(n), D=d)


@_op("mbf_kernels::triton_compact_cholesky_ex", mutates_args=())
def compact_cholesky_ex(F: Tensor, n_blocks: int, damping: float) -> tuple[Tensor, Tensor]:
    """F compact -> (factor compact, diagonal inverted, zero for failed blocks; info (N,) int32)."""
    if F.ndim != 3:
        raise ValueError(f"mbf_kernels triton: F must be a compact tensor, got {tuple(F.shape)}")
    d = tril_dim(F.shape[1])
    _compact("F", F, n_blocks, d)
    F = F.contiguous()
    L = torch.zeros_like(F)  # padding blocks: zeros, as the C++ op leaves them finite
    info = torch.zeros(n_blocks, dtype=torch.int32, device=F.device)
    if n_blocks:
        _launch(K._compact_cholesky_kernel, _grid(n_blocks), F, L, info, n_blocks, damping,
                _nbin(n_blocks), D=d)
    return L, info


@_op("mbf_kernels::triton_compact_solve", mutates_args=())
def compact_solve(factor: Tensor, B: Tensor) -> Tensor:
    """factor compact (diagonal inverted), B (N, d) -> X = (L L^T)^{-1} B, (N, d)."""
    n, d = _rows("B", B)
    _compact("factor", factor, n, d)
    _check_like("B", B, "factor", factor)
    factor, B = factor.contiguous(), B.contiguous()
    X = torch.empty_like(B)
    if n:
        _launch(K._compact_solve_kernel, _grid(n), factor, B, X, n, _nbin(n), D=d)
    return X


# ---------------------------------------------------------------------------------------------
# The fused optimizer step


def _bits(x: float) -> int:
    """A float64 as the int64 with the same bits (the table is one int64 tensor)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


class _TableCache:
    """Device copies of recent segment tables, keyed by their contents: the same parameters and
    gradient buffers give the same table every step, which then costs no host-to-device copy."""

    def __init__(self, size: int = 64) -> None:
        self._tables: OrderedDict[tuple, Tensor] = OrderedDict()
        self._size = size

    def get(self, values: list[int], device: torch.device) -> Tensor:
        key = (device, tuple(values))
        table = self._tables.get(key)
        if table is None:
            table = torch.tensor(values, dtype=torch.int64)
            if device.type == "cuda":
                table = table.pin_memory().to(device, non_blocking=True)
            self._tables[key] = table
            if len(self._tables) > self._size:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table


_TABLES = _TableCache()
_STEP_CONFIG: dict[tuple, tuple[int, int]] = {}


def _tune_step(d: int, dtype: torch.dtype, device: torch.device, *, nbytes: int = 256 << 20,
               timer=None) -> tuple[int, int]:
    """(BLOCK, num_warps) for the step kernels at block size d, timed once on a scratch bucket.

    ``triton.autotune`` cannot serve these kernels: it replays a kernel on the real arguments,
    and the step updates parameters that it reaches through the table, not as arguments, so
    the trial runs would move the model. The plain cached-factor step is what is timed (the
    step MBF takes T2 - 1 times out of T2), on a bucket of about 256 MB, so that the kernel, not
    its launch, is what the timer sees.
    """
    if timer is None:
        from triton.testing import do_bench

        def timer(fn):
            return do_bench(fn, warmup=5, rep=25)

    t = d * (d + 1) // 2
    n = max(16, nbytes // ((2 * t + 3 * d) * torch.finfo(dtype).bits // 8))
    p = torch.randn(n, d, dtype=dtype, device=device)
    g = torch.randn(n, d, dtype=dtype, device=device) * 1e-2
    m = torch.zeros_like(p)
    F = torch.zeros(compact_shape(n, d), dtype=dtype, device=device)
    L = torch.zeros_like(F)
    stats = torch.zeros(2, dtype=torch.int64, device=device)
    hyper = (1e-3, 0.9, 0.9, 0.1, 0.0, False)
    first = _StepLaunches([p], [g], [m], F, L, stats, [0, -1, n, 0, d, d, 0, 7, 1], *hyper)
    first.run(K.CONFIGS[0])  # a factor to step with
    cached = _StepLaunches([p], [g], [m], F, L, stats, [0, -1, n, 0, d, d, 0, 0, 2], *hyper)
    timings = {cfg: timer(lambda: cached.run(cfg)) for cfg in K.CONFIGS if K.fits(*cfg, d)}
    return min(timings, key=timings.get)


def _step_config(d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return K.CONFIGS[1]  # the interpreter: warps mean nothing, smaller tiles run faster
    key = (d, dtype, device.index)
    if key not in _STEP_CONFIG:
        _STEP_CONFIG[key] = _tune_step(d, dtype, device)
    return _STEP_CONFIG[key]


class _StepLaunches:
    """One call of the bucket op, checked and turned into kernel launches: a segment table per
    distinct set of flags (usually one per step: all units count their steps alike)."""

    def __init__(self, params, grads, momenta, curvature, factor, stats, segments, lr,
                 momentum_coef, beta, damping, weight_decay, decoupled_weight_decay,
                 second_moments=(), tile_damping=None, tile_scale=None, tile_norms=None,
                 beta2=0.999, eps=1e-8, mode=StepMode.WRITE) -> None:
        F, L = self.F, self.L = curvature, factor
        if F.ndim != 3 or F.shape[2] != COMPACT_TILE:
            raise ValueError(f"mbf_kernels triton: curvature must be a compact tensor (tiles, T, "
                             f"{COMPACT_TILE}), got {tuple(F.shape)}")
        self.d = d = tril_dim(F.shape[1])
        _check_float("curvature", F)
        _check_d(d)
        _check_like("factor", L, "curvature", F)
        if L.shape != F.shape or not (F.is_contiguous() and L.is_contiguous()):
            raise ValueError("mbf_kernels triton: factor must have curvature's shape, and both "
                             "must be contiguous (they are updated in place)")
        if stats.dtype != torch.int64 or stats.numel() != 2 or stats.device != F.device:
            raise ValueError(f"mbf_kernels triton: stats must be an int64 tensor of 2 counters "
                             f"on {F.device}")
        self.stats, self.decoupled = stats, bool(decoupled_weight_decay)
        if not len(params) == len(grads) == len(momenta):
            raise ValueError("mbf_kernels triton: params, grads and momenta must have the same "
                             "length")
        # Kept alive until the launches are queued (the caching allocator orders reuse after
        # them on the stream).
        self.grads = grads = [g.contiguous() for g in grads]
        for i, (p, g, m) in enumerate(zip(params, grads, momenta)):
            for name, t in (("params", p), ("grads", g), ("momenta", m)):
                _check_like(f"{name}[{i}]", t, "curvature", F)
            if g.shape != p.shape or m.shape != p.shape:
                raise ValueError(f"mbf_kernels triton: grads[{i}] and momenta[{i}] must have "
                                 f"shape {tuple(p.shape)}, got {tuple(g.shape)} and "
                                 f"{tuple(m.shape)}")
            if not (p.is_contiguous() and m.is_contiguous()):
                raise ValueError(f"mbf_kernels triton: params[{i}] and momenta[{i}] are updated "
                                 "in place and must be contiguous")
        mode = self.mode = StepMode(mode)
        graft = bool(mode & StepMode.GRAFT)
        for name, t, shape in (("tile_damping", tile_damping, (F.shape[0],)),
                               ("tile_scale", tile_scale, (F.shape[0],)),
                               ("tile_norms", tile_norms, (F.shape[0], 2, COMPACT_TILE))):
            if t is not None:
                _check_like(name, t, "curvature", F)
                if tuple(t.shape) != shape or not t.is_contiguous():
                    raise ValueError(f"mbf_kernels triton: {name} must be a contiguous tensor "
                                     f"of shape {shape}, got {tuple(t.shape)}")
        if graft:
            if tile_norms is None or (tile_scale is None and mode & StepMode.WRITE):
                raise ValueError("mbf_kernels triton: a grafted step (mode 2) needs tile_norms, "
                                 "and tile_scale to write")
            if len(second_moments) != len(params):
                raise ValueError(f"mbf_kernels triton: a grafted step needs one second moment "
                                 f"per params tensor, got {len(second_moments)} for "
                                 f"{len(params)}")
            for i, (p, v) in enumerate(zip(params, second_moments)):
                _check_like(f"second_moments[{i}]", v, "curvature", F)
                if v.shape != p.shape or not v.is_contiguous():
                    raise ValueError(f"mbf_kernels triton: second_moments[{i}] must be "
                                     f"contiguous with shape {tuple(p.shape)}")
        # Absent per-tile tensors are never read (constexpr flags): F stands in.
        self.tile_damping = tile_damping
        self.tiles = tuple(F if t is None else t for t in (tile_damping, tile_scale, tile_norms))
        streams = second_moments if graft else params
        size, base = F.element_size(), F.data_ptr()

        def offset(t: Tensor, elements: int) -> int:
            q, r = divmod(t.data_ptr() + elements * size - base, size)
            if r:
                raise ValueError("mbf_kernels triton: a tensor of the bucket is not aligned to "
                                 "its element size")
            return q

        groups: dict[int, tuple[list[int], list[int]]] = {}
        for main, tail, n, col, width, stride, tile0, flags, step in check_segments(
                "mbf_kernels triton", segments, [p.numel() for p in params], d, F.shape[0],
                graft):
            if n == 0:
                continue
            t = tail if tail >= 0 else main
            c1, s2 = graft_bias_corrections(momentum_coef, beta2, step) if graft else (1.0, 1.0)
            row = [offset(params[main], col), offset(grads[main], col),
                   offset(momenta[main], col), offset(params[t], 0), offset(grads[t], 0),
                   offset(momenta[t], 0), n, stride, tile0, int(tail >= 0),
                   offset(streams[main], col), offset(streams[t], 0), _bits(c1), _bits(s2)]
            fields, counts = groups.setdefault(flags, ([], []))
            fields += row
            counts.append(n)
        floor = damping ** -0.5 if damping > 0 else 1.0
        hyper = [_bits(x) for x in (lr, momentum_coef, beta, damping, weight_decay,
                                    lr * weight_decay, floor, beta2, eps)]
        self.launches = [(flags, _TABLES.get(fields + hyper, F.device), counts)
                         for flags, (fields, counts) in groups.items()]

    def run(self, config: tuple[int, int]) -> None:
        """Queue the kernels with tiles of config = (BLOCK, num_warps); on a refactor step the
        refactor kernel (with the refresh) runs first."""
        block, warps = config
        meta = dict(D=self.d, BLOCK=block, num_warps=warps, num_stages=1)
        write, graft = bool(self.mode & StepMode.WRITE), bool(self.mode & StepMode.GRAFT)
        damping, scale, norms = self.tiles
        for flags, table, counts in self.launches:
            grid = (sum(triton.cdiv(n, block) for n in counts),)
            refresh, first = bool(flags & _REFRESH), bool(flags & _FIRST)
            if flags & _REFACTOR:
                K._bucket_refactor_kernel[grid](self.F, self.L, table, self.stats, len(counts),
                                                damping, UPDATE_CURVATURE=refresh,
                                                FIRST_CURVATURE=first,
                                                TILE_DAMPING=self.tile_damping is not None,
                                                **meta)
                refresh = first = False
            if write or graft or refresh:
                K._bucket_step_kernel[grid](self.F, self.L, table, self.stats, len(counts),
                                            scale, norms, DECOUPLED=self.decoupled,
                                            UPDATE_CURVATURE=refresh, FIRST_CURVATURE=first,
                                            WRITE=write, GRAFT=graft, **meta)


@torch.library.custom_op("mbf_kernels::triton_bucket_step_",
                         mutates_args=("params", "momenta", "curvature", "factor", "stats",
                                       "second_moments", "tile_norms"))
def _bucket_step_op(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor],
                    curvature: Tensor, factor: Tensor, stats: Tensor, segments: list[int],
                    lr: float, momentum_coef: float, beta: float, damping: float,
                    weight_decay: float, decoupled_weight_decay: bool,
                    second_moments: list[Tensor], tile_damping: Tensor | None,
                    tile_scale: Tensor | None, tile_norms: Tensor | None, beta2: float,
                    eps: float, step_mode: int) -> None:
    # (not `mode`: torch's dispatch wrappers take an argument of that name)
    step = _StepLaunches(params, grads, momenta, curvature, factor, stats, segments, lr,
                         momentum_coef, beta, damping, weight_decay, decoupled_weight_decay,
                         second_moments, tile_damping, tile_scale, tile_norms, beta2, eps,
                         step_mode)
    if step.launches:
        step.run(_step_config(step.d, curvature.dtype, curvature.device))


@_bucket_step_op.register_fake
def _(params, grads, momenta, curvature, factor, stats, segments, lr, momentum_coef, beta,
      damping, weight_decay, decoupled_weight_decay, second_moments, tile_damping, tile_scale,
      tile_norms, beta2, eps, step_mode) -> None:
    return None


def mbf_bucket_step_(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor],
                     curvature: Tensor, factor: Tensor, stats: Tensor, segments: list[int], *,
                     lr: float, momentum_coef: float, beta: float, damping: float,
                     weight_decay: float, decoupled_weight_decay: bool,
                     second_moments: list[Tensor] = (), tile_damping: Tensor | None = None,
                     tile_scale: Tensor | None = None, tile_norms: Tensor | None = None,
                     beta2: float = 0.999, eps: float = 1e-8, mode: int = 1) -> None:
    """The fused step for a bucket of segments (layout: csrc/registration.cpp; arguments:
    mbf_kernels.reference.mbf_bucket_step_): one launch per distinct set of segment flags, each
    reading its segments' strided rows (and tails) in place and its own tiles of the bucket's
    compact state; stats on the state's device."""
    _bucket_step_op(params, grads, momenta, curvature, factor, stats, segments, lr,
                    momentum_coef, beta, damping, weight_decay, decoupled_weight_decay,
                    list(second_moments), tile_damping, tile_scale, tile_norms, beta2, eps,
                    int(mode))


def mbf_step_(param: Tensor, grad: Tensor, momentum: Tensor, curvature: Tensor, factor: Tensor,
              stats: Tensor, *, lr: float, momentum_coef: float, beta: float, damping: float,
              weight_decay: float, decoupled_weight_decay: bool, update_curvature: bool,
              first_curvature: bool, refactor: bool) -> None:
    """The fused step on one contiguous (N, d) bucket; curvature/factor compact."""
    n, d = _rows("param", param)
    flags = (int(_REFRESH) * update_curvature) | (int(_FIRST) * first_curvature) | (
        int(_REFACTOR) * refactor)
    mbf_bucket_step_([param], [grad], [momentum], curvature, factor, stats,
                     [0, -1, n, 0, d, d, 0, flags, 1], lr=lr, momentum_coef=momentum_coef,
                     beta=beta, damping=damping, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay)
