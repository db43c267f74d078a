"""A param group's plan (buckets of blocks of one size, and shared blocks) and the step of its
buckets through the fused op ``mbf_bucket_step_``: one kernel call per bucket and pass, which
reads every parameter, gradient and momentum in place, whatever layer it belongs to.

Grafting and relative damping reduce per-block values to units on the device with index
tensors built once (:func:`plan_unit_reductions`): no Python loop over layers, no host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..dispatch import cpu_ops, module, select
from ..layout import (COMPACT_TILE, SEGMENT_FIELDS, SegmentFlags, StepMode, n_tiles,
                      unit_factor_fits)
from ..reference import relative_damping
from .blocks import Unit
from .fsdp import LocalShards
from .options import factor_storage, graft_lag_warmup, momentum_coef
from .shared import SharedSet
from .shared_block import SharedBlock

# State keys (per parameter in ``optimizer.state``; the block state is added by state_dict()).
STEP = "step"  # int: step() calls that saw a gradient for this unit (kept on its first param)
MOMENTUM = "momentum_buffer"
SECOND_MOMENT = "exp_avg_sq"  # graft="adam": Adam's v of the step's direction, as AdamW names it

# Plain ints: IntFlag's operators run in Python, thousands of times a step on a small model.
REFRESH, FIRST, REFACTOR = (int(SegmentFlags.REFRESH), int(SegmentFlags.FIRST),
                            int(SegmentFlags.REFACTOR))
_FLAGS_FIELD = 7  # index of the flags in a segment's SEGMENT_FIELDS ints


@dataclass
class Bucket:
    """The blocks of one size in one param group: segments and their compact state."""

    d: int
    dtype: torch.dtype
    device: torch.device
    entries: list[tuple[Unit, object, int]] = field(default_factory=list)  # (unit, seg, tile0)
    tiles: int = 0
    curvature: Tensor | None = None
    factor: Tensor | None = None
    stats: Tensor | None = None
    step_fn: Callable | None = None  # the mbf_bucket_step_ serving it (at first step)
    layout: "BucketLayout | None" = None  # the calls' static part (at first step)
    # Per compact tile / block, for grafting and relative damping (index into the group's units;
    # padding blocks map to one slot past the last unit).
    tile_unit: Tensor | None = None  # (tiles,) int64
    block_unit: Tensor | None = None  # (tiles * 16,) int64
    entry_tiles: Tensor | None = None  # (entries,) int64: each entry's tiles, in tile order
    entry_unit: Tensor | None = None  # (entries,) int64
    # (tiles, 2, 16): [|u_b|^2, |a_b|^2] of each block; (tiles, 2, 1) their sums per tile on
    # the CPU's C++ ops, whose step adds them up (the graft needs them per unit only)
    tile_norms: Tensor | None = None
    tile_scale: Tensor | None = None  # (tiles,): the graft's lr multiplier of each tile's unit
    tile_damping: Tensor | None = None  # (tiles,): the relative damping of each tile's unit
    # graft="adam": each block's direction u between a step's two passes, compact (tiles, d, 16)
    # (scratch_directions); None between two-pass steps under graft_norms="previous"
    directions: Tensor | None = None
    # graft_second_moment="block": Adam's v one per block, compact (tiles, 16); None: per entry,
    # each parameter's SECOND_MOMENT
    block_second_moment: Tensor | None = None

    def scratch_directions(self) -> Tensor:
        """The buffer a two-pass grafted step keeps its directions in (made at first use)."""
        if self.directions is None:
            self.directions = torch.zeros(self.tiles, self.d, COMPACT_TILE, dtype=self.dtype,
                                          device=self.device)
        return self.directions

    def release_directions(self, group: dict) -> None:
        """After a two-pass grafted step: under graft_norms="previous", whose steps take two
        passes only at refactors and in the warm-up, the buffer is let go (4 B per element of
        float32 state between those steps); under "current" every step reuses it."""
        if group["graft_norms"] == "previous":
            self.directions = None

    def step_function(self, backend: str) -> Callable:
        """The ``mbf_bucket_step_`` serving this bucket, chosen once for its device and block
        size (a plain function, which deep-copies with the optimizer where a module would
        not). The counters live on the bucket's device: adding to them never syncs."""
        if self.step_fn is None:
            module = select(backend, self.device, differentiable=False, fn="MBF", d=self.d,
                            step=True)
            self.stats = torch.zeros(2, dtype=torch.int64, device=self.device)
            # (the Triton module's entry without the per-tensor checks, for tensors MBF made)
            self.step_fn = getattr(module, "owned_bucket_step_", module.mbf_bucket_step_)
        return self.step_fn

    def factor_dtype(self, group: dict) -> torch.dtype:
        """The storage of this bucket's factor, for a float32 bucket of a group whose
        ``factor_dtype`` asks for one (options.factor_storage) where its step reads it: int8
        (a unit factor, layout.unit_factor_rows) where layout.unit_factor_fits and the step is
        the cpu or torch backend's, bfloat16 (asked for, or in place of int8) on the cpu, triton
        and torch backends and the CUDA kernels' hot block sizes; else the state's dtype."""
        storage = factor_storage(group)
        if storage == "state" or self.dtype != torch.float32:
            return self.dtype
        readers = (module("cpu").mbf_bucket_step_, module("torch").mbf_bucket_step_)
        if (storage == "int8" and unit_factor_fits(self.d, self.device)
                and self.step_function(group["backend"]) in readers):
            return torch.int8
        cuda = module("cuda")
        if (self.device.type == "cuda" and self.step_function(group["backend"]) is
                cuda.mbf_bucket_step_ and self.d not in cuda.build_info()["hot_block_sizes"]):
            return self.dtype
        return torch.bfloat16


@dataclass
class GroupPlan:
    units: list[Unit]
    buckets: list[Bucket]
    shared: list[SharedSet]  # one per state dtype and device
    diagonal_count: Tensor | None = None  # (units + 1,): diagonal entries of each unit's blocks
    # Sharded (shard_curvature): ``units`` are this rank's; every rank's, and the exchange of
    # the updated parameters after a step.
    all_units: list[Unit] | None = None  # None: ``units`` (not sharded)
    sync: Callable[[], None] | None = None
    unit_states: list[dict] = field(default_factory=list)  # all_units' state dicts
    shards: LocalShards | None = None  # FSDP2: the local shards stepped, the mesh's group
    # The buckets bound to one C++ call for the step's common case (at first use; False: this
    # plan does not qualify). Rebuilt in a copy: its tensors are the original's.
    bound: object = None  # bound.BoundBuckets | bool | None
    # graft_norms="previous": per unit, whether its last ratio (graft_ratios) was measured, by
    # a grafted step or a load of a state that saved it, and whether every unit's was.
    graft_measured: list[bool] = field(default_factory=list)
    graft_ready: bool = False

    def __post_init__(self) -> None:
        if self.all_units is None:
            self.all_units = self.units
        self.forget_graft_ratios()

    def forget_graft_ratios(self) -> None:
        """Mark every unit's graft ratio unmeasured (a new plan, a load)."""
        self.graft_measured = [False] * len(self.units)
        self.graft_ready = not self.units

    def lags_graft(self, group: dict, flags: dict[int, int], steps: dict[int, int]) -> bool:
        """Whether this step of the buckets grafts in one pass at the previous step's ratios
        (``graft_norms="previous"``, docs/options.md): every stepping unit has a measured
        ratio and is past :func:`graft_lag_warmup`, and none refactors (a new factor changes
        |u|: that step measures its own ratios, in two passes, one step in T2)."""
        if group["graft"] != "adam" or group["graft_norms"] != "previous":
            return False
        if min(steps.values()) <= graft_lag_warmup(group):
            return False
        if any(f & REFACTOR for f in flags.values()):
            return False
        return self.graft_ready or all(measured or id(u) not in flags
                                       for u, measured in zip(self.units, self.graft_measured))

    def graft_ratios(self, unit: Unit) -> list[Tensor]:
        """Where ``unit``'s last graft ratio is kept: the views of the buckets' ``tile_scale``
        over its tiles (none before :func:`plan_unit_reductions`), or its shared block's entry
        of :attr:`SharedSet.ratios`; all hold the same value."""
        for s in self.shared:
            for i, b in enumerate(s.blocks):
                if b.unit is unit:
                    return [s.ratios[i:i + 1]]
        return [b.tile_scale[tile0:tile0 + n_tiles(seg.n_blocks)] for b in self.buckets
                if b.tile_scale is not None for u, seg, tile0 in b.entries if u is unit]

    def graft_measured_now(self, flags: dict[int, int]) -> None:
        """Record that a grafted step measured the ratios of the units in ``flags``."""
        if not self.graft_ready:
            self.graft_measured = [m or id(u) in flags
                                   for u, m in zip(self.units, self.graft_measured)]
            self.graft_ready = all(self.graft_measured)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "bound": None}

    def reduce(self, t: Tensor) -> None:
        """Sum per-unit values over the FSDP2 mesh (in place); nothing otherwise."""
        if self.shards is not None:
            self.shards.all_reduce(t)

    @property
    def shared_blocks(self) -> list[SharedBlock]:
        return [b for s in self.shared for b in s.blocks]


def plan_unit_reductions(plan: GroupPlan, group: dict) -> None:
    """Index tensors that reduce per-block values to the units of a group (and spread unit
    values back to tiles) on the device."""
    index = {id(u): i for i, u in enumerate(plan.units)}
    dummy = len(plan.units)
    count = [0] * (dummy + 1)
    for b in plan.buckets:
        tile_unit = [dummy] * b.tiles
        block_unit = [dummy] * (b.tiles * COMPACT_TILE)
        for unit, seg, tile0 in b.entries:
            u, tiles = index[id(unit)], n_tiles(seg.n_blocks)
            tile_unit[tile0:tile0 + tiles] = [u] * tiles
            first = tile0 * COMPACT_TILE
            block_unit[first:first + seg.n_blocks] = [u] * seg.n_blocks
            count[u] += seg.n_blocks * seg.d
        b.entry_tiles = torch.tensor([n_tiles(seg.n_blocks) for _, seg, _ in b.entries],
                                     dtype=torch.int64, device=b.device)
        b.entry_unit = torch.tensor([index[id(unit)] for unit, _, _ in b.entries],
                                    dtype=torch.int64, device=b.device)
        b.tile_unit = torch.tensor(tile_unit, dtype=torch.int64, device=b.device)
        b.block_unit = torch.tensor(block_unit, dtype=torch.int64, device=b.device)
        norm_lanes = 1 if cpu_ops(group, b.device) else COMPACT_TILE
        b.tile_norms = torch.zeros(b.tiles, 2, norm_lanes, dtype=b.dtype, device=b.device)
        b.tile_scale = torch.ones(b.tiles, dtype=b.dtype, device=b.device)
        b.tile_damping = torch.zeros(b.tiles, dtype=b.dtype, device=b.device)
    if plan.buckets:
        b = plan.buckets[0]
        total = torch.tensor(count, dtype=b.dtype, device=b.device)
        plan.reduce(total)  # FSDP2: a unit's entries on all ranks
        plan.diagonal_count = total.clamp_min(1)


@dataclass
class BucketCall:
    """The arguments of one step's bucket-op call(s): every pass of a step reads the same
    tensors, with the segments' flags masked per pass."""

    bucket: Bucket
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    momenta: list[Tensor] = field(default_factory=list)
    second_moments: list[Tensor] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    staged: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (param, working copy)
    # fisher="true" on a refresh step: the curvature's gradients, aligned with grads
    fisher_grads: list[Tensor] = field(default_factory=list)

    def masked(self, keep: int) -> list[int]:
        """The segments with their flags reduced to the bits in ``keep``."""
        out = list(self.segments)
        out[_FLAGS_FIELD::SEGMENT_FIELDS] = [f & keep for f in out[_FLAGS_FIELD::SEGMENT_FIELDS]]
        return out

    def add(self, p: Tensor, state: dict, graft: bool, fisher: dict | None) -> None:
        """Append parameter ``p``'s tensors (a float32 or contiguous working copy where the
        kernels need one) to the call's lists."""
        b = self.bucket
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        work = p
        if p.dtype != b.dtype or not p.is_contiguous():
            # bf16/fp16 (or channels_last) parameters: updated in a float32 (or contiguous)
            # copy, written back rounded to the parameter's dtype.
            work = p.to(dtype=b.dtype, memory_format=torch.contiguous_format, copy=True)
            self.staged.append((p, work))
        self.params.append(work)
        self.grads.append(g.to(b.dtype))
        self.momenta.append(state[MOMENTUM])
        if fisher is not None:
            fg = fisher[p] if p in fisher else torch.zeros_like(p)
            self.fisher_grads.append(fg.to(b.dtype))
        if graft:
            self.second_moments.append(state[SECOND_MOMENT])


@dataclass
class BucketLayout:
    """What a bucket's calls share from step to step, built once (the first step): its distinct
    parameters in argument order and, per segment, its unit and its seven static fields."""

    params: list[Tensor]
    segments: list[tuple[Unit, list[int]]]
    units: list[Unit]  # distinct, in segment order
    # The params' momenta and second moments (graft="adam"), at the first step: the state's
    # tensors are kept for the optimizer's life (load_state_dict copies into them).
    momenta: list[Tensor] | None = None
    second_moments: list[Tensor] | None = None

    @classmethod
    def of(cls, bucket: Bucket) -> "BucketLayout":
        params: list[Tensor] = []
        segments = static_segments(bucket, params, {})
        return cls(params, segments, list({id(u): u for u, _ in segments}.values()))


def static_segments(bucket: Bucket, params: list[Tensor], index: dict[int, int]
                    ) -> list[tuple[Unit, list[int]]]:
    """Each entry of ``bucket``: its unit and its seven static segment fields (the bucket op's
    segments without flags and step), naming tensors by their position in ``params``, to which
    tensors not in ``index`` (id -> position) are appended."""

    def tensor_index(p: Tensor) -> int:
        if id(p) not in index:
            index[id(p)] = len(params)
            params.append(p)
        return index[id(p)]

    return [(unit, [tensor_index(unit.params[seg.main]),
                    -1 if seg.tail is None else tensor_index(unit.params[seg.tail]),
                    seg.n_blocks, seg.offset, seg.width, seg.row_stride, tile0])
            for unit, seg, tile0 in bucket.entries]


def bucket_call(group: dict, bucket: Bucket, flags: dict[int, int], steps: dict[int, int],
                state: dict, fisher: dict[Tensor, Tensor]) -> BucketCall | None:
    """This step's arguments of the bucket op, or None when no unit of it has a gradient.

    On a small model the cost of a step is its Python, so the common case (every unit of the
    bucket has a gradient, every parameter and gradient is contiguous in the bucket's dtype,
    no sampled gradients) takes the bucket's precomputed layout and builds only the lists."""
    if bucket.layout is None:
        bucket.layout = BucketLayout.of(bucket)
    layout = bucket.layout
    # (Adam's v per entry: the parameters'; per block it is the bucket's own)
    graft = group["graft"] == "adam" and bucket.block_second_moment is None
    if not (group["fisher"] == "true" and fisher) and all(id(u) in flags for u in layout.units):
        grads = [p.grad for p in layout.params]
        dtype = bucket.dtype
        if all(g is not None and g.dtype == dtype and g.is_contiguous()
               and p.dtype == dtype and p.is_contiguous()
               for p, g in zip(layout.params, grads)):
            if layout.momenta is None or (graft and layout.second_moments is None):
                sts = [state[p] for p in layout.params]
                layout.momenta = [s[MOMENTUM] for s in sts]
                layout.second_moments = [s[SECOND_MOMENT] for s in sts] if graft else None
            segments: list[int] = []
            for unit, fields in layout.segments:
                segments += fields
                segments += (flags[id(unit)], steps[id(unit)])
            return BucketCall(bucket, list(layout.params), grads, list(layout.momenta),
                              list(layout.second_moments) if graft else [], segments)
    # Otherwise (units without a gradient, staged or converted tensors, sampled gradients): the
    # same layout, with only the active units' segments and the tensors they name.
    call = BucketCall(bucket)
    # Sampled gradients exist only on refresh steps (fisher_pass()); none are built otherwise.
    true_fisher = fisher if group["fisher"] == "true" and fisher else None
    index: dict[int, int] = {}  # layout.params index -> this call's

    def tensor_index(i: int) -> int:
        if i not in index:
            index[i] = len(call.params)
            p = layout.params[i]
            call.add(p, state[p], graft, true_fisher)
        return index[i]

    for unit, fields in layout.segments:
        f = flags.get(id(unit))
        if f is None:
            continue
        main, tail = fields[0], fields[1]
        call.segments += [tensor_index(main), -1 if tail < 0 else tensor_index(tail),
                          *fields[2:], f, steps[id(unit)]]
    return call if call.segments else None


def run_pass(group: dict, call: BucketCall, mode: StepMode, keep: int,
             grads: list[Tensor] | None = None) -> None:
    """One pass of the bucket op over ``call``, the segments' flags reduced to ``keep`` (a pass
    that would neither write nor refresh nor refactor is skipped); ``grads`` replaces the call's
    gradients (MBF-True's refresh)."""
    b = call.bucket
    segments = call.masked(keep)
    if mode == StepMode.NONE and not any(f & (REFRESH | REFACTOR) for f in
                                         segments[_FLAGS_FIELD::SEGMENT_FIELDS]):
        return
    graft = bool(mode & StepMode.GRAFT)
    b.step_function(group["backend"])(
        call.params, call.grads if grads is None else grads, call.momenta, b.curvature,
        b.factor, b.stats, segments, lr=group["lr"], momentum_coef=momentum_coef(group),
        beta=group["beta"], damping=group["damping"], weight_decay=group["weight_decay"],
        decoupled_weight_decay=group["decoupled_weight_decay"],
        second_moments=call.second_moments if mode.measures else [],
        tile_damping=b.tile_damping if group["damping_mode"] == "relative" else None,
        tile_scale=b.tile_scale if graft else None, tile_norms=b.tile_norms if graft else None,
        directions=b.scratch_directions() if mode.uses_directions else None,
        beta2=group["betas"][1], eps=group["eps"], mode=mode,
        **({"block_second_moment": b.block_second_moment}
           if mode.measures and b.block_second_moment is not None else {}))


def step_buckets(group: dict, plan: GroupPlan, flags: dict[int, int], steps: dict[int, int],
                 state: dict, fisher: dict[Tensor, Tensor], lagged: bool = False) -> None:
    """The step of every bucket of a group: one pass of the fused op per bucket (the paper's
    update); with MBF-True, a refresh-only pass first on refresh steps, from the sampled
    gradients; with relative damping, a refresh-only pass before the refactor (the damping is a
    fraction of the refreshed curvature); with grafting, a measuring pass (m, v and MBF's
    direction stored; the norms of MBF's and Adam's directions per block, reduced to units on
    the device) before the pass that moves the parameters by the stored directions, or
    (``lagged``, :meth:`GroupPlan.lags_graft`) one pass that measures and moves the parameters
    at the previous step's ratios, then this step's ratios for the next. Passes after the
    first refresh no longer refresh, nor after the refactor refactor."""
    calls = [c for c in (bucket_call(group, b, flags, steps, state, fisher)
                         for b in plan.buckets) if c]
    if not calls:
        return
    everything = REFRESH | FIRST | REFACTOR
    if group["fisher"] == "true" and fisher:
        for call in calls:
            run_pass(group, call, StepMode.NONE, REFRESH | FIRST, call.fisher_grads)
        everything = REFACTOR
    if group["damping_mode"] == "relative" and any(f & REFACTOR for f in flags.values()):
        for call in calls:
            run_pass(group, call, StepMode.NONE, everything & ~REFACTOR)
        _relative_damping(group, plan, calls)
        everything = REFACTOR
    mode = StepMode.WRITE
    if group["graft"] == "adam" and not lagged:
        for call in calls:
            run_pass(group, call, StepMode.GRAFT, everything)
        _graft_scales(group, plan, calls)
        everything = 0
        mode = StepMode.WRITE | StepMode.GRAFT
    elif lagged:
        mode = StepMode.WRITE | StepMode.GRAFT | StepMode.LAGGED
    for call in calls:
        run_pass(group, call, mode, everything)
        for p, work in call.staged:
            p.copy_(work)
        if mode.applies_direction:  # (the two passes' last)
            call.bucket.release_directions(group)
    if lagged:
        _graft_scales(group, plan, calls)  # the next step's


def _unit_sums(plan: GroupPlan, calls: list[BucketCall], values) -> Tensor:
    """Sum per unit (plus a padding slot) of ``values(bucket)``, (tiles, k) per compact tile,
    over the buckets of ``calls`` (not empty): (units + 1, k). A bucket's entries own
    consecutive tiles, so a segment sum per entry, then an index_add_ over the few entries:
    index_add_ over 100k tiles took 1.2 ms on the dev VM, segment_reduce 0.1 ms. (unsafe: the
    lengths, which the layout made, are not checked; the check read them back to the host, a
    device sync per bucket on a GPU.)"""
    per_bucket = [values(call.bucket) for call in calls]
    out = per_bucket[0].new_zeros(len(plan.units) + 1, per_bucket[0].shape[1])
    for call, v in zip(calls, per_bucket):
        b = call.bucket
        out.index_add_(0, b.entry_unit, torch.segment_reduce(v, "sum", lengths=b.entry_tiles,
                                                             axis=0, unsafe=True))
    return out


def _relative_damping(group: dict, plan: GroupPlan, calls: list[BucketCall]) -> None:
    """tile_damping = the relative damping of each tile's unit, from the refreshed curvature
    of all its blocks (:func:`mbf_kernels.reference.relative_damping`); padding blocks, whose
    state the layout leaves unspecified, are left out."""
    def diagonals(b: Bucket) -> Tensor:
        # The diagonal's rows of the packed curvature added up as strided views, one cache line
        # per tile and row: gathering them first (advanced indexing, then a masked product)
        # took 60 ms of a refactor on CIFAR VGG16's buckets, dev VM.
        trace = b.curvature[:, 0, :].clone()
        for i in range(1, b.d):
            trace += b.curvature[:, i * (i + 1) // 2 + i, :]
        real = b.block_unit.view(b.tiles, COMPACT_TILE) < len(plan.units)
        return torch.where(real, trace, 0).sum(1, keepdim=True)

    sums = _unit_sums(plan, calls, diagonals)[:, 0]
    plan.reduce(sums)
    damping = relative_damping(group["damping"], sums, plan.diagonal_count)
    for call in calls:
        call.bucket.tile_damping.copy_(damping[call.bucket.tile_unit])


def _graft_scales(group: dict, plan: GroupPlan, calls: list[BucketCall]) -> None:
    """tile_scale = |a_unit| / |u_unit| from the measuring pass's per-block norms: on the CPU
    in one C++ call (``unit_ratios``; about ten torch calls otherwise, a tenth of a small
    model's step), unless FSDP2 sums the units over ranks."""
    # (the kernels write zeros for padding blocks and for blocks whose norms are not finite)
    if plan.shards is None and cpu_ops(group, calls[0].bucket.device):
        scale = torch.ops.mbf_kernels.unit_ratios(
            [c.bucket.tile_norms for c in calls], [c.bucket.entry_tiles for c in calls],
            [c.bucket.entry_unit for c in calls], len(plan.units) + 1)
    else:
        sums = _unit_sums(plan, calls, lambda b: b.tile_norms.sum(2))
        plan.reduce(sums)
        su, sa = sums[:, 0], sums[:, 1]
        scale = torch.where(su > 0, (sa / su.clamp_min(torch.finfo(su.dtype).tiny)).sqrt(),
                            torch.zeros_like(su))
    for call in calls:
        torch.index_select(scale, 0, call.bucket.tile_unit, out=call.bucket.tile_scale)
