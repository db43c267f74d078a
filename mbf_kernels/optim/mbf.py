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

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .. import dispatch
from ..layout import COMPACT_TILE, factor_shape, n_tiles
from ..packed import tril_size
from .blocks import ModuleRoles, Unit, module_roles, plan_group
from .bound import BoundBuckets
from .buckets import (FIRST, MOMENTUM, REFACTOR, REFRESH, SECOND_MOMENT, STEP, Bucket,
                      GroupPlan, plan_unit_reductions, step_buckets)
from .fisher import FisherCapture
from .fsdp import global_rows, local_roles, local_shards
from .options import (DEFAULTS, PAPER, PAPER_DAMPING, PAPER_LR, block_second_moment,
                      momentum_coef, pop_adamw_switches, prepare_group, state_dtype,
                      validate_group)
from .shared import SharedSet
from .sharding import SHARD_OWNER, ShardSync, assign_owners, wants_sharding, world
from .state import CanonicalState

__all__ = ["MBF", "DEFAULTS", "PAPER", "PAPER_LR", "PAPER_DAMPING"]


class MBF(FisherCapture, CanonicalState, torch.optim.Optimizer):
    """Mini-Block Fisher: momentum preconditioned by a damped per-block empirical Fisher.

    ``MBF(params, ...)`` maps parameters to blocks by shape; :meth:`from_model` also uses the
    module types (a Linear's bias joins its weight rows, norm layers are diagonal). Options,
    per param group, are the fields of :class:`~mbf_kernels.optim.options.MBFOptions` (their
    defaults, meanings and checks; MBF_SPEC sections 3-3b); AdamW's own ``foreach`` and
    ``fused`` are taken and ignored, and its variants (``amsgrad``, ``maximize``, ...) refused
    when set (:func:`~mbf_kernels.optim.options.pop_adamw_switches`). :attr:`stats` counts
    skipped curvature refreshes and failed blocks.
    """

    def __init__(self, params: Iterable, lr: float = DEFAULTS["lr"], **options) -> None:
        self._roles: ModuleRoles | None = options.pop("_roles", None)
        self._plans: list[GroupPlan] = []
        self._rank_loads: list[int] = []  # curvature bytes per rank so far (shard_curvature)
        self._n_params = 0
        self._fisher_grads: dict[Tensor, Tensor] = {}  # fisher_pass() -> the next step()
        pop_adamw_switches(options)
        defaults = dict(DEFAULTS, lr=lr, **options)
        validate_group(defaults)
        if options.get("graft") == "none" and "damping_mode" not in options:
            # The one combination of a changed default that silently diverges at AdamW's lr (a
            # small CNN's loss reached 6e16 in four steps at lr 1e-3).
            warnings.warn(
                "MBF: graft='none' with the default damping_mode='relative': without grafting "
                "the step length is lr / (damping x each block's mean curvature), so an AdamW lr "
                "diverges. For the paper's update pass damping_mode='absolute' with its lr and "
                "damping (mk.optim.PAPER, PAPER_LR, PAPER_DAMPING), or pass "
                "damping_mode='relative' explicitly with a lr several orders smaller.",
                UserWarning, stacklevel=3 if self._roles is not None else 2)
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
            prepare_group(group)
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

    def _plan(self, group: dict) -> GroupPlan:
        shards = local_shards(group["params"])
        if shards is None:
            all_units = plan_group(group["params"], group, self._roles, self._n_params)
        else:  # FSDP2: the blocks of each rank's shards (.fsdp)
            if group["fisher"] == "true":
                raise ValueError("MBF: fisher='true' is not supported under FSDP2 yet")
            all_units = plan_group(shards.locals, group, local_roles(self._roles, shards),
                                   self._n_params, global_rows(shards))
        units, sync = all_units, None
        if shards is None and wants_sharding(group["shard_curvature"]):
            rank, size = world()
            if not self._rank_loads:
                self._rank_loads = [0] * size
            owners = assign_owners(all_units, self._rank_loads)
            units = [u for u, o in zip(all_units, owners) if o == rank]
            sync = ShardSync([[p for u, o in zip(all_units, owners) if o == r for p in u.params]
                              for r in range(size)], rank)
            # Every parameter has state on every rank (torch.distributed.checkpoint's loader
            # insists), if only the rank that owns its unit.
            for u, o in zip(all_units, owners):
                for p in u.params:
                    self.state[p][SHARD_OWNER] = o
        for unit in all_units:  # every unit counts its steps on every rank (wants_fisher)
            self.state[unit.params[0]][STEP] = 0
        buckets: dict[tuple, Bucket] = {}
        shared_units: dict[tuple, list[Unit]] = {}
        graft = group["graft"] == "adam"
        for unit in units:
            p0 = unit.params[0]
            dtype, device = state_dtype(p0), p0.device
            if unit.kind == "shared":
                shared_units.setdefault((dtype, device), []).append(unit)
                continue
            entry_v = graft and not block_second_moment(group, device)  # (else the bucket's)
            for p in unit.params:
                self.state[p][MOMENTUM] = torch.zeros(p.shape, dtype=dtype, device=device)
                if entry_v:
                    self.state[p][SECOND_MOMENT] = torch.zeros(p.shape, dtype=dtype,
                                                               device=device)
            for seg in unit.segments:
                if seg.n_blocks == 0 and shards is None:
                    # (under FSDP2 an empty shard keeps its segment: every rank has the same
                    # buckets, so their collectives match)
                    continue
                bucket = buckets.setdefault((seg.d, dtype, device), Bucket(seg.d, dtype, device))
                bucket.entries.append((unit, seg, bucket.tiles))
                bucket.tiles += n_tiles(seg.n_blocks)
        for b in buckets.values():
            shape = (b.tiles, tril_size(b.d), COMPACT_TILE)
            b.curvature = torch.zeros(shape, dtype=b.dtype, device=b.device)
            storage = b.factor_dtype(group)
            b.factor = torch.zeros(factor_shape(b.tiles, b.d, storage), dtype=storage,
                                   device=b.device)
            if block_second_moment(group, b.device):
                b.block_second_moment = torch.zeros(b.tiles, COMPACT_TILE, dtype=b.dtype,
                                                    device=b.device)
        reduce = None if shards is None else shards.all_reduce
        shared = [SharedSet(us, dtype, device, graft, reduce, dispatch.cpu_ops(group, device))
                  for (dtype, device), us in shared_units.items()]
        # The state of a shared block's parameters is a view of its row buffers.
        keys = ((MOMENTUM, "momentum"),) + (((SECOND_MOMENT, "second_moment"),) if graft else ())
        for b in (b for s in shared for b in s.blocks):
            for key, rows in keys:
                for p, view in zip(b.unit.params, b.views[rows]):
                    self.state[p][key] = view
        plan = GroupPlan(units, list(buckets.values()), shared, all_units=all_units, sync=sync,
                         shards=shards)
        # Each unit's state dict (its step count), looked up once: load_state_dict keeps these
        # dicts, and hashing ~100 parameters per step was a tenth of a ResNet-32 step.
        plan.unit_states = [self.state[u.params[0]] for u in all_units]
        if graft or group["damping_mode"] == "relative":
            plan_unit_reductions(plan, group)
        return plan

    # -- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fused_step()
        return loss

    # Eager under torch.compile (docs/semantics.md): the step is already a few fused kernel
    # calls per bucket, and traced it recompiled at every new lr (a Python float in its graph)
    # and broke its graph at the bound C++ buckets: 0.3 s a step under an LR schedule.
    @torch.compiler.disable
    def _fused_step(self) -> None:
        fisher = self._take_fisher_grads()
        fsdp = [plan.shards for plan in self._plans if plan.shards is not None]
        for shards in fsdp:
            shards.bind_grads()
        try:
            self._step(fisher)
        finally:
            for shards in fsdp:
                shards.unbind_grads()

    def _step(self, fisher: dict[Tensor, Tensor]) -> None:
        # Every check first (a missing sampled gradient raises before any state changes).
        all_flags = [self._unit_flags(g, plan, fisher)
                     for g, plan in zip(self.param_groups, self._plans)]
        for group, plan, (flags, steps, bound) in zip(self.param_groups, self._plans, all_flags):
            # graft_norms="previous": one decision for the group's buckets and shared blocks
            lagged = bool(flags) and plan.lags_graft(group, flags, steps)
            if bound is None:
                step_buckets(group, plan, flags, steps, self.state, fisher, lagged)
            else:
                k = steps[id(plan.all_units[0])]
                bound.step(group, flags[id(plan.all_units[0])], k, lagged)
            for shared in plan.shared:
                active = [i for i, b in enumerate(shared.blocks) if id(b.unit) in flags]
                if active:
                    units = [shared.blocks[i].unit for i in active]
                    shared.step(group, momentum_coef(group), active,
                                [flags[id(u)] for u in units], [steps[id(u)] for u in units],
                                fisher, lagged)
            if group["graft"] == "adam" and flags:
                plan.graft_measured_now(flags)
            if bound is not None:  # every unit stepped (to k)
                for st in plan.unit_states:
                    st[STEP] = k
            else:
                for unit, st in zip(plan.all_units, plan.unit_states):
                    if id(unit) in steps:
                        st[STEP] = steps[id(unit)]
            if plan.sync is not None:
                plan.sync()

    def _refreshes_next(self, group: dict) -> bool:
        plan = self._plans[next(i for i, g in enumerate(self.param_groups) if g is group)]
        t1 = group["curvature_update_freq"]
        return any(self.state[u.params[0]][STEP] % t1 == 0 for u in plan.all_units)

    def _unit_flags(self, group: dict, plan: GroupPlan, fisher: dict[Tensor, Tensor]
                    ) -> tuple[dict[int, int], dict[int, int], BoundBuckets | None]:
        """For the units that have a gradient: id(unit) -> segment flags for this step, and
        id(unit) -> the step count it reaches (every rank's units when sharded: the checks and
        step counts are the same on every rank); and the group's buckets bound with this step's
        gradients where their step runs in one call (every unit steps)."""
        t1, t2 = group["curvature_update_freq"], group["inverse_update_freq"]

        def unit_flags(k: int) -> int:
            refresh = REFRESH | (FIRST if k == 1 else 0) if (k - 1) % t1 == 0 else 0
            return refresh | (REFACTOR if (k - 1) % t2 == 0 else 0)

        # The common case, taken at the cost of a few calls per parameter: every unit has a
        # dense real gradient and they have all stepped alike (no sampled gradients due).
        counts = {st[STEP] for st in plan.unit_states}
        if len(counts) == 1:
            k = counts.pop() + 1
            f = unit_flags(k)
            if not (f & REFRESH and group["fisher"] == "true"):
                ids = [id(u) for u in plan.all_units]
                uniform = dict.fromkeys(ids, f), dict.fromkeys(ids, k)
                # On the CPU the buckets' gradients are checked in C++ (BoundBuckets.of: which
                # steps take the general path).
                bound = BoundBuckets.of(group, plan, self.state, f, fisher)
                if bound is not None and bound.bind():
                    return *uniform, bound
                grads = [p.grad for u in plan.all_units for p in u.params]
                if all(g is not None and g.layout == torch.strided and not g.is_complex()
                       for g in grads):
                    return *uniform, None
        flags, steps = {}, {}
        for unit, st in zip(plan.all_units, plan.unit_states):
            grads = [p.grad for p in unit.params if p.grad is not None]
            if not grads:
                continue
            for g in grads:
                if g.layout != torch.strided:
                    raise RuntimeError(f"MBF: {unit.name} has a sparse gradient; MBF needs dense "
                                       "gradients (e.g. nn.Embedding(sparse=False))")
                if g.is_complex():
                    raise RuntimeError(f"MBF: {unit.name} has a complex gradient")
            k = steps[id(unit)] = st[STEP] + 1
            f = flags[id(unit)] = unit_flags(k)
            if (f & REFRESH and group["fisher"] == "true"
                    and not any(p in fisher for p in unit.params)):
                raise self._missing_fisher(unit.name)
        return flags, steps, None

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
        """Bytes of optimizer state (momentum, curvature, factors, compact padding, the grafted
        step's directions, Adam's v per block and the shared blocks' work buffers included)."""
        total = 0
        for plan in self._plans:
            for unit in plan.units:
                total += sum(t.nbytes for p in unit.params
                             for k, t in self.state[p].items() if k in (MOMENTUM, SECOND_MOMENT))
            for b in plan.buckets:
                total += b.curvature.nbytes + b.factor.nbytes
                total += 0 if b.directions is None else b.directions.nbytes
                total += 0 if b.block_second_moment is None else b.block_second_moment.nbytes
            total += sum(sh.nbytes for sh in plan.shared_blocks)
            total += sum(s.work_bytes() for s in plan.shared)
        return total

    def block_summary(self) -> list[dict]:
        """One row per bucket / shared block: group, kind, d, blocks, dtype, device, bytes (its
        curvature and factor state; a bucket also its factor's storage, factor_dtype); a shared
        block also its layer's name, ``rank`` (d when it is exact, "shared"; less when it is
        kept at a rank, "lowrank") and ``matmul``, the precision of the GEMM that applies it
        (shared_matmul as resolved for the block: docs/options.md)."""
        rows = []
        for gi, plan in enumerate(self._plans):
            for b in plan.buckets:
                rows.append(dict(group=gi, kind="blocks", d=b.d,
                                 blocks=sum(s.n_blocks for _, s, _ in b.entries),
                                 dtype=str(b.dtype), factor_dtype=str(b.factor.dtype),
                                 device=str(b.device),
                                 bytes=b.curvature.nbytes + b.factor.nbytes))
            for shared in plan.shared:
                matmul = shared.matmul(self.param_groups[gi])
                for sh in shared.blocks:
                    rows.append(dict(group=gi, kind="shared" if sh.lowrank is None else "lowrank",
                                     d=sh.d, blocks=1, dtype=str(sh.rows["work"].dtype),
                                     device=str(sh.stats.device), bytes=sh.nbytes,
                                     name=sh.unit.name, rank=sh.rank,
                                     matmul="bfloat16" if sh.bf16_applies(matmul) else
                                     "tf32" if matmul == "tf32" else "float32"))
        return rows
