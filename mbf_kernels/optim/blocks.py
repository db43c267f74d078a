"""Parameters -> mini-blocks: the rules of MBF_SPEC section 2, decided once per parameter.

A :class:`Unit` is what keeps one step counter: a parameter, or a Linear weight with its
bias. Its blocks are described by :class:`Segment` s, each a strided run of same-size blocks:
block i of a segment is ``params[main].flatten()[offset + i * row_stride:][:width]``, followed
by ``params[tail][i]`` when the segment has a tail (the bias joined to its weight row). That is
exactly the layout the fused bucket-step kernel reads in place (csrc/registration.cpp), so no
parameter, gradient or momentum is ever copied into block order.

Kinds of unit: ``"blocks"`` (one curvature block per block of its segments, which may have
several sizes when a wide row is chunked) and ``"shared"`` (one d x d block for all rows of a
large linear layer: the paper's spatial averaging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layout import Segment  # the layout the bucket-step op reads

#: Values of the per-group option ``large_linear``.
LARGE_LINEAR = ("auto", "shared", "lowrank", "chunk", "diagonal")
#: Values of the per-group option ``conv1x1``.
CONV1X1 = ("conv", "row")
#: What a module-aware walk says a parameter is (None: decide by shape).
ROLES = ("conv", "linear", "embedding", "diagonal")


@dataclass(eq=False)  # identity: two units are never "equal" by their tensors' values
class Unit:
    """A parameter (or weight + bias) with its block layout. ``name`` is for messages."""

    params: list[Tensor]
    kind: str  # "blocks" | "shared"
    segments: list[Segment]
    name: str
    rank: int | None = None  # a shared block kept at this rank (.lowrank); None: exact
    index: int = 0  # its first parameter's index in the optimizer (seeds its random numbers)
    global_rows: int | None = None  # FSDP2: the layer's rows on all ranks (None: its own)

    @property
    def rows(self) -> int:
        """The layer's rows a shared block averages over (all ranks' under FSDP2)."""
        return self.segments[0].n_blocks if self.global_rows is None else self.global_rows

    @property
    def n_blocks(self) -> int:
        return 1 if self.kind == "shared" else sum(s.n_blocks for s in self.segments)


def _diagonal(index: int, p: Tensor) -> Segment:
    return Segment(index, None, p.numel(), 0, 1, 1)


def _rows(weight: Tensor, has_bias: bool, group: dict, name: str,
          global_rows: int | None = None) -> Unit:
    """A (out, in) row layout (linear, embedding, 1x1 conv as rows) with an optional bias;
    ``global_rows``: out on all ranks, when ``weight`` is an FSDP2 shard."""
    out = weight.shape[0]
    width = math.prod(weight.shape[1:])  # (an FSDP2 shard may have no rows)
    d = width + has_bias
    tail = 1 if has_bias else None  # index of the bias in Unit.params
    if d <= group["max_block_size"]:
        return Unit([], "blocks", [Segment(0, tail, out, 0, width, width)], name)
    mode = group["large_linear"]
    if mode in ("auto", "shared", "lowrank"):
        return Unit([], "shared", [Segment(0, tail, out, 0, width, width)], name,
                    rank=shared_rank(mode, out if global_rows is None else global_rows, d,
                                     group["shared_rank"] or default_rank(weight.device)),
                    global_rows=global_rows)
    if mode == "diagonal":
        segs = [Segment(0, None, weight.numel(), 0, 1, 1)]
        if has_bias:
            segs.append(Segment(1, None, out, 0, 1, 1))
        return Unit([], "blocks", segs, name)
    # "chunk": consecutive pieces of at most max_block_size of the row [W[j, :], b[j]]; the
    # piece that reaches past the weight's columns takes the bias as its tail.
    size = group["max_block_size"]
    segs = []
    for c0 in range(0, d, size):
        c1 = min(c0 + size, d)
        w = min(c1, width) - c0
        segs.append(Segment(0, tail if c1 > width else None, out, c0, w, width))
    return Unit([], "blocks", segs, name)


#: The rank of a low-rank shared block when ``shared_rank`` is None, by device type: the largest
#: power of two whose two GEMMs (4 k FLOPs per weight) cost about one AdamW step (28 bytes per
#: weight) at the device's FLOP-per-byte balance: ~2 on a CPU (the dev VM: ~150 GFLOP/s of
#: skinny GEMM, 60-100 GB/s), ~50 on an H200 with TF32 tensor cores (capped at 128: a refresh's
#: QR and eigh grow as d k^2 and k^3). Other devices (and meta) take the CPU's.
AUTO_RANK = {"cuda": 128}
AUTO_RANK_DEFAULT = 16


def default_rank(device) -> int:
    return AUTO_RANK.get(torch.device(device).type, AUTO_RANK_DEFAULT)


#: "auto" keeps a shared block exact while its step is this cheap (the GEMM U = M F^-1, 2 n d^2
#: FLOPs: about 0.4 ms on the dev VM's 2 cores), and its d x d matrices this small (d^2
#: entries each; three are kept). Below both, a rank-k block would not be cheaper: its refresh
#: alone (a QR, a Cholesky and an eigh of size k + p, and their launches) takes 0.3-0.7 ms.
EXACT_MAX_FLOPS = 1 << 26
EXACT_MAX_ENTRIES = 1 << 20


def shared_rank(mode: str, n: int, d: int, rank: int) -> int | None:
    """The rank a shared block of n rows of size d is kept at (None: exact) under
    ``large_linear=mode`` with ``shared_rank=rank``. "auto" keeps it exact when that is no more
    work per step than rank k (d <= 2k: the exact GEMM costs 2 d FLOPs per weight, the
    low-rank one's two 4 k), or when the exact block is small and cheap in absolute terms
    (:data:`EXACT_MAX_FLOPS`, :data:`EXACT_MAX_ENTRIES`)."""
    if mode == "shared":
        return None
    if mode == "auto" and (d <= 2 * rank or (
            d * d <= EXACT_MAX_ENTRIES and 2 * n * d * d <= EXACT_MAX_FLOPS)):
        return None
    return min(rank, d)


def plan_unit(weight: Tensor, bias: Tensor | None, role: str | None, group: dict,
              name: str, global_rows: int | None = None) -> Unit:
    """The unit for ``weight`` (with ``bias`` paired into its rows, for a linear role);
    ``global_rows``: its dim 0 on all ranks, when it is an FSDP2 shard."""
    if role not in (None, *ROLES):
        raise ValueError(f"MBF: unknown block role {role!r} for {name}; expected one of {ROLES}")
    ndim = weight.ndim
    if role is None:
        role = "conv" if ndim >= 3 else ("linear" if ndim == 2 else "diagonal")
    if role == "diagonal" or ndim <= 1:
        unit = Unit([], "blocks", [_diagonal(0, weight)], name)
    elif role == "conv":
        kernel = math.prod(weight.shape[2:])
        if kernel == 1 and group["conv1x1"] == "row":
            unit = _rows(weight, bias is not None, group, name, global_rows)
        else:
            n = weight.numel() // kernel if kernel else 0
            unit = Unit([], "blocks", [Segment(0, None, n, 0, kernel, kernel)], name)
            bias = None  # a conv bias is diagonal: its own unit
    else:  # linear or embedding rows
        unit = _rows(weight, bias is not None, group, name, global_rows)
    uses_bias = any(s.tail == 1 or s.main == 1 for s in unit.segments)
    unit.params = [weight, bias] if uses_bias else [weight]
    return unit


@dataclass(frozen=True)
class ModuleRoles:
    """What :meth:`MBF.from_model` learned from the modules: roles and weight -> bias pairs."""

    roles: dict[int, str]  # id(param) -> role
    bias_of: dict[int, Tensor]  # id(weight) -> its bias, for Linear (and 1x1 conv as rows)
    names: dict[int, str]  # id(param) -> qualified name


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d)
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def module_roles(model: nn.Module) -> ModuleRoles:
    """Walk ``model`` once: convolutions, linears (with their biases), embeddings, norms."""
    roles: dict[int, str] = {}
    bias_of: dict[int, Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if not isinstance(weight, nn.Parameter):
            continue
        if isinstance(module, _CONV_TYPES):
            roles[id(weight)] = "conv"
            if bias is not None:
                roles[id(bias)] = "diagonal"
                # A 1x1 conv used as rows takes its bias like a linear; the group decides.
                bias_of[id(weight)] = bias
        elif isinstance(module, nn.Linear):
            roles[id(weight)] = "linear"
            if bias is not None:
                bias_of[id(weight)] = bias
        elif isinstance(module, nn.Embedding):
            roles[id(weight)] = "embedding"
        elif isinstance(module, _NORM_TYPES):
            roles[id(weight)] = "diagonal"
            if bias is not None:
                roles[id(bias)] = "diagonal"
    return ModuleRoles(roles, bias_of, names)


def plan_group(params: list[Tensor], group: dict, roles: ModuleRoles | None,
               first_index: int, global_rows: dict[int, int] | None = None) -> list[Unit]:
    """The units of one param group, in parameter order (a paired bias joins its weight);
    ``global_rows``: id(param) -> its dim 0 on all ranks, for FSDP2 shards."""
    in_group = {id(p) for p in params}
    paired: set[int] = set()
    units: list[Unit] = []
    if roles is not None:
        for p in params:
            bias = roles.bias_of.get(id(p))
            if bias is not None and id(bias) in in_group and bias.requires_grad == p.requires_grad:
                paired.add(id(bias))
    for i, p in enumerate(params):
        if id(p) in paired:
            continue  # handled with its weight (if the weight's layout used it)
        name = (roles.names.get(id(p)) if roles else None) or f"parameter {first_index + i}"
        role = roles.roles.get(id(p)) if roles else None
        bias = roles.bias_of.get(id(p)) if roles else None
        bias = bias if bias is not None and id(bias) in paired else None
        unit = plan_unit(p, bias, role, group, name, (global_rows or {}).get(id(p)))
        unit.index = first_index + i
        units.append(unit)
        if bias is not None and len(unit.params) == 1:
            # The layout did not use the bias (a conv bias, or a 1x1 conv kept as a conv):
            # it is diagonal on its own.
            bname = (roles.names.get(id(bias)) if roles else None) or f"bias of {name}"
            units.append(plan_unit(bias, None, "diagonal", group, bname))
    return units
