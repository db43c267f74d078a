"""MBF's state_dict in the canonical layout of MBF_SPEC section 4, and a load that checks
everything before it changes anything (a mixin of :class:`~mbf_kernels.optim.MBF`)."""

from __future__ import annotations

from torch import Tensor

from ..layout import from_compact, n_tiles, to_compact
from .blocks import Segment, Unit
from .buckets import MOMENTUM, SECOND_MOMENT, STEP, GroupPlan
from .options import RUN_OPTIONS

CURVATURE = "curvature"  # list, one (n_blocks, d(d+1)/2) packed tensor per segment
FACTOR = "factor"  # same layout: packed L with its diagonal stored as 1 / L_ii
LAYOUT = "block_layout"  # list of (kind, d, n_blocks) per segment, checked on load


def _same_layout(got: list[tuple], want: list[tuple]) -> bool:
    """Equal layouts; a low-rank block's rank may differ (LowRankCurvature.load converts)."""
    return len(got) == len(want) and all(
        g == w or (g[0] == w[0] == "lowrank" and g[1] == w[1]) for g, w in zip(got, want))


class CanonicalState:
    """state_dict / load_state_dict over ``self._plans`` (one :class:`GroupPlan` per group)."""

    _plans: list[GroupPlan]

    def _block_state(self, unit: Unit, plan: GroupPlan) -> list[tuple[str, Segment, Tensor, Tensor]]:
        """(kind, segment, curvature view, factor view) of each segment of ``unit``; a shared
        block is one entry (kind "shared", its segment, the :class:`SharedBlock`, None)."""
        if unit.kind == "shared":
            sh = next(s for s in plan.shared_blocks if s.unit is unit)
            return [("shared", unit.segments[0], sh, None)]
        out = []
        for bucket in plan.buckets:
            for u, seg, tile0 in bucket.entries:
                if u is unit:
                    tiles = n_tiles(seg.n_blocks)
                    out.append(("blocks", seg, bucket.curvature[tile0:tile0 + tiles],
                                bucket.factor[tile0:tile0 + tiles]))
        return out

    def _refuse_fsdp(self, what: str) -> None:
        # The state of FSDP2 shards would have to be saved as DTensors for
        # torch.distributed.checkpoint to place it; until it is, refuse rather than write a
        # checkpoint that would load wrong.
        if any(plan.shards is not None for plan in self._plans):
            raise NotImplementedError(f"MBF.{what}: the optimizer state of FSDP2 (fully_shard) "
                                      "parameters cannot be saved or loaded yet (DDP's can, "
                                      "with torch.distributed.checkpoint)")

    def _param_index(self) -> dict[int, int]:
        ids = [id(p) for g in self.param_groups for p in g["params"]]
        return {pid: i for i, pid in enumerate(ids)}

    def state_dict(self) -> dict:
        """torch's state_dict plus, per unit (on its first parameter), the canonical block
        state: ``curvature`` and ``factor`` as lists (one per segment) of (n_blocks, T) packed
        lower triangles, row-major, and ``block_layout``; momentum in the parameter's shape."""
        self._refuse_fsdp("state_dict")
        sd = super().state_dict()
        index = self._param_index()
        for plan in self._plans:
            for unit in plan.units:
                i = index[id(unit.params[0])]
                entry = dict(sd["state"].get(i, {}))
                curv, fac, layout = [], [], []
                for kind, seg, C, L in self._block_state(unit, plan):
                    if kind == "shared":
                        c, f = C.canonical()
                        curv.append(c)
                        fac.append(f)
                        layout.append(C.layout())
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
        self._refuse_fsdp("load_state_dict")
        saved = state_dict["state"]
        # The saved state's keys, in parameter order, as torch's Optimizer maps them: the saved
        # groups' "params" lists (ints from state_dict(); fully qualified names when
        # torch.distributed.checkpoint's set_optimizer_state_dict loads it).
        saved_keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        own = [id(p) for g in self.param_groups for p in g["params"]]
        if len(saved_keys) != len(own):
            raise ValueError(f"MBF.load_state_dict: the state dict has {len(saved_keys)} "
                             f"parameters, this optimizer {len(own)}")
        index = dict(zip(own, saved_keys))
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
                want = [C.layout() if k == "shared" else (k, s.d, s.n_blocks)
                        for k, s, C, _ in blocks]
                got = [tuple(x) for x in entry[LAYOUT]]
                if not _same_layout(got, want):
                    raise ValueError(f"MBF.load_state_dict: {unit.name} was saved with block "
                                     f"layout {got}, this optimizer has {want} (different "
                                     "max_block_size, large_linear, shared_rank, conv1x1 or "
                                     "from_model?)")
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
        own_options = [{k: g[k] for k in RUN_OPTIONS} for g in self.param_groups]
        super().load_state_dict(stripped)  # param groups: hyper-parameters, lr schedules
        for g, opts in zip(self.param_groups, own_options):
            g.update(opts)
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
                    if key in self.state[p]:
                        self.state[p][key].copy_(saved[index[id(p)]][key])
            for (kind, seg, C, L), c, f in zip(blocks, entry[CURVATURE], entry[FACTOR]):
                if kind == "shared":
                    C.load(c, f)
                else:
                    # Padding blocks keep finite values (zeros), as on a fresh optimizer.
                    C.copy_(to_compact(c.to(C)))
                    L.copy_(to_compact(f.to(L)))
