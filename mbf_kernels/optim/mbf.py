"""The MBF optimizer (MBF_SPEC sections 2-5): a thin torch.optim.Optimizer over bucketed blocks.

At construction every parameter is mapped once to blocks (:mod:`.blocks`), and the blocks of
each param group are gathered into buckets of one block size: a bucket owns the compact
curvature and factor of all its blocks (:mod:`mbf_kernels.layout`), and each ``step()`` is one
fused kernel call per bucket (``mbf_bucket_step_``), which reads every parameter, gradient and
momentum in place, whatever layer it belongs to. Shared blocks of large linear layers (one
d x d block per layer, d up to thousands) are dense GEMM-sized problems and go to torch.linalg.

``step()`` never synchronises with the device: step counters are Python ints, and every
data-dependent decision (non-finite gradient, failed factorisation) is made per block inside
the kernels or with ``torch.where``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..dispatch import CHOICES, select
from ..layout import (COMPACT_TILE, SEGMENT_FIELDS, SegmentFlags, StepMode, from_compact, n_tiles,
                      to_compact)
from ..packed import pack_tril, tril_size, unpack_tril
from .blocks import CONV1X1, LARGE_LINEAR, ModuleRoles, Segment, Unit, module_roles, plan_group
from .fisher import FisherCapture
from .shared import RELATIVE_DAMPING_FLOOR, SharedBlock, SharedSet

__all__ = ["MBF", "DEFAULTS", "PAPER", "PAPER_LR", "PAPER_DAMPING"]

#: Defaults of every per-group option: MBF as an AdamW drop-in (MBF_SPEC section 3b): MBF's
#: direction with Adam's step length per unit, AdamW's betas and eps, damping relative to the
#: curvature. lr, damping, T1 and T2 come from the four-task sweep in bench/RESULTS.md
#: ("Shipped defaults"), whose rule asks that the lr survive being 9x too large or too small:
#: lr is AdamW's own default. ``PAPER`` selects the paper's exact update (section 3).
DEFAULTS: dict = dict(
    lr=1e-3,
    momentum=0.9,
    beta=0.9,
    damping=0.3,
    weight_decay=0.0,
    # None: AdamW's decoupled decay with graft="adam", the paper's L2 (coupled) without.
    decoupled_weight_decay=None,
    curvature_update_freq=10,
    inverse_update_freq=100,
    max_block_size=64,
    large_linear="shared",
    conv1x1="conv",
    backend="auto",
    graft="adam",
    damping_mode="relative",
    betas=(0.9, 0.999),
    eps=1e-8,
    fisher="empirical",
)

#: The paper's update exactly (MBF_SPEC section 3): ``MBF(params, lr=..., damping=..., **PAPER)``
#: (decoupled_weight_decay then defaults to False, the paper's L2). Its lr and (absolute) damping
#: live in other units than the defaults'; PAPER_LR and PAPER_DAMPING are the earlier sweep's
#: choice on digits (bench/RESULTS.md, "Optimizer defaults (lr, damping)").
PAPER: dict = dict(graft="none", damping_mode="absolute", fisher="empirical")
PAPER_LR, PAPER_DAMPING = 0.01, 0.3

#: Values of the options beyond the paper (MBF_SPEC section 3b; definitions in docs/options.md).
GRAFT = ("none", "adam")
DAMPING_MODE = ("absolute", "relative")
FISHER = ("empirical", "true")

# State keys (per parameter in ``optimizer.state``; the block state is added by state_dict()).
STEP = "step"  # int: step() calls that saw a gradient for this unit (kept on its first param)
MOMENTUM = "momentum_buffer"
SECOND_MOMENT = "exp_avg_sq"  # graft="adam": Adam's v of the step's direction, as AdamW names it
CURVATURE = "curvature"  # list, one (n_blocks, d(d+1)/2) packed tensor per segment
FACTOR = "factor"  # same layout: packed L with its diagonal stored as 1 / L_ii
LAYOUT = "block_layout"  # list of (kind, d, n_blocks) per segment, checked on load
#: Options that shape the optimizer's buffers or describe this run (fixed at construction):
#: kept from the loading optimizer on load_state_dict.
_RUN_OPTIONS = ("backend", "max_block_size", "large_linear", "conv1x1", "graft", "damping_mode",
                "fisher")

# Plain ints: IntFlag's operators run in Python, thousands of times a step on a small model.
_REFRESH, _FIRST, _REFACTOR = (int(SegmentFlags.REFRESH), int(SegmentFlags.FIRST),
                                int(SegmentFlags.REFACTOR))
_FLAGS_FIELD = 7  # index of the flags in a segment's SEGMENT_FIELDS ints


def _state_dtype(p: Tensor) -> torch.dtype:
    # MBF_SPEC section 3: curvature in float32, or float64 for float64 parameters.
    return torch.float64 if p.dtype == torch.float64 else torch.float32


@dataclass
class _Bucket:
    """The blocks of one size in one param group: segments and their compact state."""

    d: int
    dtype: torch.dtype
    device: torch.device
    entries: list[tuple[Unit, Segment, int]] = field(default_factory=list)  # (unit, seg, tile0)
    tiles: int = 0
    curvature: Tensor | None = None
    factor: Tensor | None = None
    stats: Tensor | None = None
    step_fn: Callable | None = None  # the mbf_bucket_step_ serving it (at first step)
    # Per compact tile / block, for grafting and relative damping (index into the group's units;
    # padding blocks map to one slot past the last unit).
    tile_unit: Tensor | None = None  # (tiles,) int64
    block_unit: Tensor | None = None  # (tiles * 16,) int64
    tile_norms: Tensor | None = None  # (tiles, 2, 16): [|u_b|^2, |a_b|^2] of each block
    tile_scale: Tensor | None = None  # (tiles,): the graft's lr multiplier of each tile's unit
    tile_damping: Tensor | None = None  # (tiles,): the relative damping of each tile's unit


@dataclass
class _GroupPlan:
    units: list[Unit]
    buckets: list[_Bucket]
    shared: list[SharedSet]  # one per state dtype and device
    diagonal_count: Tensor | None = None  # (units + 1,): diagonal entries of each unit's blocks

    @property
    def shared_blocks(self) -> list[SharedBlock]:
        return [b for s in self.shared for b in s.blocks]


@dataclass
class _BucketCall:
    """The arguments of one step's bucket-op call(s): every pass of a step reads the same
    tensors, with the segments' flags masked per pass."""

    bucket: _Bucket
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


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"MBF: {name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"MBF: {name} must be finite, got {value!r}")
    return v


def _validate_group(group: dict) -> None:
    """ValueError naming the first bad option of a param group (MBF_SPEC section 4)."""
    allowed = set(DEFAULTS) | {"params", "name"}
    unknown = sorted(set(group) - allowed)
    if unknown:
        raise ValueError(f"MBF: unknown option(s) {unknown}; known options: {sorted(DEFAULTS)}")
    for name in ("lr", "damping", "weight_decay"):
        if _check_real(name, group[name]) < 0:
            raise ValueError(f"MBF: {name} must be >= 0, got {group[name]!r}")
    for name in ("momentum", "beta"):
        if not 0.0 <= _check_real(name, group[name]) < 1.0:
            raise ValueError(f"MBF: {name} must be in [0, 1), got {group[name]!r}")
    for name in ("curvature_update_freq", "inverse_update_freq", "max_block_size"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"MBF: {name} must be an integer >= 1, got {value!r}")
    if group["decoupled_weight_decay"] is not None and not isinstance(
            group["decoupled_weight_decay"], bool):
        raise ValueError("MBF: decoupled_weight_decay must be True, False or None, got "
                         f"{group['decoupled_weight_decay']!r}")
    for name, choices in (("large_linear", LARGE_LINEAR), ("conv1x1", CONV1X1),
                          ("backend", CHOICES), ("graft", GRAFT), ("damping_mode", DAMPING_MODE),
                          ("fisher", FISHER)):
        if group[name] not in choices:
            raise ValueError(f"MBF: {name} must be one of {choices}, got {group[name]!r}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"MBF: betas must be a pair (beta1, beta2), got {betas!r}")
    for name, value in zip(("betas[0]", "betas[1]"), betas):
        if not 0.0 <= _check_real(name, value) < 1.0:
            raise ValueError(f"MBF: {name} must be in [0, 1), got {value!r}")
    if _check_real("eps", group["eps"]) < 0:
        raise ValueError(f"MBF: eps must be >= 0, got {group['eps']!r}")
    if (group["graft"] == "adam" and group["momentum"] != DEFAULTS["momentum"]
            and group["momentum"] != betas[0]):
        raise ValueError(f"MBF: with graft='adam' the momentum coefficient is betas[0] "
                         f"({betas[0]!r}, as in AdamW); momentum={group['momentum']!r} would "
                         "have no effect: pass betas=(momentum, beta2) instead")


def _prepare_group(group: dict) -> None:
    """Validate a param group, then resolve its "auto" options in place (decoupled decay)."""
    _validate_group(group)
    if group["decoupled_weight_decay"] is None:
        group["decoupled_weight_decay"] = group["graft"] != "none"


def _momentum_coef(group: dict) -> float:
    """The heavy-ball coefficient: AdamW's beta1 when grafting from Adam."""
    return group["betas"][0] if group["graft"] == "adam" else group["momentum"]


class MBF(FisherCapture, torch.optim.Optimizer):
    """Mini-Block Fisher: momentum preconditioned by a damped per-block empirical Fisher.

    ``MBF(params, ...)`` maps parameters to blocks by shape; :meth:`from_model` also uses the
    module types (a Linear's bias joins its weight rows, norm layers are diagonal). Options,
    per param group (MBF_SPEC section 3): ``lr``, ``momentum``, ``beta``, ``damping``,
    ``weight_decay``, ``decoupled_weight_decay``, ``curvature_update_freq`` (T1),
    ``inverse_update_freq`` (T2), ``max_block_size``, ``large_linear`` ("shared" | "chunk" |
    "diagonal"), ``conv1x1`` ("conv" | "row") and ``backend`` ("auto" | "cpu" | "cuda" |
    "triton" | "torch"). :attr:`stats` counts skipped curvature refreshes and failed blocks.
    """

    def __init__(self, params: Iterable, lr: float = DEFAULTS["lr"], **options) -> None:
        self._roles: ModuleRoles | None = options.pop("_roles", None)
        self._plans: list[_GroupPlan] = []
        self._n_params = 0
        self._fisher_grads: dict[Tensor, Tensor] = {}  # fisher_pass() -> the next step()
        defaults = dict(DEFAULTS, lr=lr)
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"MBF: unknown option(s) {unknown}; known options: "
                             f"{sorted(DEFAULTS)}")
        defaults.update(options)
        _validate_group(defaults)
        super().__init__(params, defaults)

    @classmethod
    def from_model(cls, model: nn.Module, lr: float = DEFAULTS["lr"], **options) -> "MBF":
        """MBF over ``model.parameters()`` with module-aware blocks (MBF_SPEC section 2)."""
        return cls(model.parameters(), lr=lr, _roles=module_roles(model), **options)

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles (and deep-copies) only defaults/state/param_groups; the
        # block plans and buckets refer to the same parameters and must travel with them. The
        # module roles are keyed by id() of the original parameters, meaningless in a copy:
        # a group added to a copy maps by shape.
        return {**super().__getstate__(), "_plans": self._plans, "_n_params": self._n_params,
                "_roles": None, "_fisher_grads": {}}

    # -- construction ---------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _prepare_group(group)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"MBF: complex parameters are not supported (got a "
                                     f"{p.dtype} parameter of shape {tuple(p.shape)})")
                if not p.is_floating_point():
                    raise ValueError(f"MBF: parameters must be floating point, got {p.dtype}")
            self._plans.append(self._plan(group))
        except Exception:
            self.param_groups.pop()
            raise
        self._n_params += len(group["params"])

    def _plan(self, group: dict) -> _GroupPlan:
        units = plan_group(group["params"], group, self._roles, self._n_params)
        buckets: dict[tuple, _Bucket] = {}
        shared_units: dict[tuple, list[Unit]] = {}
        graft = group["graft"] == "adam"
        for unit in units:
            p0 = unit.params[0]
            dtype, device = _state_dtype(p0), p0.device
            self.state[p0][STEP] = 0
            if unit.kind == "shared":
                shared_units.setdefault((dtype, device), []).append(unit)
                continue
            for p in unit.params:
                self.state[p][MOMENTUM] = torch.zeros(p.shape, dtype=dtype, device=device)
                if graft:
                    self.state[p][SECOND_MOMENT] = torch.zeros(p.shape, dtype=dtype,
                                                               device=device)
            for seg in unit.segments:
                if seg.n_blocks == 0:
                    continue
                bucket = buckets.setdefault((seg.d, dtype, device), _Bucket(seg.d, dtype, device))
                bucket.entries.append((unit, seg, bucket.tiles))
                bucket.tiles += n_tiles(seg.n_blocks)
        for b in buckets.values():
            shape = (b.tiles, tril_size(b.d), COMPACT_TILE)
            b.curvature = torch.zeros(shape, dtype=b.dtype, device=b.device)
            b.factor = torch.zeros(shape, dtype=b.dtype, device=b.device)
        shared = [SharedSet(us, dtype, device, graft)
                  for (dtype, device), us in shared_units.items()]
        # The state of a shared block's parameters is a view of its row buffers.
        keys = ((MOMENTUM, "momentum"),) + (((SECOND_MOMENT, "second_moment"),) if graft else ())
        for b in (b for s in shared for b in s.blocks):
            for key, rows in keys:
                for p, view in zip(b.unit.params, b.views[rows]):
                    self.state[p][key] = view
        plan = _GroupPlan(units, list(buckets.values()), shared)
        if graft or group["damping_mode"] == "relative":
            self._plan_unit_reductions(plan)
        return plan

    @staticmethod
    def _plan_unit_reductions(plan: _GroupPlan) -> None:
        """Index tensors that reduce per-block values to the units of a group (and spread unit
        values back to tiles) on the device, so that grafting and relative damping need no
        Python loop over layers and no host sync at step time."""
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
            b.tile_unit = torch.tensor(tile_unit, dtype=torch.int64, device=b.device)
            b.block_unit = torch.tensor(block_unit, dtype=torch.int64, device=b.device)
            b.tile_norms = torch.zeros(b.tiles, 2, COMPACT_TILE, dtype=b.dtype, device=b.device)
            b.tile_scale = torch.ones(b.tiles, dtype=b.dtype, device=b.device)
            b.tile_damping = torch.zeros(b.tiles, dtype=b.dtype, device=b.device)
        if plan.buckets:
            b = plan.buckets[0]
            plan.diagonal_count = torch.tensor(count, dtype=b.dtype, device=b.device).clamp_min(1)

    # -- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fisher = self._take_fisher_grads()
        # Every check first (a missing sampled gradient raises before any state changes).
        all_flags = [self._unit_flags(g, plan, fisher)
                     for g, plan in zip(self.param_groups, self._plans)]
        for group, plan, flags in zip(self.param_groups, self._plans, all_flags):
            self._step_buckets(group, plan, flags, fisher)
            for shared in plan.shared:
                active = [i for i, b in enumerate(shared.blocks) if id(b.unit) in flags]
                if active:
                    units = [shared.blocks[i].unit for i in active]
                    shared.step(group, _momentum_coef(group), active,
                                [flags[id(u)] for u in units],
                                [self.state[u.params[0]][STEP] + 1 for u in units], fisher)
            for unit in plan.units:
                if id(unit) in flags:
                    self.state[unit.params[0]][STEP] += 1
        return loss

    def _refreshes_next(self, group: dict) -> bool:
        plan = self._plans[next(i for i, g in enumerate(self.param_groups) if g is group)]
        t1 = group["curvature_update_freq"]
        return any(self.state[u.params[0]][STEP] % t1 == 0 for u in plan.units)

    def _unit_flags(self, group: dict, plan: _GroupPlan,
                    fisher: dict[Tensor, Tensor]) -> dict[int, int]:
        """id(unit) -> segment flags for this step, for the units that have a gradient."""
        t1, t2 = group["curvature_update_freq"], group["inverse_update_freq"]
        flags = {}
        for unit in plan.units:
            grads = [p.grad for p in unit.params if p.grad is not None]
            if not grads:
                continue
            for g in grads:
                if g.is_sparse:
                    raise RuntimeError(f"MBF: {unit.name} has a sparse gradient; MBF needs dense "
                                       "gradients (e.g. nn.Embedding(sparse=False))")
                if g.is_complex():
                    raise RuntimeError(f"MBF: {unit.name} has a complex gradient")
            k = self.state[unit.params[0]][STEP] + 1
            f = 0
            if (k - 1) % t1 == 0:
                f |= _REFRESH | (_FIRST if k == 1 else 0)
                if group["fisher"] == "true" and not any(p in fisher for p in unit.params):
                    raise self._missing_fisher(unit.name)
            if (k - 1) % t2 == 0:
                f |= _REFACTOR
            flags[id(unit)] = f
        return flags

    def _bucket_step_fn(self, group: dict, bucket: _Bucket) -> Callable:
        """The ``mbf_bucket_step_`` serving this bucket, chosen once for its device and block
        size (a plain function, which deep-copies with the optimizer where a module would
        not). The counters live on the bucket's device: adding to them never syncs."""
        if bucket.step_fn is None:
            module = select(group["backend"], bucket.device, differentiable=False, fn="MBF",
                            d=bucket.d, step=True)
            bucket.stats = torch.zeros(2, dtype=torch.int64, device=bucket.device)
            bucket.step_fn = module.mbf_bucket_step_
        return bucket.step_fn

    def _bucket_call(self, group: dict, bucket: _Bucket, flags: dict[int, int],
                     fisher: dict[Tensor, Tensor]) -> _BucketCall | None:
        """This step's arguments of the bucket op, or None when no unit of it has a gradient."""
        index: dict[int, int] = {}
        call = _BucketCall(bucket)
        graft = group["graft"] == "adam"
        # Sampled gradients exist only on refresh steps (fisher_pass()); none are built otherwise.
        true_fisher = group["fisher"] == "true" and bool(fisher)

        def tensor_index(p: Tensor) -> int:
            i = index.get(id(p))
            if i is None:
                i = index[id(p)] = len(call.params)
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                work = p
                if p.dtype != bucket.dtype or not p.is_contiguous():
                    # bf16/fp16 (or channels_last) parameters: updated in a float32 (or
                    # contiguous) copy, written back rounded to the parameter's dtype.
                    work = p.to(dtype=bucket.dtype, memory_format=torch.contiguous_format,
                                copy=True)
                    call.staged.append((p, work))
                call.params.append(work)
                call.grads.append(g.to(bucket.dtype))
                call.momenta.append(self.state[p][MOMENTUM])
                if true_fisher:
                    fg = fisher[p] if p in fisher else torch.zeros_like(p)
                    call.fisher_grads.append(fg.to(bucket.dtype))
                if graft:
                    call.second_moments.append(self.state[p][SECOND_MOMENT])
            return i

        for unit, seg, tile0 in bucket.entries:
            f = flags.get(id(unit))
            if f is None:
                continue
            main = tensor_index(unit.params[seg.main])
            tail = -1 if seg.tail is None else tensor_index(unit.params[seg.tail])
            step = self.state[unit.params[0]][STEP] + 1
            call.segments += [main, tail, seg.n_blocks, seg.offset, seg.width, seg.row_stride,
                              tile0, f, step]
        return call if call.segments else None

    def _run(self, group: dict, call: _BucketCall, mode: StepMode, keep: int,
             grads: list[Tensor] | None = None) -> None:
        """One pass of the bucket op over ``call``, the segments' flags reduced to ``keep``
        (a pass that would neither write nor refresh nor refactor is skipped); ``grads``
        replaces the call's gradients (MBF-True's refresh)."""
        b = call.bucket
        relative = group["damping_mode"] == "relative"
        segments = call.masked(keep)
        if mode == StepMode.NONE and not any(f & (_REFRESH | _REFACTOR) for f in
                                             segments[_FLAGS_FIELD::SEGMENT_FIELDS]):
            return
        self._bucket_step_fn(group, b)(
            call.params, call.grads if grads is None else grads, call.momenta, b.curvature,
            b.factor, b.stats, segments, lr=group["lr"], momentum_coef=_momentum_coef(group),
            beta=group["beta"], damping=group["damping"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            second_moments=call.second_moments,
            tile_damping=b.tile_damping if relative else None,
            tile_scale=b.tile_scale if mode & StepMode.GRAFT else None,
            tile_norms=b.tile_norms if mode & StepMode.GRAFT else None,
            beta2=group["betas"][1], eps=group["eps"], mode=mode)

    def _step_buckets(self, group: dict, plan: _GroupPlan, flags: dict[int, int],
                      fisher: dict[Tensor, Tensor]) -> None:
        """The step of every bucket of a group: one pass of the fused op per bucket (the paper's
        update); with MBF-True, a refresh-only pass first on refresh steps, from the sampled
        gradients; with relative damping, a refresh-only pass before the refactor (the damping
        is a fraction of the refreshed curvature); with grafting, a measuring pass (the norms of
        MBF's and Adam's directions per block, reduced to units on the device) before the pass
        that writes. Passes after the first refresh no longer refresh, nor after the refactor
        refactor."""
        calls = [c for c in (self._bucket_call(group, b, flags, fisher) for b in plan.buckets)
                 if c]
        if not calls:
            return
        everything = int(_REFRESH | _FIRST | _REFACTOR)
        if group["fisher"] == "true" and fisher:
            for call in calls:
                self._run(group, call, StepMode.NONE, int(_REFRESH | _FIRST), call.fisher_grads)
            everything = int(_REFACTOR)
        refactor = any(f & _REFACTOR for f in flags.values())
        if group["damping_mode"] == "relative" and refactor:
            for call in calls:
                self._run(group, call, StepMode.NONE, everything & ~_REFACTOR)
            self._relative_damping(group, plan, calls)
            everything = int(_REFACTOR)
        if group["graft"] == "adam":
            for call in calls:
                self._run(group, call, StepMode.GRAFT, everything)
            self._graft_scales(plan, calls)
            everything = 0
            mode = StepMode.WRITE | StepMode.GRAFT
        else:
            mode = StepMode.WRITE
        for call in calls:
            self._run(group, call, mode, everything)
            for p, work in call.staged:
                p.copy_(work)

    @staticmethod
    def _unit_sums(plan: _GroupPlan, calls: list[_BucketCall], values) -> Tensor:
        """Sum per unit (plus a padding slot) of ``values(bucket)``, (tiles * 16, k) per block,
        over the buckets of ``calls`` (not empty): (units + 1, k)."""
        per_bucket = [values(call.bucket) for call in calls]
        out = per_bucket[0].new_zeros(len(plan.units) + 1, per_bucket[0].shape[1])
        for call, v in zip(calls, per_bucket):
            out.index_add_(0, call.bucket.block_unit, v)
        return out

    def _relative_damping(self, group: dict, plan: _GroupPlan, calls: list[_BucketCall]) -> None:
        """tile_damping = damping * (mean diagonal entry of the unit's refreshed curvature, over
        all its blocks: the mean eigenvalue of its block-diagonal Fisher) + a tiny floor."""
        def diagonals(b: _Bucket) -> Tensor:
            rows = [i * (i + 1) // 2 + i for i in range(b.d)]
            return b.curvature[:, rows, :].sum(1).reshape(-1, 1)

        mean = self._unit_sums(plan, calls, diagonals)[:, 0] / plan.diagonal_count
        damping = group["damping"] * mean + RELATIVE_DAMPING_FLOOR
        for call in calls:
            call.bucket.tile_damping.copy_(damping[call.bucket.tile_unit])

    def _graft_scales(self, plan: _GroupPlan, calls: list[_BucketCall]) -> None:
        """tile_scale = |a_unit| / |u_unit| from the measuring pass's per-block norms."""
        sums = self._unit_sums(
            plan, calls, lambda b: b.tile_norms.transpose(1, 2).reshape(-1, 2))
        su, sa = sums[:, 0], sums[:, 1]
        scale = torch.where(su > 0, (sa / su.clamp_min(torch.finfo(su.dtype).tiny)).sqrt(),
                            torch.zeros_like(su))
        for call in calls:
            call.bucket.tile_scale.copy_(scale[call.bucket.tile_unit])

    # -- introspection ----------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Blocks whose curvature refresh was skipped (non-finite gradient) and whose
        factorisation failed (diagonal fallback), summed over all steps. Reading it syncs."""
        total = [0, 0]
        for plan in self._plans:
            for s in [b.stats for b in plan.buckets] + [sh.stats for sh in plan.shared_blocks]:
                if s is not None:
                    total[0] += int(s[0])
                    total[1] += int(s[1])
        return {"skipped_curvature": total[0], "failed_factor": total[1]}

    def state_bytes(self) -> int:
        """Bytes of optimizer state (momentum, curvature, factors, compact padding and the shared
        blocks' work buffers included)."""
        total = 0
        for plan in self._plans:
            for unit in plan.units:
                total += sum(t.nbytes for p in unit.params
                             for k, t in self.state[p].items() if k in (MOMENTUM, SECOND_MOMENT))
            for b in plan.buckets:
                total += b.curvature.nbytes + b.factor.nbytes
            for sh in plan.shared_blocks:
                total += sh.curvature.nbytes + sh.factor.nbytes + sh.inverse.nbytes
            total += sum(s.work_bytes() for s in plan.shared)
        return total

    def block_summary(self) -> list[dict]:
        """One row per bucket / shared block: group, d, blocks, dtype, device."""
        rows = []
        for gi, plan in enumerate(self._plans):
            for b in plan.buckets:
                rows.append(dict(group=gi, kind="blocks", d=b.d,
                                 blocks=sum(s.n_blocks for _, s, _ in b.entries),
                                 dtype=str(b.dtype), device=str(b.device)))
            for sh in plan.shared_blocks:
                rows.append(dict(group=gi, kind="shared", d=sh.curvature.shape[0], blocks=1,
                                 dtype=str(sh.curvature.dtype), device=str(sh.curvature.device),
                                 name=sh.unit.name))
        return rows

    # -- state_dict: the canonical layout of MBF_SPEC section 4 ------------------------------

    def _block_state(self, unit: Unit, plan: _GroupPlan) -> list[tuple[str, Segment, Tensor, Tensor]]:
        """(kind, segment, curvature view, factor view) of each segment of ``unit``."""
        if unit.kind == "shared":
            sh = next(s for s in plan.shared_blocks if s.unit is unit)
            return [("shared", unit.segments[0], sh.curvature, sh.factor)]
        out = []
        for bucket in plan.buckets:
            for u, seg, tile0 in bucket.entries:
                if u is unit:
                    tiles = n_tiles(seg.n_blocks)
                    out.append(("blocks", seg, bucket.curvature[tile0:tile0 + tiles],
                                bucket.factor[tile0:tile0 + tiles]))
        return out

    def _param_index(self) -> dict[int, int]:
        ids = [id(p) for g in self.param_groups for p in g["params"]]
        return {pid: i for i, pid in enumerate(ids)}

    def state_dict(self) -> dict:
        """torch's state_dict plus, per unit (on its first parameter), the canonical block
        state: ``curvature`` and ``factor`` as lists (one per segment) of (n_blocks, T) packed
        lower triangles, row-major, and ``block_layout``; momentum in the parameter's shape."""
        sd = super().state_dict()
        index = self._param_index()
        for plan in self._plans:
            for unit in plan.units:
                i = index[id(unit.params[0])]
                entry = dict(sd["state"].get(i, {}))
                curv, fac, layout = [], [], []
                for kind, seg, C, L in self._block_state(unit, plan):
                    if kind == "shared":
                        curv.append(pack_tril(C)[None])
                        fac.append(pack_tril(L)[None])
                        layout.append(("shared", seg.d, 1))
                    else:
                        curv.append(from_compact(C, seg.n_blocks))
                        fac.append(from_compact(L, seg.n_blocks))
                        layout.append(("blocks", seg.d, seg.n_blocks))
                entry.update({CURVATURE: curv, FACTOR: fac, LAYOUT: layout})
                sd["state"][i] = entry
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict saved by MBF on any backend/device; values are copied into this
        optimizer's buffers (dtype and device of its state, never the parameters' dtype)."""
        saved = state_dict["state"]
        index = self._param_index()
        # Check everything before changing anything: a failed load leaves the optimizer as is.
        todo = []
        for plan in self._plans:
            for unit in plan.units:
                i = index[id(unit.params[0])]
                entry = saved.get(i)
                if entry is None or LAYOUT not in entry:
                    raise ValueError(f"MBF.load_state_dict: no MBF block state for {unit.name} "
                                     f"(parameter {i}); was it saved by MBF with the same "
                                     "parameters?")
                blocks = self._block_state(unit, plan)
                want = [(k, s.d, 1 if k == "shared" else s.n_blocks) for k, s, _, _ in blocks]
                got = [tuple(x) for x in entry[LAYOUT]]
                if got != want:
                    raise ValueError(f"MBF.load_state_dict: {unit.name} was saved with block "
                                     f"layout {got}, this optimizer has {want} (different "
                                     "max_block_size, large_linear, conv1x1 or from_model?)")
                for p in unit.params:
                    j = index[id(p)]
                    for key in (MOMENTUM, SECOND_MOMENT):
                        if key not in self.state[p]:
                            continue
                        m = saved.get(j, {}).get(key)
                        if m is None or tuple(m.shape) != tuple(p.shape):
                            raise ValueError(
                                f"MBF.load_state_dict: {key} of parameter {j} missing or of the "
                                "wrong shape" + (" (saved without graft='adam'?)"
                                                 if key == SECOND_MOMENT else ""))
                todo.append((unit, blocks, entry))
        stripped = dict(state_dict)
        stripped["state"] = {}
        own_state = {p: self.state[p] for g in self.param_groups for p in g["params"]}
        # The backend and the block layout belong to this run, not to the saved one (a run
        # saved on CPU resumes on a GPU); the layout was checked equal above.
        own_options = [{k: g[k] for k in _RUN_OPTIONS} for g in self.param_groups]
        super().load_state_dict(stripped)  # param groups: hyper-parameters, lr schedules
        for g, opts in zip(self.param_groups, own_options):
            g.update(opts)
        for p, st in own_state.items():
            self.state[p] = st
        for unit, blocks, entry in todo:
            st = self.state[unit.params[0]]
            st[STEP] = int(entry[STEP])
            for p in unit.params:
                for key in (MOMENTUM, SECOND_MOMENT):
                    if key in self.state[p]:
                        self.state[p][key].copy_(saved[index[id(p)]][key])
            for (kind, seg, C, L), c, f in zip(blocks, entry[CURVATURE], entry[FACTOR]):
                if kind == "shared":
                    C.copy_(unpack_tril(c[0].to(C)))
                    L.copy_(unpack_tril(f[0].to(L), symmetric=False))
                else:
                    # Padding blocks keep finite values (zeros), as on a fresh optimizer.
                    C.copy_(to_compact(c.to(C)))
                    L.copy_(to_compact(f.to(L)))
        for plan in self._plans:
            for sh in plan.shared_blocks:
                sh.derive_inverse()
