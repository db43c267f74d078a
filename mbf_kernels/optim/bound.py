"""A param group's buckets bound once to the C++ ``BoundBuckets`` (CPU), which steps them all
in one call in the step's common case (:class:`BoundBuckets`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import cpu_ops
from .buckets import MOMENTUM, REFACTOR, SECOND_MOMENT, GroupPlan, static_segments
from .options import momentum_coef


class BoundBuckets:
    """A group's buckets bound once to the C++ ``BoundBuckets`` (CPU), which steps all of them
    in one call when every unit steps alike (flags, step count) and every gradient is dense,
    contiguous and of its parameter's dtype: the step :func:`step_buckets` takes then, without
    the per-bucket argument lists and per-parameter checks that were 0.3 of a ResNet-32's
    0.7 ms step. ``params`` are the buckets' distinct tensors; ``others`` the group's other
    parameters (the shared blocks'), whose gradients :meth:`bind` checks too."""

    def __init__(self, group: dict, plan: GroupPlan, state: dict) -> None:
        index: dict[int, int] = {}
        self.params: list[Tensor] = []
        segments, counts = [], []
        for b in plan.buckets:
            b.step_function(group["backend"])  # its stats
            # tensors numbered across the group's buckets: one list for the whole call
            segments += [f for _, fields in static_segments(b, self.params, index)
                         for f in fields]
            counts.append(len(b.entries))
        self.others = [p for u in plan.all_units for p in u.params if id(p) not in index]
        # The grafted step's tensors, where the plan has them (graft="adam" at construction):
        # Adam's v per entry (the parameters') or per block (the buckets'; then no parameter of
        # theirs has its own).
        per_block = all(b.block_second_moment is not None for b in plan.buckets)
        entry_v = all(SECOND_MOMENT in state[p] for p in self.params)
        self.graft = per_block or entry_v
        self.buckets = plan.buckets
        graft = []
        if self.graft:
            for b in plan.buckets:
                graft += [b.tile_norms, b.tile_scale, b.tile_unit, b.entry_tiles, b.entry_unit,
                          b.block_second_moment if per_block else b.tile_scale.new_empty(0)]
        self.relative = plan.buckets[0].tile_damping is not None
        self.op = torch.classes.mbf_kernels.BoundBuckets(
            self.params, [state[p][MOMENTUM] for p in self.params],
            [state[p][SECOND_MOMENT] for p in self.params] if entry_v else [],
            *([getattr(b, name) for b in plan.buckets]
              for name in ("curvature", "factor", "stats")),
            graft, [b.tile_damping for b in plan.buckets] if self.relative else [],
            segments, counts, len(plan.units) + 1, self.others)

    @staticmethod
    def of(group: dict, plan: GroupPlan, state: dict, flags: int,
           fisher: dict[Tensor, Tensor]) -> "BoundBuckets | None":
        """The plan's bound buckets (built at their first use) where they serve this step:
        None for buckets not all on the CPU's C++ ops in one dtype, parameters of another dtype
        (stepped in float32 copies), sharded or FSDP2 plans (whose units and reductions span
        ranks), sampled gradients, relative damping's refactor (its sums run in torch), and a
        grafted step without the grafted state."""
        if plan.bound is None:
            b0 = plan.buckets[0] if plan.buckets else None
            ok = (b0 is not None and plan.shards is None and plan.sync is None
                  and all(cpu_ops(group, b.device) and b.dtype == b0.dtype
                          for b in plan.buckets)
                  and all(p.dtype == b0.dtype for u in plan.units for p in u.params))
            plan.bound = BoundBuckets(group, plan, state) if ok else False
        bound = plan.bound
        relative = group["damping_mode"] == "relative"
        if (not bound or (fisher and group["fisher"] == "true")
                or (relative and (flags & REFACTOR or not bound.relative))
                or (group["graft"] == "adam" and not bound.graft)):
            return None
        return bound

    def bind(self) -> bool:
        """Whether this step's gradients qualify (kept in the C++ object for :meth:`step`),
        the others' too: present, dense, real."""
        return self.op.bind()

    def step(self, group: dict, flags: int, step: int, lagged: bool = False) -> None:
        """Every bucket's step, every unit stepping with ``flags`` to ``step``; ``lagged``:
        grafted in one pass at the previous step's ratios (:meth:`GroupPlan.lags_graft`)."""
        graft = group["graft"] == "adam"
        two_pass = graft and not lagged
        self.op.step(flags, step, group["lr"], momentum_coef(group), group["beta"],
                     group["damping"], group["weight_decay"], group["decoupled_weight_decay"],
                     group["betas"][1], group["eps"], group["damping_mode"] == "relative",
                     graft, lagged, [b.scratch_directions() for b in self.buckets] if two_pass
                     else [])
        if two_pass:
            for b in self.buckets:
                b.release_directions(group)
