"""Curvature sharded across data-parallel ranks (option ``shard_curvature``, issue 15).

Under DDP every rank holds the same all-reduced gradients, so every rank would refresh, factor
and apply the same blocks. With sharding each rank owns a share of a param group's units (a
layer's weight with its bias, or a parameter), chosen once by a greedy balance of their
curvature state bytes, identically on every rank: it keeps state (curvature, factor, momentum,
Adam's v) and does the work for its own units only, and after the step one all-gather per
parameter dtype hands every rank the updated parameters of the others. Every unit's update
depends on its own state and gradient only (grafting and relative damping are per unit), so the
result is the unsharded one's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..packed import tril_size
from .blocks import Unit

#: State key: the rank that owns a parameter's unit (informational; a load keeps its own).
SHARD_OWNER = "shard_owner"

#: Values of the per-group option ``shard_curvature``: None shards when a default process
#: group is initialised with more than one rank.
SHARD = (None, True, False)


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wants_sharding(option: bool | None) -> bool:
    """True or None (the default) with a process group of more than one rank."""
    return option is not False and world()[1] > 1


def curvature_bytes(unit: Unit, itemsize: int = 4) -> int:
    """The curvature and factor bytes a unit's blocks keep (what sharding balances)."""
    if unit.kind == "shared":
        d = unit.segments[0].d
        return (3 * d * d if unit.rank is None else 2 * d * unit.rank) * itemsize
    return sum(2 * s.n_blocks * tril_size(s.d) for s in unit.segments) * itemsize


def assign_owners(units: list[Unit], loads: list[int]) -> list[int]:
    """The owning rank of each unit: largest first, to the least loaded rank (ties: lowest
    rank). ``loads`` (bytes per rank so far, across groups) is updated in place."""
    owners = [0] * len(units)
    order = sorted(range(len(units)), key=lambda i: (-curvature_bytes(units[i]), i))
    for i in order:
        r = min(range(len(loads)), key=lambda j: (loads[j], j))
        owners[i] = r
        loads[r] += curvature_bytes(units[i]) + 1  # + 1: spread units of no curvature too
    return owners


class ShardSync:
    """After a sharded step, every rank gets the others' updated parameters: per dtype, one
    flat all-gather of each rank's owned parameters (padded to the largest share)."""

    def __init__(self, owned_by: list[list[Tensor]], rank: int) -> None:
        self.rank = rank
        self.by_dtype: dict[torch.dtype, list[list[Tensor]]] = {}
        for r, params in enumerate(owned_by):
            for p in params:
                self.by_dtype.setdefault(p.dtype, [[] for _ in owned_by])[r].append(p)

    def __call__(self) -> None:
        with torch.no_grad():
            for per_rank in self.by_dtype.values():
                sizes = [sum(p.numel() for p in ps) for ps in per_rank]
                width = max(sizes)
                if width == 0:
                    continue
                mine = per_rank[self.rank]
                ref = next(p for ps in per_rank for p in ps)
                send = torch.zeros(width, dtype=ref.dtype, device=ref.device)
                if mine:
                    torch._foreach_copy_(_views(send, mine), [p.detach() for p in mine])
                recv = torch.empty(width * len(per_rank), dtype=ref.dtype, device=ref.device)
                _all_gather(recv, send)
                for r, ps in enumerate(per_rank):
                    if r != self.rank and ps:
                        chunk = recv[r * width:(r + 1) * width]
                        torch._foreach_copy_([p.detach() for p in ps], _views(chunk, ps))


# torch 2.13 renamed all_gather_into_tensor all_gather_single (the old name warns); older
# versions (the GPU machine's 2.11) have only the old one.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _views(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start:start + p.numel()].view(p.shape))
        start += p.numel()
    return out
