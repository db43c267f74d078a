"""Shared blocks of large linear layers (the paper's spatial averaging), stepped together.

A shared block is one dense d x d curvature for all n rows of a layer (d = in + 1 with a bias).
Its step is the bucket op's (MBF_SPEC section 3, grafting and relative damping of section 3b),
with rows for blocks: ``U = M (F + damping I)^{-1}`` is one GEMM for the whole layer.

On a small model the cost of a step is the number of torch calls, not the FLOPs (an MLP of
seven such layers spent 3 ms of Python per step in ~35 calls per layer). So the rows of every
shared block of a param group (one dtype and device) live in flat buffers, one per quantity:
the gradient and the parameter are gathered into them with one ``_foreach_copy_`` each, the
element-wise work of all layers is a few flat calls, and each layer adds its GEMM, and with
grafting two row norms and one scaled add. Momentum and Adam's v are the buffers themselves:
``optimizer.state`` holds views of them in each parameter's shape, so nothing is stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import reference
from ..layout import SegmentFlags
from ..reference import graft_bias_corrections
from .blocks import Unit

# The quantities with a row buffer: gradient (then the step's direction), parameter, momentum,
# update direction u, Adam's v and Adam's direction a (these two with graft="adam" only).
_ROWS = ("grad", "param", "momentum", "update")
_GRAFT_ROWS = ("second_moment", "adam")
_REFRESH, _FIRST, _REFACTOR = (int(SegmentFlags.REFRESH), int(SegmentFlags.FIRST),
                                int(SegmentFlags.REFACTOR))


@dataclass
class SharedBlock:
    """One shared block, dense, and its views (n, d) into the set's row buffers."""

    unit: Unit
    curvature: Tensor  # (d, d)
    factor: Tensor  # (d, d) lower, diagonal stored as 1 / L_ii (the canonical representation)
    inverse: Tensor  # (d, d) (F + damping I)^{-1}, derived from the factor
    stats: Tensor  # int64 (2,): skipped refreshes, failed factorisations
    rows: dict[str, Tensor] = field(default_factory=dict)
    views: dict[str, list[Tensor]] = field(default_factory=dict)  # param_views(key), kept

    def derive_inverse(self) -> None:
        """The step applies the block to all rows at once, U = M (F + damping I)^{-1}: one GEMM,
        1.3-1.5x faster than cholesky_solve's triangular solves at d = 4097 (dev VM). Always
        derived from the stored factor, so that a loaded state gives the same bits."""
        L = self.factor.clone()
        L.diagonal().reciprocal_()
        self.inverse.copy_(torch.cholesky_inverse(L))

    def param_views(self, key: str) -> list[Tensor]:
        """The views of row buffer ``key`` in the shape of each of the unit's parameters: the
        weight rows' first ``width`` columns, the bias the last column."""
        seg, rows = self.unit.segments[0], self.rows[key]
        views = [rows[:, :seg.width].view(self.unit.params[seg.main].shape)]
        if seg.tail is not None:
            views.append(rows[:, seg.width])
        return views


class SharedSet:
    """The shared blocks of one param group with one state dtype and device."""

    def __init__(self, units: list[Unit], dtype: torch.dtype, device: torch.device,
                 graft: bool) -> None:
        self.blocks: list[SharedBlock] = []
        sizes = []
        for unit in units:
            seg = unit.segments[0]
            main = unit.params[seg.main]
            if seg.offset or seg.row_stride != seg.width or main.numel() != seg.n_blocks * seg.width:
                raise AssertionError(f"MBF: shared block of {unit.name} is not a whole row layout")
            zeros = torch.zeros(seg.d, seg.d, dtype=dtype, device=device)
            self.blocks.append(SharedBlock(unit, zeros.clone(), zeros.clone(), zeros.clone(),
                                           torch.zeros(2, dtype=torch.int64, device=device)))
            sizes.append(seg.n_blocks * seg.d)
        self.starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.flat = {key: torch.zeros(self.starts[-1], dtype=dtype, device=device)
                     for key in _ROWS + (_GRAFT_ROWS if graft else ())}
        row_counts = [b.unit.segments[0].n_blocks for b in self.blocks]
        # The block of each row: grafting sums its rows' norms per block.
        self.row_block = torch.repeat_interleave(
            torch.arange(len(self.blocks), device=device),
            torch.tensor(row_counts, dtype=torch.int64, device=device))
        for b, start, stop in zip(self.blocks, self.starts, self.starts[1:]):
            seg = b.unit.segments[0]
            b.rows = {key: flat[start:stop].view(seg.n_blocks, seg.d)
                      for key, flat in self.flat.items()}
            b.views = {key: b.param_views(key) for key in b.rows}

    def work_bytes(self) -> int:
        """Bytes of the row buffers that are not optimizer state (momentum and v are)."""
        return sum(
            t.nbytes for key, t in self.flat.items() if key not in ("momentum", "second_moment"))

    def runs(self, active: list[int], steps: list[int]) -> list[tuple[int, int, int]]:
        """(first block, end block, step) of each maximal run of consecutive active blocks with
        one step count: the flat calls of a step go over these slices."""
        out: list[list[int]] = []
        for i, k in zip(active, steps):
            if out and out[-1][1] == i and out[-1][2] == k:
                out[-1][1] = i + 1
            else:
                out.append([i, i + 1, k])
        return [tuple(r) for r in out]

    def step(self, group: dict, momentum_coef: float, active: list[int], flags: list[int],
             steps: list[int], fisher: dict[Tensor, Tensor]) -> None:
        """One step of the blocks ``active`` (indices, ascending), each with its segment flags
        and its unit's step count (this step's, from 1)."""
        graft = group["graft"] == "adam"
        blocks = [self.blocks[i] for i in active]
        # Gather this step's gradients and parameters into the row buffers.
        dst, src, missing, pdst, psrc = [], [], [], [], []
        for b in blocks:
            for p, g_view, p_view in zip(b.unit.params, b.views["grad"], b.views["param"]):
                if p.grad is None:
                    missing.append(g_view)
                else:
                    dst.append(g_view)
                    src.append(p.grad)
                pdst.append(p_view)
                psrc.append(p)
        if dst:
            torch._foreach_copy_(dst, src)
        if missing:
            torch._foreach_zero_(missing)
        torch._foreach_copy_(pdst, psrc)
        for b, f in zip(blocks, flags):
            if f & _REFRESH:
                self._refresh(group, b, f, fisher)
            if f & _REFACTOR:
                self._refactor(group, b)
        lr, wd = group["lr"], group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        for first, end, k in self.runs(active, steps):
            G, P, M = (self.flat[key][self.starts[first]:self.starts[end]]
                       for key in ("grad", "param", "momentum"))
            if not decoupled and wd:
                G.add_(P, alpha=wd)  # the direction, in place of the gradient
            M.mul_(momentum_coef).add_(G)
            if graft:
                V, A = (self.flat[key][self.starts[first]:self.starts[end]]
                        for key in _GRAFT_ROWS)
                beta2 = group["betas"][1]
                c1, s2 = graft_bias_corrections(momentum_coef, beta2, k)
                V.mul_(beta2).addcmul_(G, G, value=1 - beta2)
                torch.sqrt(V, out=A)
                A.mul_(s2).add_(group["eps"])
                torch.div(M, A, out=A).mul_(c1)
            if decoupled and wd:
                P.mul_(1 - lr * wd)
        for b in blocks:
            torch.mm(b.rows["momentum"], b.inverse, out=b.rows["update"])
        if graft:
            coefs = self._graft_coefs(lr)
        for i, b in zip(active, blocks):
            if graft:
                b.rows["param"].addcmul_(b.rows["update"], coefs[i])
            else:
                b.rows["param"].add_(b.rows["update"], alpha=-lr)
        torch._foreach_copy_(psrc, pdst)

    def _graft_coefs(self, lr: float) -> list[Tensor]:
        """-lr * |a| / |u| per block (0 where |u| = 0), from the rows' norms: a row whose u or a
        is not finite counts as 0, so that one bad row cannot spread to its layer. Every block's
        rows are measured (a block without a gradient this step ignores its value): one row
        index serves every step."""
        # vector_norm without out= and one cat: 2x faster than writing into a preallocated
        # buffer block by block (dev VM).
        norms = torch.cat([torch.linalg.vector_norm(b.rows[key], dim=1)
                           for key in ("update", "adam") for b in self.blocks])
        squares = norms.view(2, -1).square()
        squares = torch.where(torch.isfinite(squares).all(0), squares, 0)
        sums = squares.new_zeros(2, len(self.blocks)).index_add_(1, self.row_block, squares)
        su, sa = sums[0], sums[1]
        scale = torch.where(su > 0, (sa / su.clamp_min(torch.finfo(su.dtype).tiny)).sqrt(), 0)
        return (scale * -lr).unbind()

    @staticmethod
    def _refresh(group: dict, b: SharedBlock, f: int, fisher: dict[Tensor, Tensor]) -> None:
        seg = b.unit.segments[0]
        G = b.rows["grad"]
        if group["fisher"] == "true":  # MBF-True: the sampled gradient's curvature
            G = seg.rows([(fisher[p] if p in fisher else torch.zeros_like(p)).contiguous()
                          for p in b.unit.params]).to(G.dtype)
        finite = torch.isfinite(G).all()
        C = G.mT @ G / max(G.shape[0], 1)
        new = C if f & _FIRST else group["beta"] * b.curvature + (1 - group["beta"]) * C
        b.curvature.copy_(torch.where(finite, new, b.curvature))
        b.stats[0] += (~finite).to(torch.int64)

    @staticmethod
    def _refactor(group: dict, b: SharedBlock) -> None:
        F = b.curvature
        damping = group["damping"]
        if group["damping_mode"] == "relative":  # as the bucket op's: the mean eigenvalue
            damping = reference.relative_damping(damping, F.diagonal().sum(), F.shape[0])
        L, info = torch.linalg.cholesky_ex(
            F + damping * torch.eye(F.shape[0], dtype=F.dtype, device=F.device))
        failed = info != 0
        L.diagonal().reciprocal_()
        fallback = torch.diag(reference.diagonal_fallback(F, damping))
        b.factor.copy_(torch.where(failed, fallback, L))
        b.derive_inverse()
        b.stats[1] += failed.to(torch.int64)
