"""MBF's state_dict in the canonical layout of MBF_SPEC section 4, and a load that checks
everything before it changes anything (a mixin of :class:`~mbf_kernels.optim.MBF`)."""

from __future__ import annotations

from torch import Tensor

from ..layout import factor_rows, from_compact, n_tiles, stored_factor, to_compact
from .blocks import Segment, Unit
from .fsdp import LocalShards, blocks_per_row, local_part, rows_of, shard_blocks, shard_like
from .buckets import MOMENTUM, SECOND_MOMENT, STEP, GroupPlan
from .options import DEFAULTS, RUN_OPTIONS

CURVATURE = "curvature"  # list, one (n_blocks, d(d+1)/2) packed tensor per segment
FACTOR = "factor"  # same layout: packed L with its diagonal stored as 1 / L_ii
LAYOUT = "block_layout"  # list of (kind, d, n_blocks) per segment, checked on load
# graft_norms="previous": the unit's last measured graft ratio |a| / |u| (a 0-dim tensor), which
# its next step's buckets scale by; absent where none was measured (the next step measures).
GRAFT_RATIO = "graft_ratio"
# graft_second_moment="block": Adam's v of the unit's mini-blocks, one per block: a list, one
# (n_blocks,) tensor per segment. A load converts from and to the per-entry v (exp_avg_sq on
# each parameter): a block's v is the mean of its entries' (the EMA is linear); the entries
# of a block loaded from one take the block's.
BLOCK_SECOND_MOMENT = "block_exp_avg_sq"


def _same_layout(got: list[tuple], want: list[tuple]) -> bool:
    """Equal layouts; a low-rank block's rank may differ (LowRankCurvature.load converts)."""
    return len(got) == len(want) and all(
        g == w or (g[0] == w[0] == "lowrank" and g[1] == w[1]) for g, w in zip(got, want))


def _entries(unit: Unit, plan: GroupPlan) -> list[tuple]:
    """(bucket, segment, first tile) of each of ``unit``'s segments in the plan's buckets, in
    the order its saved block state lists them."""
    return [(b, seg, tile0) for b in plan.buckets for u, seg, tile0 in b.entries if u is unit]


class CanonicalState:
    """state_dict / load_state_dict over ``self._plans`` (one :class:`GroupPlan` per group)."""

    _plans: list[GroupPlan]

    def _block_state(self, unit: Unit, plan: GroupPlan) -> list[tuple[str, Segment, Tensor, Tensor]]:
        """(kind, segment, curvature view, factor view) of each segment of ``unit``; a shared
        block is one entry (kind "shared", its segment, the :class:`SharedBlock`, None)."""
        if unit.kind == "shared":
            sh = next(s for s in plan.shared_blocks if s.unit is unit)
            return [("shared", unit.segments[0], sh, None)]
        return [("blocks", seg, b.curvature[t0:t0 + n_tiles(seg.n_blocks)],
                 b.factor[t0:t0 + n_tiles(seg.n_blocks)]) for b, seg, t0 in _entries(unit, plan)]

    @staticmethod
    def _block_moments(unit: Unit, plan: GroupPlan) -> list[tuple[Segment, Tensor]] | None:
        """(segment, compact (tiles, 16) view of its blocks' v) per segment of ``unit``, where
        its buckets keep Adam's v per block (graft_second_moment="block"); None otherwise."""
        entries = [] if unit.kind == "shared" else _entries(unit, plan)
        if not entries or any(b.block_second_moment is None for b, _, _ in entries):
            return None
        return [(seg, b.block_second_moment[t0:t0 + n_tiles(seg.n_blocks)])
                for b, seg, t0 in entries]

    def _keyed_by_params(self) -> dict:
        """self.state keyed by the param groups' parameters, as torch's Optimizer.state_dict
        reads it: under FSDP2 MBF keys its state by the local shards, which become the
        DTensor parameters' again, their tensors DTensors laid out as the parameters."""
        out = dict(self.state)
        for plan in self._plans:
            if plan.shards is None:
                continue
            for p, local in zip(plan.shards.dtensors, plan.shards.locals):
                out.pop(local, None)
                out[p] = {k: shard_like(v, p) if isinstance(v, Tensor) and v.shape == local.shape
                          else v for k, v in self.state[local].items()}
        return out

    def _param_index(self) -> dict[int, int]:
        """id(param) -> its index in the state dict (an FSDP2 local shard: its parameter's)."""
        ids = [id(p) for g in self.param_groups for p in g["params"]]
        index = {pid: i for i, pid in enumerate(ids)}
        for plan in self._plans:
            if plan.shards is not None:
                for p, local in zip(plan.shards.dtensors, plan.shards.locals):
                    index[id(local)] = index[id(p)]
        return index

    @staticmethod
    def _layout(unit: Unit, blocks: list, shards: LocalShards | None) -> list[tuple]:
        """The unit's block layout as saved: (kind, d, n_blocks) per segment, n_blocks over all
        ranks under FSDP2 (``shards``: every rank saves and checks the same)."""
        out = []
        for kind, seg, C, _ in blocks:
            if kind == "shared":
                out.append(C.layout())
                continue
            n = seg.n_blocks
            if shards is not None:
                main = unit.params[seg.main]
                n = rows_of(shards.dtensor_of(main)) * blocks_per_row(main, seg.row_stride)
            out.append((kind, seg.d, n))
        return out

    def state_dict(self) -> dict:
        """torch's state_dict plus, per unit (on its first parameter), the canonical block
        state: ``curvature`` and ``factor`` as lists (one per segment) of (n_blocks, T) packed
        lower triangles, row-major, and ``block_layout``; momentum in the parameter's shape."""
        local_state, self.state = self.state, self._keyed_by_params()
        try:
            sd = super().state_dict()
        finally:
            self.state = local_state
        index = self._param_index()
        for plan in self._plans:
            for unit, measured in zip(plan.units, plan.graft_measured):
                i = index[id(unit.params[0])]
                entry = dict(sd["state"].get(i, {}))
                scales = plan.graft_ratios(unit)
                if measured and scales:
                    entry[GRAFT_RATIO] = scales[0][0].clone()
                curv, fac = [], []
                blocks = self._block_state(unit, plan)
                for kind, seg, C, L in blocks:
                    if kind == "shared":  # the same on every rank (FSDP2: replicated)
                        c, f = C.canonical()
                    else:
                        c, f = from_compact(C, seg.n_blocks), factor_rows(L, seg.n_blocks, seg.d)
                        if plan.shards is not None:  # laid out as the parameter's shards
                            local = unit.params[seg.main]
                            p = plan.shards.dtensor_of(local)
                            c, f = (shard_blocks(x, local, p, seg.row_stride) for x in (c, f))
                    curv.append(c)
                    fac.append(f)
                entry.update({CURVATURE: curv, FACTOR: fac,
                              LAYOUT: self._layout(unit, blocks, plan.shards)})
                moments = self._block_moments(unit, plan)
                if moments is not None:
                    blocks_v = [v.reshape(-1)[:seg.n_blocks].clone() for seg, v in moments]
                    if plan.shards is not None:  # (n, 1) rows, laid out as the shards
                        blocks_v = [shard_blocks(v[:, None], unit.params[seg.main],
                                                 plan.shards.dtensor_of(unit.params[seg.main]),
                                                 seg.row_stride)
                                    for (seg, _), v in zip(moments, blocks_v)]
                    entry[BLOCK_SECOND_MOMENT] = blocks_v
                sd["state"][i] = entry
        return sd

    def _load_groups(self, state_dict: dict) -> None:
        """The param groups' hyper-parameters (lr schedules) from a state dict, but for the
        options that belong to this run: the backend and the block layout (a run saved on CPU
        resumes on a GPU; the layout was checked equal), and any option the saved groups lack
        (saved by a version without it), which keeps this optimizer's value."""
        own = [{k: g[k] for k in DEFAULTS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, opts in zip(self.param_groups, own):
            g.update({k: opts[k] for k in RUN_OPTIONS})
            for k, v in opts.items():
                g.setdefault(k, v)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict saved by MBF on any backend/device; values are copied into this
        optimizer's buffers (dtype and device of its state, never the parameters' dtype)."""
        saved = {i: {k: ([local_part(x) for x in v] if k in (CURVATURE, FACTOR) else
                         [local_part(x).reshape(-1) for x in v] if k == BLOCK_SECOND_MOMENT else
                         local_part(v)) for k, v in entry.items()}
                 for i, entry in state_dict["state"].items()}
        # The saved state's keys, in parameter order, as torch's Optimizer maps them: the saved
        # groups' "params" lists (ints from state_dict(); fully qualified names when
        # torch.distributed.checkpoint's set_optimizer_state_dict loads it).
        saved_keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        own = self._param_index()
        n_own = sum(len(g["params"]) for g in self.param_groups)
        if len(saved_keys) != n_own:
            raise ValueError(f"MBF.load_state_dict: the state dict has {len(saved_keys)} "
                             f"parameters, this optimizer {n_own}")
        index = {pid: saved_keys[i] for pid, i in own.items()}
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
                want = self._layout(unit, blocks, plan.shards)
                got = [tuple(x) for x in entry[LAYOUT]]
                if not _same_layout(got, want):
                    raise ValueError(f"MBF.load_state_dict: {unit.name} was saved with block "
                                     f"layout {got}, this optimizer has {want} (different "
                                     "max_block_size, large_linear, shared_rank, conv1x1 or "
                                     "from_model?)")
                self._check_moments(unit, plan, entry, saved, index)
                todo.append((unit, blocks, entry))
        stripped = dict(state_dict)
        stripped["state"] = {}
        own_state = dict(self.state)  # (under FSDP2 keyed by the local shards)
        self._load_groups(stripped)
        for p, st in own_state.items():
            self.state[p] = st
        for plan in self._plans:  # the other ranks' units (shard_curvature): their step counts
            owned = {id(u) for u in plan.units}
            for unit in plan.all_units:
                entry = saved.get(index[id(unit.params[0])], {})
                if id(unit) not in owned and STEP in entry:
                    self.state[unit.params[0]][STEP] = int(entry[STEP])
        for unit, blocks, entry in todo:
            st = self.state[unit.params[0]]
            st[STEP] = int(entry[STEP])
            for p in unit.params:
                for key in (MOMENTUM, SECOND_MOMENT):
                    if key in self.state[p] and not (key == SECOND_MOMENT and
                                                     BLOCK_SECOND_MOMENT in entry):
                        self.state[p][key].copy_(saved[index[id(p)]][key])
            self._load_second_moments(unit, plan, entry, saved, index)
            for (kind, seg, C, L), c, f in zip(blocks, entry[CURVATURE], entry[FACTOR]):
                if kind == "shared":
                    C.load(c, f)
                else:
                    # Padding blocks keep finite values (zeros), as on a fresh optimizer.
                    C.copy_(to_compact(c.to(C)))
                    L.copy_(stored_factor(f, L))
        self._load_graft_ratios(saved, index)

    def _check_moments(self, unit: Unit, plan: GroupPlan, entry: dict, saved: dict,
                       index: dict[int, int]) -> None:
        """ValueError where the saved state lacks ``unit``'s momentum or Adam's v (per entry, or
        per block: BLOCK_SECOND_MOMENT, which converts either way) or has them misshapen."""
        saved_blocks = entry.get(BLOCK_SECOND_MOMENT)
        per_block = saved_blocks is not None
        for p in unit.params:
            j = index[id(p)]
            for key in (MOMENTUM, SECOND_MOMENT):
                if key not in self.state[p] or (key == SECOND_MOMENT and per_block):
                    continue  # (per entry from per block: _load_second_moments)
                m = saved.get(j, {}).get(key)
                if m is None or tuple(m.shape) != tuple(p.shape):
                    raise ValueError(
                        f"MBF.load_state_dict: {key} of parameter {j} missing or of the "
                        "wrong shape" + (" (saved without graft='adam'?)"
                                         if key == SECOND_MOMENT else ""))
        moments = self._block_moments(unit, plan)
        if moments is not None and not per_block:  # from the per-entry v
            for p in unit.params:
                v = saved.get(index[id(p)], {}).get(SECOND_MOMENT)
                if v is None or tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"MBF.load_state_dict: no Adam second moment for {unit.name} "
                        f"(neither {BLOCK_SECOND_MOMENT} nor {SECOND_MOMENT} of the "
                        "right shape; saved without graft='adam'?)")
        if per_block and [v.numel() for v in saved_blocks] != [
                seg.n_blocks for _, seg, _ in _entries(unit, plan)]:
            raise ValueError(f"MBF.load_state_dict: {BLOCK_SECOND_MOMENT} of "
                             f"{unit.name} does not match its blocks")

    def _load_second_moments(self, unit: Unit, plan: GroupPlan, entry: dict, saved: dict,
                             index: dict[int, int]) -> None:
        """Adam's v of ``unit``'s mini-blocks where the saved state and this optimizer keep it
        differently (BLOCK_SECOND_MOMENT; checked by load_state_dict)."""
        blocks = entry.get(BLOCK_SECOND_MOMENT)
        moments = self._block_moments(unit, plan)
        if moments is not None:
            if blocks is not None:
                per_block = blocks
            else:
                saved_v = [saved[index[id(p)]][SECOND_MOMENT] for p in unit.params]
                per_block = [seg.rows(saved_v).mean(1) for seg, _ in moments]
            for (seg, view), v in zip(moments, per_block):
                view.reshape(-1)[:seg.n_blocks] = v.to(view)
        elif blocks is not None and unit.kind != "shared":
            own_v = [self.state[p][SECOND_MOMENT] for p in unit.params]
            for (_, seg, _), v in zip(_entries(unit, plan), blocks):
                seg.write_rows(own_v, v.to(own_v[0])[:, None].expand(seg.n_blocks, seg.d))

    def _load_graft_ratios(self, saved: dict, index: dict[int, int]) -> None:
        """The units' saved graft ratios into the plans; a unit saved without one measures
        its own at its next step (GroupPlan.lags_graft)."""
        for plan in self._plans:
            plan.forget_graft_ratios()
            for pos, unit in enumerate(plan.units):
                ratio = saved[index[id(unit.params[0])]].get(GRAFT_RATIO)
                scales = plan.graft_ratios(unit)
                if ratio is not None and scales:
                    for view in scales:
                        view.copy_(ratio.expand_as(view))
                    plan.graft_measured[pos] = True
            plan.graft_ready = all(plan.graft_measured)
