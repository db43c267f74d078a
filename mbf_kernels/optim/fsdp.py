"""FSDP2 (``torch.distributed.fsdp.fully_shard``): MBF on each rank's dim-0 shards (issue 15).

Under FSDP2 every parameter is a DTensor sharded on dim 0 over a 1-D device mesh, and after
backward each rank holds the reduce-scattered gradient of its shard. MBF plans and steps the
*local* shards, plain tensors that alias the DTensors' storage: a conv kernel block or a linear
row (with its bias entry: FSDP2 chunks a weight and its bias alike on dim 0) never straddles a
shard boundary, so every block's curvature, factor and solve are local, and a rank whose shard
of a layer is empty (more ranks than rows) simply has no blocks of it. What spans a unit is
reduced across the mesh, once per step or refresh, on every rank in the same order:

* the graft's per-unit norms ``[|u|^2, |a|^2]`` (buckets and shared blocks);
* relative damping's per-unit diagonal sums (and, once, their entry counts);
* a shared block's statistics: ``G^T G`` (exact) or the sketch ``G^T (G omega)`` and
  ``|G|_F^2`` (low rank), normalised by the layer's global row count.

Every other quantity is per block or per row and stays local. The planning decisions that
depend on a layer's size (``large_linear="auto"``) use its global shape, so every rank plans the
same kinds of units, and each bucket exists on every rank (empty where a rank has no blocks of
it), so that the collectives match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor

from .blocks import ModuleRoles


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch built without distributed
        return None, None
    return DTensor, Shard


def is_dtensor(p: Tensor) -> bool:
    DTensor, _ = _dtensor_type()
    return DTensor is not None and isinstance(p, DTensor)


@dataclass
class LocalShards:
    """A param group's DTensor parameters, the local shards MBF steps, and the mesh's group."""

    dtensors: list[Tensor]
    locals: list[Tensor]  # detached views of the local shards (same storage)
    group: object  # the mesh's process group
    _of_local: dict[int, Tensor] = field(init=False, repr=False)  # id(local) -> its DTensor

    def __post_init__(self) -> None:
        self._of_local = {id(q): p for p, q in zip(self.dtensors, self.locals)}

    def bind_grads(self) -> None:
        """Give each local shard its gradient's local shard, for the step."""
        for p, local in zip(self.dtensors, self.locals):
            local.grad = None if p.grad is None else p.grad.to_local()

    def unbind_grads(self) -> None:
        for local in self.locals:
            local.grad = None

    def dtensor_of(self, local: Tensor) -> Tensor:
        return self._of_local[id(local)]

    def all_reduce(self, t: Tensor) -> None:
        """Sum ``t`` over the mesh, in place."""
        dist.all_reduce(t, group=self.group)


def local_shards(params: list[Tensor]) -> LocalShards | None:
    """None when no parameter of the group is a DTensor; else the group's local shards, after
    checking that every parameter is a dim-0 shard on one 1-D mesh (FSDP2's layout)."""
    DTensor, Shard = _dtensor_type()
    if DTensor is None or not any(isinstance(p, DTensor) for p in params):
        return None
    mesh = None
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            raise ValueError(f"MBF: parameter {i} of a param group is a plain tensor beside "
                             "DTensor parameters; under FSDP2 (fully_shard) shard every "
                             "parameter of the group, or put the others in their own group")
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"MBF: parameter {i} is a DTensor placed {tuple(p.placements)} on "
                             f"a {p.device_mesh.ndim}-D mesh; MBF steps FSDP2's layout only: "
                             "Shard(0) on a 1-D mesh (HSDP and tensor parallelism are not "
                             "supported)")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError("MBF: the DTensor parameters of a param group must share one mesh")
    return LocalShards(list(params), [p.to_local().detach() for p in params], mesh.get_group())


def local_roles(roles: ModuleRoles | None, shards: LocalShards) -> ModuleRoles | None:
    """``roles`` (keyed by the DTensor parameters) keyed by their local shards."""
    if roles is None:
        return None
    local = {id(p): q for p, q in zip(shards.dtensors, shards.locals)}
    ids = {id(p): id(q) for p, q in zip(shards.dtensors, shards.locals)}
    return ModuleRoles(
        roles={ids.get(k, k): v for k, v in roles.roles.items()},
        bias_of={ids.get(k, k): local.get(id(b), b) for k, b in roles.bias_of.items()},
        names={ids.get(k, k): v for k, v in roles.names.items()})


def rows_of(p: Tensor) -> int:
    """A parameter's rows: its size on dim 0 (a DTensor's: global), 1 for a scalar."""
    return p.shape[0] if p.ndim else 1


def global_rows(shards: LocalShards) -> dict[int, int]:
    """id(local shard) -> the parameter's global size on dim 0 (its rows)."""
    return {id(q): rows_of(p) for p, q in zip(shards.dtensors, shards.locals)}


# -- the state dict: each rank's state as DTensors shaped like the parameters' shards, so that
# torch.distributed.checkpoint saves every rank's share and places it on any world size.


def shard_like(local: Tensor, p: Tensor) -> Tensor:
    """A state tensor of parameter ``p``'s local shard (its shape) as a DTensor laid out as
    ``p`` (global shape, Shard(0); FSDP2's chunks are DTensor's own, uneven ones included)."""
    DTensor, _ = _dtensor_type()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def blocks_per_row(main: Tensor, row_stride: int) -> int:
    """Blocks of a segment in each dim-0 row of its (local) parameter: a conv's kernels per
    output channel, one per linear row, a diagonal parameter's elements per row."""
    per_row = 1
    for n in main.shape[1:]:
        per_row *= n
    return per_row // row_stride


def shard_blocks(rows: Tensor, local: Tensor, p: Tensor, row_stride: int) -> Tensor:
    """A segment's (n_local, T) block rows as a DTensor (rows of ``p``, blocks per row, T),
    sharded on dim 0 as ``p`` is (``local`` is p's local shard)."""
    DTensor, _ = _dtensor_type()
    per_row = blocks_per_row(local, row_stride)
    shape = (rows_of(p), per_row, rows.shape[1])
    return DTensor.from_local(rows.reshape(-1, per_row, rows.shape[1]), p.device_mesh,
                              p.placements, run_check=False, shape=shape,
                              stride=(per_row * rows.shape[1], rows.shape[1], 1))


def local_part(t):
    """A saved value as this rank's tensor: a DTensor's local shard, (rows, blocks, T) block
    rows flattened back to (n, T)."""
    if not is_dtensor(t):
        return t
    local = t.to_local()
    return local.reshape(-1, local.shape[-1]) if local.ndim == 3 else local
