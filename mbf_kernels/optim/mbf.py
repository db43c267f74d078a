"""The MBF optimizer (MBF_SPEC sections 2-5): a thin torch.optim.Optimizer over bucketed blocks.

At construction every parameter is mapped once to blocks (:mod:`.blocks`), and the blocks of
each param group are gathered into buckets of one block size: a bucket owns the compact
curvature and factor of all its blocks (:mod:`mbf_kernels.compact`), and each ``step()`` is one
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

from .. import reference
from ..compact import COMPACT_TILE, from_compact, to_compact
from ..dispatch import CHOICES, select
from ..packed import pack_tril, tril_size, unpack_tril
from .blocks import CONV1X1, LARGE_LINEAR, ModuleRoles, Segment, Unit, module_roles, plan_group

__all__ = ["MBF", "DEFAULTS"]

#: Defaults of every per-group option. lr and damping come from the sweep in bench/RESULTS.md
#: ("Optimizer defaults"); the rest are MBF_SPEC section 3's.
DEFAULTS: dict = dict(
    lr=0.01,
    momentum=0.9,
    beta=0.9,
    damping=0.3,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    curvature_update_freq=10,
    inverse_update_freq=100,
    max_block_size=64,
    large_linear="shared",
    conv1x1="conv",
    backend="auto",
)

# State keys (per parameter in ``optimizer.state``; the block state is added by state_dict()).
STEP = "step"  # int: step() calls that saw a gradient for this unit (kept on its first param)
MOMENTUM = "momentum_buffer"
CURVATURE = "curvature"  # list, one (n_blocks, d(d+1)/2) packed tensor per segment
FACTOR = "factor"  # same layout: packed L with its diagonal stored as 1 / L_ii
LAYOUT = "block_layout"  # list of (kind, d, n_blocks) per segment, checked on load
#: Options that describe this run rather than the optimization: kept on load_state_dict.
_RUN_OPTIONS = ("backend", "max_block_size", "large_linear", "conv1x1")

# Flags of a segment in the bucket op (csrc/registration.cpp).
_REFRESH, _FIRST, _REFACTOR = 1, 2, 4


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


@dataclass
class _Shared:
    """One shared block (spatial averaging) of a large linear layer, dense."""

    unit: Unit
    curvature: Tensor  # (d, d)
    factor: Tensor  # (d, d) lower, diagonal stored as 1 / L_ii (the canonical representation)
    inverse: Tensor  # (d, d) (F + damping I)^{-1}, derived from the factor
    stats: Tensor

    def derive_inverse(self) -> None:
        """The step applies the block to all rows at once, U = M (F + damping I)^{-1}: one GEMM,
        1.3-1.5x faster than cholesky_solve's triangular solves at d = 4097 (dev VM). Always
        derived from the stored factor, so that a loaded state gives the same bits."""
        L = self.factor.clone()
        L.diagonal().reciprocal_()
        self.inverse.copy_(torch.cholesky_inverse(L))


@dataclass
class _GroupPlan:
    units: list[Unit]
    buckets: list[_Bucket]
    shared: list[_Shared]


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
    if not isinstance(group["decoupled_weight_decay"], bool):
        raise ValueError("MBF: decoupled_weight_decay must be True or False, got "
                         f"{group['decoupled_weight_decay']!r}")
    for name, choices in (("large_linear", LARGE_LINEAR), ("conv1x1", CONV1X1),
                          ("backend", CHOICES)):
        if group[name] not in choices:
            raise ValueError(f"MBF: {name} must be one of {choices}, got {group[name]!r}")


class MBF(torch.optim.Optimizer):
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
                "_roles": None}

    # -- construction ---------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_group(group)
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
        shared: list[_Shared] = []
        for unit in units:
            p0 = unit.params[0]
            dtype, device = _state_dtype(p0), p0.device
            for p in unit.params:
                self.state[p][MOMENTUM] = torch.zeros(p.shape, dtype=dtype, device=device)
            self.state[p0][STEP] = 0
            if unit.kind == "shared":
                d = unit.segments[0].d
                zeros = torch.zeros(d, d, dtype=dtype, device=device)
                shared.append(_Shared(unit, zeros.clone(), zeros.clone(), zeros.clone(),
                                      torch.zeros(2, dtype=torch.int64, device=device)))
                continue
            for seg in unit.segments:
                if seg.n_blocks == 0:
                    continue
                bucket = buckets.setdefault((seg.d, dtype, device), _Bucket(seg.d, dtype, device))
                bucket.entries.append((unit, seg, bucket.tiles))
                bucket.tiles += -(-seg.n_blocks // COMPACT_TILE)
        for b in buckets.values():
            shape = (b.tiles, tril_size(b.d), COMPACT_TILE)
            b.curvature = torch.zeros(shape, dtype=b.dtype, device=b.device)
            b.factor = torch.zeros(shape, dtype=b.dtype, device=b.device)
        return _GroupPlan(units, list(buckets.values()), shared)

    # -- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, plan in zip(self.param_groups, self._plans):
            flags = self._unit_flags(group, plan)
            for bucket in plan.buckets:
                self._step_bucket(group, bucket, flags)
            for sh in plan.shared:
                if id(sh.unit) in flags:
                    self._step_shared(group, sh, flags[id(sh.unit)])
            for unit in plan.units:
                if id(unit) in flags:
                    self.state[unit.params[0]][STEP] += 1
        return loss

    def _unit_flags(self, group: dict, plan: _GroupPlan) -> dict[int, int]:
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

    def _step_bucket(self, group: dict, bucket: _Bucket, flags: dict[int, int]) -> None:
        index: dict[int, int] = {}
        params: list[Tensor] = []
        grads: list[Tensor] = []
        momenta: list[Tensor] = []
        staged: list[tuple[Tensor, Tensor]] = []

        def tensor_index(p: Tensor) -> int:
            i = index.get(id(p))
            if i is None:
                i = index[id(p)] = len(params)
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                work = p
                if p.dtype != bucket.dtype or not p.is_contiguous():
                    # bf16/fp16 (or channels_last) parameters: updated in a float32 (or
                    # contiguous) copy, written back rounded to the parameter's dtype.
                    work = p.to(dtype=bucket.dtype, memory_format=torch.contiguous_format,
                                copy=True)
                    staged.append((p, work))
                params.append(work)
                grads.append(g.to(bucket.dtype))
                momenta.append(self.state[p][MOMENTUM])
            return i

        segments: list[int] = []
        for unit, seg, tile0 in bucket.entries:
            f = flags.get(id(unit))
            if f is None:
                continue
            main = tensor_index(unit.params[seg.main])
            tail = -1 if seg.tail is None else tensor_index(unit.params[seg.tail])
            segments += [main, tail, seg.n_blocks, seg.offset, seg.width, seg.row_stride, tile0, f]
        if not segments:
            return
        self._bucket_step_fn(group, bucket)(
            params, grads, momenta, bucket.curvature, bucket.factor, bucket.stats, segments,
            lr=group["lr"], momentum_coef=group["momentum"], beta=group["beta"],
            damping=group["damping"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"])
        for p, work in staged:
            p.copy_(work)

    def _step_shared(self, group: dict, sh: _Shared, f: int) -> None:
        unit, seg = sh.unit, sh.unit.segments[0]
        dtype = sh.curvature.dtype
        # Segment views need contiguous tensors: a strided parameter is updated in a copy.
        ps = [p if p.is_contiguous() else p.contiguous() for p in unit.params]
        gs = [(p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
              for p in unit.params]
        ms = [self.state[p][MOMENTUM] for p in unit.params]
        beta, damping = group["beta"], group["damping"]
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        G = seg.rows(gs).to(dtype)  # (out, d)
        if f & _REFRESH:
            finite = torch.isfinite(G).all()
            C = G.mT @ G / max(G.shape[0], 1)
            new = C if f & _FIRST else beta * sh.curvature + (1 - beta) * C
            sh.curvature.copy_(torch.where(finite, new, sh.curvature))
            sh.stats[0] += (~finite).to(torch.int64)
        if f & _REFACTOR:
            F = sh.curvature
            L, info = torch.linalg.cholesky_ex(F + damping * torch.eye(
                F.shape[0], dtype=dtype, device=F.device))
            failed = info != 0
            L.diagonal().reciprocal_()
            fallback = torch.diag(reference.diagonal_fallback(F, damping))
            sh.factor.copy_(torch.where(failed, fallback, L))
            sh.derive_inverse()
            sh.stats[1] += failed.to(torch.int64)
        P = seg.rows(ps).to(dtype)
        M = seg.rows(ms)
        direction = G if group["decoupled_weight_decay"] else G + wd * P
        M.mul_(rho).add_(direction)
        seg.write_rows(ms, M)
        U = M @ sh.inverse  # u_j = (F + damping I)^{-1} m_j for every row j
        decay = lr * wd * P if group["decoupled_weight_decay"] else 0
        seg.write_rows(ps, P - lr * U - decay)
        for p, work in zip(unit.params, ps):
            if work is not p:
                p.copy_(work)

    # -- introspection ----------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Blocks whose curvature refresh was skipped (non-finite gradient) and whose
        factorisation failed (diagonal fallback), summed over all steps. Reading it syncs."""
        total = [0, 0]
        for plan in self._plans:
            for s in [b.stats for b in plan.buckets] + [sh.stats for sh in plan.shared]:
                if s is not None:
                    total[0] += int(s[0])
                    total[1] += int(s[1])
        return {"skipped_curvature": total[0], "failed_factor": total[1]}

    def state_bytes(self) -> int:
        """Bytes of optimizer state (momentum, curvature, factors, compact padding included)."""
        total = 0
        for plan in self._plans:
            for unit in plan.units:
                total += sum(self.state[p][MOMENTUM].nbytes for p in unit.params)
            for b in plan.buckets:
                total += b.curvature.nbytes + b.factor.nbytes
            for sh in plan.shared:
                total += sh.curvature.nbytes + sh.factor.nbytes + sh.inverse.nbytes
        return total

    def block_summary(self) -> list[dict]:
        """One row per bucket / shared block: group, d, blocks, dtype, device."""
        rows = []
        for gi, plan in enumerate(self._plans):
            for b in plan.buckets:
                rows.append(dict(group=gi, kind="blocks", d=b.d,
                                 blocks=sum(s.n_blocks for _, s, _ in b.entries),
                                 dtype=str(b.dtype), device=str(b.device)))
            for sh in plan.shared:
                rows.append(dict(group=gi, kind="shared", d=sh.curvature.shape[0], blocks=1,
                                 dtype=str(sh.curvature.dtype), device=str(sh.curvature.device),
                                 name=sh.unit.name))
        return rows

    # -- state_dict: the canonical layout of MBF_SPEC section 4 ------------------------------

    def _block_state(self, unit: Unit, plan: _GroupPlan) -> list[tuple[str, Segment, Tensor, Tensor]]:
        """(kind, segment, curvature view, factor view) of each segment of ``unit``."""
        if unit.kind == "shared":
            sh = next(s for s in plan.shared if s.unit is unit)
            return [("shared", unit.segments[0], sh.curvature, sh.factor)]
        out = []
        for bucket in plan.buckets:
            for u, seg, tile0 in bucket.entries:
                if u is unit:
                    tiles = -(-seg.n_blocks // COMPACT_TILE)
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
                    m = saved.get(j, {}).get(MOMENTUM)
                    if m is None or tuple(m.shape) != tuple(p.shape):
                        raise ValueError(f"MBF.load_state_dict: momentum of parameter {j} "
                                         f"missing or of the wrong shape")
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
                self.state[p][MOMENTUM].copy_(saved[index[id(p)]][MOMENTUM])
            for (kind, seg, C, L), c, f in zip(blocks, entry[CURVATURE], entry[FACTOR]):
                if kind == "shared":
                    C.copy_(unpack_tril(c[0].to(C)))
                    L.copy_(unpack_tril(f[0].to(L), symmetric=False))
                else:
                    # Padding blocks keep finite values (zeros), as on a fresh optimizer.
                    C.copy_(to_compact(c.to(C)))
                    L.copy_(to_compact(f.to(L)))
        for plan in self._plans:
            for sh in plan.shared:
                sh.derive_inverse()
