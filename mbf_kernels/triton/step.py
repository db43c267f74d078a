"""The fused MBF step over a bucket of segments in Triton: kernels and host launcher of
``mbf_bucket_step_`` for ``backend="triton"``, the opaque custom op
``mbf_kernels::triton_bucket_step_`` with its mutations declared (its kernel reaches every
parameter, gradient and momentum of a bucket through offsets in a segment table, one launch for
any number of tensors, which no tracer can follow).

The math is :func:`mbf_kernels.reference.mbf_bucket_step_` (MBF_SPEC sections 3-3b): momentum,
optional curvature EMA (skipped for a block whose gradient is not finite, counted), solve with
the cached factor and update, in one pass; on a refactor step (every T2-th) a refactor kernel
runs first: refresh, factor, and for a failed block the diagonal fallback (MBF_SPEC section 4).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.testing import do_bench

from ..layout import (SegmentFlags, StepMode, check_bucket_step_fake,
                      compact_shape)
from ..limits import triton_autotune
from ..packed import tril_dim
from ._common import CONFIGS, check_step_tensors, fits, vector_rows
from .tables import TABLE_ROW, launch_scalars, segment_launches
from ._tuples import (cholesky, compact_base, diagonal_fallback, direction_entry, ema, load_tri,
                      moved, outer, pack, pow2, round_bf16, select, solve, store_tri, unpack)

__all__ = ["mbf_bucket_step_", "mbf_step_"]

_REFRESH, _FIRST, _REFACTOR = SegmentFlags.REFRESH, SegmentFlags.FIRST, SegmentFlags.REFACTOR
# The step kernel's segment table: SEG_FIELDS int64 per segment (offsets, in elements from the
# curvature's first, of p, g, m and of their tails; n_blocks, row stride, first tile, has a tail;
# the offsets of Adam's v and its tail when grafting). Its scalars (float64, tables.py's
# launch_scalars): lr, momentum, beta, damping, weight_decay, lr * weight_decay, the fallback
# floor, beta2, eps, then grafting's bias corrections c1 and s2 at the launch's step.
(SEG_P, SEG_G, SEG_M, SEG_PT, SEG_GT, SEG_MT, SEG_N, SEG_STRIDE, SEG_TILE, SEG_TAIL, SEG_V,
 SEG_VT) = (tl.constexpr(i) for i in range(12))
SEG_FIELDS = tl.constexpr(TABLE_ROW)


@triton.jit
def _load_rows(ptr, tail, rows, blocks, mask, has_tail, D: tl.constexpr):
    """Each lane's block vector: D - has_tail values at ``ptr + rows``, then ``tail[block]``
    when the segment has a tail (a Linear bias joined to its weight row)."""
    i = tl.arange(0, pow2(D))
    width = D - has_tail
    v = unpack(tl.load(ptr + rows[:, None] + i[None, :],
                        mask=mask[:, None] & (i[None, :] < width[:, None]), other=0.0), D)
    t = tl.load(tail + blocks, mask=mask & (has_tail != 0), other=0.0)
    out = ()
    for j in tl.static_range(D - 1):
        out = out + (v[j],)
    return out + (tl.where(has_tail != 0, t, v[D - 1]),)


@triton.jit
def _store_rows(ptr, tail, rows, blocks, mask, has_tail, v, D: tl.constexpr):
    i = tl.arange(0, pow2(D))
    width = D - has_tail
    tl.store(ptr + rows[:, None] + i[None, :], pack(v, D, pow2(D)).to(ptr.dtype.element_ty),
             mask=mask[:, None] & (i[None, :] < width[:, None]))
    tl.store(tail + blocks, v[D - 1].to(tail.dtype.element_ty), mask=mask & (has_tail != 0))


@triton.jit
def _hyper(scalars, k):
    return tl.load(scalars + k)


@triton.jit
def _segment_blocks(table, n_seg, BLOCK: tl.constexpr):
    """This program's segment of the table and its blocks there: (row of the table, blocks,
    mask, has_tail per lane, the blocks' row offsets). Programs are dealt to the segments in
    order, ceil(n / BLOCK) each (a scalar scan over the table)."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.full([], 0, tl.int64)
    first = tl.full([], 0, tl.int64)
    start = tl.full([], 0, tl.int64)
    for s in range(n_seg):
        count = tl.cdiv(tl.load(table + s * SEG_FIELDS + SEG_N), BLOCK)
        hit = (pid >= start) & (pid < start + count)
        seg = tl.where(hit, s, seg)
        first = tl.where(hit, start, first)
        start += count
    row = table + seg * SEG_FIELDS
    blocks = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    mask = blocks < tl.load(row + SEG_N)
    # 0 or 1 per lane: the interpreter mistypes a vector mask combined with a scalar one
    has_tail = tl.zeros_like(blocks) + tl.load(row + SEG_TAIL)
    return row, blocks, mask, has_tail, blocks * tl.load(row + SEG_STRIDE)


@triton.jit
def _refresh(F, state, mask, g, beta64, FIRST: tl.constexpr, D: tl.constexpr):
    """Curvature refresh of each lane's block, stored; blocks whose gradient is not finite keep
    their F. Returns (the block's F after the step, finite per lane)."""
    T: tl.constexpr = D * (D + 1) // 2
    dt = F.dtype.element_ty
    finite = tl.abs(g[0]) < float("inf")
    for i in tl.static_range(1, D):
        finite = finite & (tl.abs(g[i]) < float("inf"))
    c = outer(g, D)
    if FIRST:
        old = load_tri(F, state, mask & (finite == 0), D, True)  # kept by skipped blocks
        f = c
    else:
        old = load_tri(F, state, mask, D, True)
        f = ema(old, c, beta64.to(dt), (1 - beta64).to(dt), T)
    f = select(finite, f, old, T)
    store_tri(F, state, mask & finite, f, D)
    return f, finite


# Lane masks apply to memory and counts only: per-lane math stays in the layout of the unpacked
# tiles (mixing in the mask's layout slowed Triton's layout pass several-fold).


@triton.jit
def _tiles(row, blocks):
    """(compact tile, lane in it) of each lane's block of the bucket state."""
    state_block = blocks + tl.load(row + SEG_TILE) * 16
    return state_block // 16, state_block % 16


@triton.jit
def _bucket_refactor_kernel(F, L, table, hyper, stats, n_seg, TD, UPDATE_CURVATURE: tl.constexpr,
                            FIRST_CURVATURE: tl.constexpr, TILE_DAMPING: tl.constexpr,
                            BF16_FACTOR: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """The refactor phase of a step (every T2-th): optional curvature refresh, then the factor
    of F + damping I, a failed block getting the diagonal fallback; F and L stored. The step
    kernel follows with the cached factor. Apart, because the factorisation and the solve in
    one kernel compiled in 13 s at d = 9 and 260 s at d = 16 (Triton's layout passes), for one
    more read of g and L every T2 steps. Table layout: _bucket_step_kernel."""
    T: tl.constexpr = D * (D + 1) // 2
    row, blocks, mask, has_tail, rows = _segment_blocks(table, n_seg, BLOCK)
    damping = _hyper(hyper, 3).to(F.dtype.element_ty)
    floor = _hyper(hyper, 6).to(F.dtype.element_ty)
    if TILE_DAMPING:  # relative damping: one value per compact tile (its unit's)
        tile, _ = _tiles(row, blocks)
        damping = tl.load(TD + tile, mask=mask, other=1.0)
        floor = tl.where(damping > 0, 1.0 / tl.sqrt(tl.maximum(damping, 1e-30)), 1.0).to(
            F.dtype.element_ty)
    state = compact_base(blocks + tl.load(row + SEG_TILE) * 16, T)
    if UPDATE_CURVATURE:
        g = _load_rows(F + tl.load(row + SEG_G), F + tl.load(row + SEG_GT), rows, blocks, mask,
                       has_tail, D)
        f, finite = _refresh(F, state, mask, g, _hyper(hyper, 2), FIRST_CURVATURE, D)
        skipped = tl.sum((mask & (finite == 0)).to(tl.int64), axis=0)
        tl.atomic_add(stats, skipped, mask=skipped > 0)
    else:
        f = load_tri(F, state, mask, D, True)
    l, info = cholesky(f, damping, D)
    l = diagonal_fallback(l, f, info != 0, damping, floor, D)
    if BF16_FACTOR:
        rounded = ()
        for e in tl.static_range(T):
            rounded = rounded + (round_bf16(l[e]),)
        l = rounded
    store_tri(L, state, mask, l, D)
    n_failed = tl.sum((mask & (info != 0)).to(tl.int64), axis=0)
    tl.atomic_add(stats + 1, n_failed, mask=n_failed > 0)


@triton.jit
def _graft_measure(F, TN, DIR, BV, row, hyper, rows, blocks, mask, has_tail, direction, mom, u,
                   D: tl.constexpr, STORE_U: tl.constexpr, BLOCK_V: tl.constexpr):
    """A grafted step's measuring pass (MBF_SPEC 3b) in the step kernel: Adam's v updated
    from the step's direction and stored (per entry, or with BLOCK_V one per block in BV
    (tiles, 16): the EMA of the block's mean d^2), each block's [|u|^2, |a|^2] stored to TN
    (tiles, 2, 16) for the unit reductions and, with STORE_U, its u to DIR (tiles, D, 16)."""
    dt = F.dtype.element_ty
    tile, lane = _tiles(row, blocks)
    beta2 = _hyper(hyper, 7).to(dt)
    eps = _hyper(hyper, 8).to(dt)
    c1 = _hyper(hyper, 9).to(dt)
    s2 = _hyper(hyper, 10).to(dt)
    su = tl.zeros_like(u[0])
    sa = tl.zeros_like(u[0])
    if BLOCK_V:
        squares = direction[0] * direction[0]
        for i in tl.static_range(1, D):
            squares += direction[i] * direction[i]
        v_b = (beta2 * tl.load(BV + tile * 16 + lane, mask=mask, other=0.0)
               + (1 - beta2) * (squares / D))
        tl.store(BV + tile * 16 + lane, v_b.to(dt), mask=mask)
        scale = c1 / (s2 * tl.sqrt(v_b) + eps)  # one denominator per block
        for i in tl.static_range(D):
            a = scale * mom[i]
            su += u[i] * u[i]
            sa += a * a
    else:
        v_ptr = F + tl.load(row + SEG_V)
        vt_ptr = F + tl.load(row + SEG_VT)
        v = _load_rows(v_ptr, vt_ptr, rows, blocks, mask, has_tail, D)
        new_v = ()
        for i in tl.static_range(D):
            new_v = new_v + (beta2 * v[i] + (1 - beta2) * direction[i] * direction[i],)
            a = c1 * mom[i] / (s2 * tl.sqrt(new_v[i]) + eps)
            su += u[i] * u[i]
            sa += a * a
        _store_rows(v_ptr, vt_ptr, rows, blocks, mask, has_tail, new_v, D)
    # A block whose norms are not finite (a NaN gradient) is left out of its unit's.
    ok = (tl.abs(su) < float("inf")) & (tl.abs(sa) < float("inf"))
    su = tl.where(ok & mask, su, 0.0)
    sa = tl.where(ok & mask, sa, 0.0)
    # Padding blocks of the segment's last tile get zeros too.
    tile_mask = blocks < tl.cdiv(tl.load(row + SEG_N), 16) * 16
    tl.store(TN + tile * 32 + lane, su.to(dt), mask=tile_mask)
    tl.store(TN + tile * 32 + 16 + lane, sa.to(dt), mask=tile_mask)
    if STORE_U:
        for i in tl.static_range(D):
            tl.store(direction_entry(DIR, tile, lane, i, D), u[i].to(dt), mask=mask)


@triton.jit
def _bucket_step_kernel(F, L, table, hyper, stats, n_seg, TS, TN, DIR, BV,
                        DECOUPLED: tl.constexpr, UPDATE_CURVATURE: tl.constexpr,
                        FIRST_CURVATURE: tl.constexpr, WRITE: tl.constexpr, GRAFT: tl.constexpr,
                        LAGGED: tl.constexpr, BLOCK_V: tl.constexpr, D: tl.constexpr,
                        BLOCK: tl.constexpr):
    """One MBF step with the cached factor (and an optional curvature refresh) for the segments
    of a bucket that share this step's flags.

    ``table`` holds SEG_FIELDS int64 per segment, ``hyper`` the launch's scalars. A
    segment's blocks are rows ``[0, n)`` of a strided view: block i reads D - has_tail values at
    ``F + p_off + i * row_stride`` (likewise g, m, v: every stream is addressed from F, the
    bucket's curvature, so one kernel serves any number of parameter tensors), then
    ``F + tail_off + i`` when it has a tail. Its state is compact tiles from ``tile`` on of F
    (curvature) and L (factor). stats (int64 (2,)) += [skipped curvature refreshes, failed
    factorisations]. WRITE: the paper's pass, m and p stored. GRAFT (MBF_SPEC 3b, StepMode,
    mbf_kernels.reference.mbf_bucket_step_): the measuring pass, m and Adam's v stored, each
    block's [|u|^2, |a|^2] to TN (tiles, 2, 16) and u to DIR (tiles, D, 16); BLOCK_V: v one per
    block in BV (tiles, 16), not per entry (graft_second_moment="block"). Both: the writing
    pass, p moved by DIR scaled by TS (tiles,). Both and LAGGED: the grafted step in one pass,
    the measuring pass's stores but u's, and p moved by u scaled by TS (the previous step's
    ratios). Neither: the refresh alone.
    """
    T: tl.constexpr = D * (D + 1) // 2
    dt = F.dtype.element_ty
    row, blocks, mask, has_tail, rows = _segment_blocks(table, n_seg, BLOCK)
    lr = _hyper(hyper, 0).to(dt)
    rho = _hyper(hyper, 1).to(dt)
    wd = _hyper(hyper, 4).to(dt)
    lr_wd = _hyper(hyper, 5).to(dt)
    state = compact_base(blocks + tl.load(row + SEG_TILE) * 16, T)
    APPLY: tl.constexpr = WRITE and GRAFT and not LAGGED  # the writing pass: no g, m, v, L
    if UPDATE_CURVATURE or not APPLY:
        g = _load_rows(F + tl.load(row + SEG_G), F + tl.load(row + SEG_GT), rows, blocks, mask,
                       has_tail, D)
    if UPDATE_CURVATURE:
        f, finite = _refresh(F, state, mask, g, _hyper(hyper, 2), FIRST_CURVATURE, D)
        skipped = tl.sum((mask & (finite == 0)).to(tl.int64), axis=0)
        tl.atomic_add(stats, skipped, mask=skipped > 0)
    if APPLY:
        p_ptr = F + tl.load(row + SEG_P)
        pt_ptr = F + tl.load(row + SEG_PT)
        p = _load_rows(p_ptr, pt_ptr, rows, blocks, mask, has_tail, D)
        tile, lane = _tiles(row, blocks)
        lr_u = lr * tl.load(TS + tile, mask=mask, other=0.0)
        u = ()
        for i in tl.static_range(D):
            u = u + (tl.load(direction_entry(DIR, tile, lane, i, D), mask=mask, other=0.0),)
        _store_rows(p_ptr, pt_ptr, rows, blocks, mask, has_tail,
                    moved(p, u, lr_u, lr_wd, DECOUPLED, D), D)
    elif WRITE or GRAFT:
        stored = load_tri(L, state, mask, D, True)
        l = ()
        for e in tl.static_range(T):  # a bfloat16 factor (factor_dtype) widened as read
            l = l + (stored[e].to(dt),)
        p_ptr = F + tl.load(row + SEG_P)
        pt_ptr = F + tl.load(row + SEG_PT)
        m_ptr = F + tl.load(row + SEG_M)
        mt_ptr = F + tl.load(row + SEG_MT)
        p = _load_rows(p_ptr, pt_ptr, rows, blocks, mask, has_tail, D)
        m = _load_rows(m_ptr, mt_ptr, rows, blocks, mask, has_tail, D)
        direction = ()
        mom = ()
        for i in tl.static_range(D):
            if DECOUPLED:
                direction = direction + (g[i],)
            else:
                direction = direction + (g[i] + wd * p[i],)
            mom = mom + (rho * m[i] + direction[i],)
        u = solve(l, mom, D)
        _store_rows(m_ptr, mt_ptr, rows, blocks, mask, has_tail, mom, D)
        if GRAFT:
            _graft_measure(F, TN, DIR, BV, row, hyper, rows, blocks, mask, has_tail, direction,
                           mom, u, D, not LAGGED, BLOCK_V)
        if LAGGED:
            lr_u = lr * tl.load(TS + _tiles(row, blocks)[0], mask=mask, other=0.0)
            _store_rows(p_ptr, pt_ptr, rows, blocks, mask, has_tail,
                        moved(p, u, lr_u, lr_wd, DECOUPLED, D), D)
        elif not GRAFT:
            _store_rows(p_ptr, pt_ptr, rows, blocks, mask, has_tail,
                        moved(p, u, lr, lr_wd, DECOUPLED, D), D)


# ---------------------------------------------------------------------------------------------
# Host launcher


_STEP_CONFIG: dict[tuple, tuple[int, int]] = {}


def _tune_step(d: int, dtype: torch.dtype, device: torch.device, *, nbytes: int = 256 << 20,
               timer=None) -> tuple[int, int]:
    """(BLOCK, num_warps) for the step kernels at block size d, timed once on a scratch bucket
    of about 256 MB (the kernel, not its launch), in the cached-factor step MBF takes T2 - 1
    times out of T2. Not ``triton.autotune``: it replays a kernel on the real arguments, and the
    step updates parameters it reaches through the table, so trials would move the model."""
    if timer is None:
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
    every = int(_REFRESH | _FIRST | _REFACTOR)
    first = _StepLaunches([p], [g], [m], F, L, stats, [0, -1, n, 0, d, d, 0, every, 1], *hyper)
    first.run(CONFIGS[0])  # a factor to step with
    cached = _StepLaunches([p], [g], [m], F, L, stats, [0, -1, n, 0, d, d, 0, 0, 2], *hyper)
    timings = {cfg: timer(lambda: cached.run(cfg)) for cfg in CONFIGS if fits(*cfg, d)}
    return min(timings, key=timings.get)


def _step_config(d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return CONFIGS[1]  # the interpreter: warps mean nothing, smaller tiles run faster
    if not triton_autotune():
        return CONFIGS[0]  # MBF_TRITON_AUTOTUNE=0
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
                 directions=None, beta2=0.999, eps=1e-8, mode=StepMode.WRITE,
                 block_second_moment=None, *, checked: bool = False) -> None:
        F = self.F = curvature
        self.L, self.stats, self.decoupled = factor, stats, bool(decoupled_weight_decay)
        # (checked: the caller owns the tensors, owned_bucket_step_)
        self.d = tril_dim(F.shape[1]) if checked else check_step_tensors(
            params, grads, momenta, F, factor, stats, second_moments, tile_damping, tile_scale,
            tile_norms, directions, mode, block_second_moment)
        mode = self.mode = StepMode(mode)
        graft = mode.measures  # the passes that read v
        self.block_v = block_second_moment if graft else None
        # Kept alive until the launches are queued (the caching allocator orders reuse after
        # them on the stream).
        self.grads = grads = [g.contiguous() for g in grads]
        # Absent per-tile tensors are never read (constexpr flags): F stands in.
        self.tile_damping = tile_damping
        self.tiles = tuple(F if t is None else t
                           for t in (tile_damping, tile_scale, tile_norms, directions))
        self.launches = segment_launches(F, params, grads, momenta,
                                         second_moments if graft and self.block_v is None
                                         else params, segments, self.d, graft)
        floor = damping ** -0.5 if damping > 0 else 1.0
        hyper = (lr, momentum_coef, beta, damping, weight_decay, lr * weight_decay, floor, beta2,
                 eps)
        self.scalars = (launch_scalars(self.launches, hyper, graft, momentum_coef, beta2,
                                       F.device).unbind(0) if self.launches else ())

    def run(self, config: tuple[int, int]) -> None:
        """Queue the kernels with tiles of config = (BLOCK, num_warps); on a refactor step the
        refactor kernel (with the refresh) runs first."""
        block, warps = config
        meta = dict(D=self.d, BLOCK=block, num_warps=warps, num_stages=1)
        write, graft, lagged = (bool(self.mode & bit) for bit in StepMode)
        damping, scale, norms, directions = self.tiles
        for launch, scalars in zip(self.launches, self.scalars):
            flags, table, counts = launch.flags, launch.table, launch.counts
            grid = (launch.programs(block),)
            refresh, first = bool(flags & _REFRESH), bool(flags & _FIRST)
            if flags & _REFACTOR:
                _bucket_refactor_kernel[grid](self.F, self.L, table, scalars, self.stats,
                                                len(counts), damping,
                                                UPDATE_CURVATURE=refresh,
                                                FIRST_CURVATURE=first,
                                                TILE_DAMPING=self.tile_damping is not None,
                                                BF16_FACTOR=self.L.dtype == torch.bfloat16,
                                                **meta)
                refresh = first = False
            if write or graft or refresh:
                block_v = self.block_v
                _bucket_step_kernel[grid](self.F, self.L, table, scalars, self.stats,
                                            len(counts), scale, norms, directions,
                                            self.F if block_v is None else block_v,
                                            DECOUPLED=self.decoupled,
                                            UPDATE_CURVATURE=refresh, FIRST_CURVATURE=first,
                                            WRITE=write, GRAFT=graft, LAGGED=lagged,
                                            BLOCK_V=block_v is not None, **meta)


def _bucket_step(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor],
                    curvature: Tensor, factor: Tensor, stats: Tensor, segments: list[int],
                    lr: float, momentum_coef: float, beta: float, damping: float,
                    weight_decay: float, decoupled_weight_decay: bool,
                    second_moments: list[Tensor], tile_damping: Tensor | None,
                    tile_scale: Tensor | None, tile_norms: Tensor | None,
                    directions: Tensor | None, beta2: float, eps: float,
                    step_mode: int, block_second_moment: Tensor | None = None) -> None:
    # (not `mode`: torch's dispatch wrappers take an argument of that name)
    _launch(_StepLaunches(params, grads, momenta, curvature, factor, stats, segments, lr,
                          momentum_coef, beta, damping, weight_decay, decoupled_weight_decay,
                          second_moments, tile_damping, tile_scale, tile_norms, directions,
                          beta2, eps, step_mode, block_second_moment))


def _launch(step: _StepLaunches) -> None:
    if step.launches:
        step.run(_step_config(step.d, step.F.dtype, step.F.device))


_bucket_step_op = torch.library.custom_op(
    "mbf_kernels::triton_bucket_step_", _bucket_step,
    mutates_args=("params", "momenta", "curvature", "factor", "stats", "second_moments",
                  "tile_norms", "directions", "block_second_moment"))


@_bucket_step_op.register_fake
def _(params, grads, momenta, curvature, factor, stats, segments, *hyper_parameters) -> None:
    check_bucket_step_fake(params, grads, momenta, curvature, factor, stats, segments)


def mbf_bucket_step_(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor],
                     curvature: Tensor, factor: Tensor, stats: Tensor, segments: list[int], *,
                     lr: float, momentum_coef: float, beta: float, damping: float,
                     weight_decay: float, decoupled_weight_decay: bool,
                     second_moments: list[Tensor] = (), tile_damping: Tensor | None = None,
                     tile_scale: Tensor | None = None, tile_norms: Tensor | None = None,
                     directions: Tensor | None = None, beta2: float = 0.999, eps: float = 1e-8,
                     mode: int = 1, block_second_moment: Tensor | None = None,
                     _owned: bool = False) -> None:
    """The fused step for a bucket of segments (layout: csrc/registration.cpp; arguments:
    mbf_kernels.reference.mbf_bucket_step_): one launch per distinct set of segment flags, each
    reading its segments' strided rows (and tails) in place and its own tiles of the bucket's
    compact state; stats on the state's device.

    Outside torch.compile this calls the launcher itself, not the registered op: the op's
    eager wrapping (autograd, in-place version counters, alias checks) took 0.6 ms of the 1.5 ms
    per call on the dev VM, and a small model's GPU step is its host time (bench/RESULTS.md,
    the H200 run). Under torch.compile the op is what gets traced. ``_owned``:
    :data:`owned_bucket_step_`."""
    _entry(_owned, params, grads, momenta, curvature, factor, stats, segments, lr, momentum_coef,
           beta, damping, weight_decay, decoupled_weight_decay, list(second_moments),
           tile_damping, tile_scale, tile_norms, directions, beta2, eps, int(mode),
           block_second_moment)


def _entry(checked: bool, *args) -> None:
    if torch.compiler.is_compiling():
        _bucket_step_op(*args)
    else:
        _launch(_StepLaunches(*args, checked=checked))


#: :func:`mbf_bucket_step_` without its per-tensor checks, for the optimizer, which made every
#: tensor it passes but the gradients (state, factor, counters, scratch) and checked those
#: (dtype and layout: buckets.bucket_call; torch checks a ``.grad``'s shape, dtype and device
#: when it is set). The segments are still checked, once per layout and tensors. The checks
#: were a fifth of a ResNet-32 step's host time (dev VM, launches mocked).
owned_bucket_step_ = functools.partial(mbf_bucket_step_, _owned=True)


def mbf_step_(param: Tensor, grad: Tensor, momentum: Tensor, curvature: Tensor, factor: Tensor,
              stats: Tensor, *, lr: float, momentum_coef: float, beta: float, damping: float,
              weight_decay: float, decoupled_weight_decay: bool, update_curvature: bool,
              first_curvature: bool, refactor: bool) -> None:
    """The fused step on one contiguous (N, d) bucket; curvature/factor compact."""
    n, d = vector_rows("param", param)
    flags = (int(_REFRESH) * update_curvature) | (int(_FIRST) * first_curvature) | (
        int(_REFACTOR) * refactor)
    mbf_bucket_step_([param], [grad], [momentum], curvature, factor, stats,
                     [0, -1, n, 0, d, d, 0, flags, 1], lr=lr, momentum_coef=momentum_coef,
                     beta=beta, damping=damping, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay)
