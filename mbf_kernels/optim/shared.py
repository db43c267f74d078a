"""Shared blocks of large linear layers (the paper's spatial averaging), stepped together.

A shared block is one d x d curvature for all n rows of a layer (d = in + 1 with a bias), exact
or kept at a rank (:mod:`.lowrank`). Its step is the bucket op's (MBF_SPEC section 3, grafting
and relative damping of section 3b), with rows for blocks: ``U = M (F + damping I)^{-1}`` is one
GEMM (exact) or two thin ones (low rank) for the whole layer.

Momentum and Adam's v live in row buffers, one flat buffer per quantity for all the shared
blocks of a param group: ``optimizer.state`` holds views of them in each parameter's shape, the
element-wise work of all layers is a few foreach or flat calls (on a small model the cost of a
step is the number of torch calls), and the GEMMs read M's rows in place. Gradients and
parameters are read and written where they are, never gathered: on a large layer every pass
over its weights costs as much as AdamW's whole step moves per tensor. One more row buffer,
``work``, holds in turn the refresh's gathered gradient rows, Adam's direction (its row norms)
and U.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import dispatch, reference
from ..layout import SegmentFlags
from ..packed import pack_tril, unpack_tril
from ..reference import graft_bias_corrections
from .blocks import Unit
from .lowrank import LowRankCurvature
from .precision import resolve, shared_matmul

# The quantities with a row buffer: momentum, the work rows (gradient rows on a refresh, then
# Adam's direction, then U), and Adam's v with graft="adam".
_ROWS = ("momentum", "work")
_GRAFT_ROWS = ("second_moment",)
_REFRESH, _FIRST, _REFACTOR = (int(SegmentFlags.REFRESH), int(SegmentFlags.FIRST),
                                int(SegmentFlags.REFACTOR))


# Views larger than this take one fused call each (m = d + rho m, out= m: 3 passes over the
# data); smaller ones two foreach calls for all (5 passes, but one call per op for the whole
# set, which is what a small model's step costs). On CPU a foreach call over a strided view
# runs as out-of-place ops plus a copy: 4x a fused call's time on a 4096 x 4097 layer (dev VM).
_FUSED_NUMEL = 1 << 16


def _scale_add(views: list[Tensor], has_dir: list[int], dirs: list[Tensor], coef: float) -> None:
    """In place, v = coef v + d for the views ``has_dir`` (with ``dirs``), v = coef v for the
    others."""
    with_dir = dict(zip(has_dir, dirs))
    small_views, small_dirs, small_scaled = [], [], []
    for i, v in enumerate(views):
        d = with_dir.get(i)
        if v.numel() >= _FUSED_NUMEL:
            v.mul_(coef) if d is None else torch.add(d, v, alpha=coef, out=v)
        elif d is None:
            small_scaled.append(v)
        else:
            small_views.append(v)
            small_dirs.append(d)
    if small_scaled or small_views:
        torch._foreach_mul_(small_scaled + small_views, coef)
    if small_views:
        torch._foreach_add_(small_views, small_dirs)


#: An exact shared block whose state passes this many bytes is announced (issue 16: a silent
#: 7.5 GB allocation for an ImageNet head is a bug, not a default).
WARN_BYTES = 1 << 30


def _warn_if_large(name: str, d: int, itemsize: int) -> None:
    size = 3 * d * d * itemsize
    if size > WARN_BYTES:
        warnings.warn(f"MBF: the exact shared block of {name} (d = {d}) keeps three {d} x {d} "
                      f"matrices, {size / 2**30:.1f} GiB, and costs a {d} x {d} GEMM per row "
                      "block each step; large_linear='auto' or 'lowrank' keeps it at a rank "
                      "(shared_rank) in O(d k) memory", stacklevel=2)


@dataclass
class SharedBlock:
    """One shared block and its views (n, d) into the set's row buffers. Exact (``curvature``,
    ``factor``, ``inverse``: dense d x d) or, with ``lowrank``, kept at a rank (:mod:`.lowrank`)."""

    unit: Unit
    stats: Tensor  # int64 (2,): skipped refreshes, failed factorisations
    curvature: Tensor | None = None  # (d, d)
    factor: Tensor | None = None  # (d, d) lower, diagonal stored as 1 / L_ii (canonical)
    inverse: Tensor | None = None  # (d, d) (F + damping I)^{-1}, derived from the factor
    lowrank: LowRankCurvature | None = None
    rows: dict[str, Tensor] = field(default_factory=dict)
    views: dict[str, list[Tensor]] = field(default_factory=dict)  # param_views(key), kept
    # Between measure() (or the row pass) and update_in_place(): T = M V of a low-rank block whose
    # update goes straight into its parameters (None: U is in the work rows)
    projection: Tensor | None = None

    @property
    def d(self) -> int:
        return self.unit.segments[0].d

    @property
    def rank(self) -> int:
        return self.d if self.lowrank is None else self.lowrank.rank

    @property
    def nbytes(self) -> int:
        if self.lowrank is not None:
            return self.lowrank.nbytes
        return self.curvature.nbytes + self.factor.nbytes + self.inverse.nbytes

    def layout(self) -> tuple[str, int, int]:
        """(kind, d, rank) of the canonical state: ("shared", d, 1) exact (one block), or
        ("lowrank", d, rank)."""
        return ("shared", self.d, 1) if self.lowrank is None else ("lowrank", self.d, self.rank)

    def canonical(self) -> tuple[Tensor | dict, Tensor | dict]:
        """(curvature, factor) as saved: exact, (1, d(d+1)/2) packed lower triangles (the factor
        with 1 / L_ii on its diagonal); low rank, the dicts of :class:`LowRankCurvature`."""
        if self.lowrank is not None:
            return self.lowrank.curvature_state(), self.lowrank.factor_state()
        return pack_tril(self.curvature)[None], pack_tril(self.factor)[None]

    def load(self, curvature: Tensor | dict, factor: Tensor | dict) -> None:
        """Restore :meth:`canonical`'s values (checked to have this block's layout)."""
        if self.lowrank is not None:
            self.lowrank.load(curvature, factor)
            return
        self.curvature.copy_(unpack_tril(curvature[0].to(self.curvature)))
        self.factor.copy_(unpack_tril(factor[0].to(self.factor), symmetric=False))
        self.derive_inverse()

    def derive_inverse(self) -> None:
        """The step applies the block to all rows at once, U = M (F + damping I)^{-1}: one GEMM,
        1.3-1.5x faster than cholesky_solve's triangular solves at d = 4097 (dev VM). Always
        derived from the stored factor, so that a loaded state gives the same bits."""
        L = self.factor.clone()
        L.diagonal().reciprocal_()
        self.inverse.copy_(torch.cholesky_inverse(L))

    def apply(self) -> None:
        """rows["work"] = U, the step's direction for rows["momentum"] up to a positive scalar
        factor per block (the graft's rescaling, which uses it, makes that factor irrelevant)."""
        M, U = self.rows["momentum"], self.rows["work"]
        if self.lowrank is None:
            torch.mm(M, self.inverse, out=U)
        else:
            self.lowrank.apply(M, out=U)

    def _updates_in_place(self) -> bool:
        """Whether the update's GEMMs can write the parameters (contiguous, the state's dtype)."""
        dtype = self.rows["momentum"].dtype
        return all(p.dtype == dtype and p.is_contiguous() for p in self.unit.params)

    @property
    def projects(self) -> bool:
        """Whether a grafted step measures this block through T = M V (at a rank, parameters
        the update's GEMMs can write) rather than through U."""
        return self.lowrank is not None and self._updates_in_place()

    def measure(self, m_sq: Tensor | None, matmul: str, projection: Tensor | None = None
                ) -> Tensor:
        """|u_j|^2 of every row of the grafted step's direction u = M (F + damping I)^{-1} (up to
        a positive factor per block). Exact, or parameters the GEMMs cannot write: U into the
        work rows (its GEMM at ``matmul``, the shared_matmul option), and its norms. At a rank:
        only T = M V, and the norms from T and ``m_sq`` (|m_j|^2, None: computed here) with
        :meth:`LowRankCurvature.row_squares` (``projection``: T already computed); the update
        then adds M and T's rank-k term to the parameters, and U is never formed (on
        Linear(4096, 4096) that saves a copy of M, U's write and U's norm pass: 23.5 -> 18 ms
        of a 7.3 ms AdamW(fused) step, dev VM)."""
        M = self.rows["momentum"]
        if not self.projects:
            with shared_matmul(matmul, M.device):
                self.apply()
            return torch.linalg.vector_norm(self.rows["work"], dim=1).square()
        if m_sq is None:
            m_sq = torch.linalg.vector_norm(M, dim=1).square()
        # In float32 whatever ``matmul`` says: the norm is a difference that cancels (a thin,
        # memory-bound GEMM has nothing to gain from TF32 anyway).
        self.projection = M @ self.lowrank.apply_basis if projection is None else projection
        return self.lowrank.row_squares(m_sq, self.projection)

    def update_in_place(self, coef: Tensor, decay: float, fused: bool) -> None:
        """p = decay p + coef u for the direction :meth:`measure` measured (or, at a rank, any T
        = M V in :attr:`projection`: the paper's update too). ``fused``: one C++
        pass per parameter (``scaled_add_``) for the decay, the M (or U) term and, at a rank,
        the rank-k term; otherwise the caller has applied the decay, and the rank-k term is a
        GEMM into the parameters."""
        seg, params = self.unit.segments[0], self.unit.params
        key = "work" if self.projection is None else "momentum"
        t = basis_t = None
        if self.projection is not None:  # u = M - T diag(w) V^T
            t = self.projection.mul_(self.lowrank.apply_weight * -coef)
            self.projection = None
            basis_t = self.lowrank.apply_basis.mT
        if fused:  # (views 2-D: the rows of M and U are strided)
            rows = self.rows[key]
            weight = params[seg.main].view(seg.n_blocks, seg.width)
            vt = None if t is None else basis_t[:, :seg.width].contiguous()
            torch.ops.mbf_kernels.scaled_add_(weight, rows[:, :seg.width], decay, coef, t, vt)
            if seg.tail is not None:
                vt = None if t is None else basis_t[:, seg.width:].contiguous()
                torch.ops.mbf_kernels.scaled_add_(params[seg.tail].view(-1, 1),
                                                  rows[:, seg.width:], decay, coef, t, vt)
            return
        for p, u in zip(params, self.views[key]):
            p.addcmul_(u, coef)
        if t is not None:
            params[seg.main].view(seg.n_blocks, seg.width).addmm_(t, basis_t[:, :seg.width])
            if seg.tail is not None:
                params[seg.tail].addmv_(t, basis_t[:, seg.width])

    def update_params(self, lr: float, projection: Tensor | None = None,
                      fused: bool = False) -> None:
        """p -= lr u without grafting (any decay applied by the caller): u = M (F + damping
        I)^{-1} accumulated straight into the weight and bias (addmm_ / addmv_, no U buffer: on
        a large layer every pass over its rows counts); at a rank, as :meth:`update_in_place`
        from T = M V (``projection``: already computed); through U for parameters of another
        dtype than the state's."""
        seg = self.unit.segments[0]
        M, params = self.rows["momentum"], self.unit.params
        if self.projects:
            self.projection = M @ self.lowrank.apply_basis if projection is None else projection
            self.update_in_place(self.lowrank.apply_scale * -lr, 1.0, fused)
            return
        if not self._updates_in_place():
            self.apply()
            scale = None if self.lowrank is None else self.lowrank.apply_scale
            for p, u in zip(params, self.views["work"]):
                if scale is None:
                    p.add_(u, alpha=-lr)
                else:
                    p.addcmul_(u, scale, value=-lr)
            return
        inv = self.inverse
        weight = params[seg.main].view(seg.n_blocks, seg.width)
        weight.addmm_(M, inv[:, :seg.width], alpha=-lr)
        if seg.tail is not None:
            params[seg.tail].addmv_(M, inv[:, seg.width], alpha=-lr)

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
                 graft: bool, reduce: Callable[[Tensor], None] | None = None) -> None:
        self.blocks: list[SharedBlock] = []
        self.device = device
        # FSDP2 (.fsdp): sums a tensor over the ranks that hold the layers' rows, in place
        self.reduce = reduce
        sizes = []
        for unit in units:
            seg = unit.segments[0]
            main = unit.params[seg.main]
            if seg.offset or seg.row_stride != seg.width or main.numel() != seg.n_blocks * seg.width:
                raise AssertionError(f"MBF: shared block of {unit.name} is not a whole row layout")
            stats = torch.zeros(2, dtype=torch.int64, device=device)
            if unit.rank is None:
                _warn_if_large(unit.name, seg.d, dtype.itemsize)
                zeros = torch.zeros(seg.d, seg.d, dtype=dtype, device=device)
                block = SharedBlock(unit, stats, zeros.clone(), zeros.clone(), zeros.clone())
            else:
                # Seeded by the unit's place in the optimizer: reproducible, and the same on any
                # device and whichever rank owns it (shard_curvature).
                block = SharedBlock(unit, stats, lowrank=LowRankCurvature(
                    seg.d, unit.rank, dtype, device, seed=unit.index + 1))
            self.blocks.append(block)
            sizes.append(seg.n_blocks * seg.d)
        self.starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.flat = {key: torch.zeros(self.starts[-1], dtype=dtype, device=device)
                     for key in _ROWS + (_GRAFT_ROWS if graft else ())}
        row_counts = [b.unit.segments[0].n_blocks for b in self.blocks]
        self.row_starts = [sum(row_counts[:i]) for i in range(len(row_counts) + 1)]
        # The block of each row: grafting sums its rows' norms per block.
        self.row_block = torch.repeat_interleave(
            torch.arange(len(self.blocks), device=device),
            torch.tensor(row_counts, dtype=torch.int64, device=device),
            output_size=self.row_starts[-1])  # known here: no sync (and meta tensors work)
        for b, start, stop in zip(self.blocks, self.starts, self.starts[1:]):
            seg = b.unit.segments[0]
            b.rows = {key: flat[start:stop].view(seg.n_blocks, seg.d)
                      for key, flat in self.flat.items()}
            b.views = {key: b.param_views(key) for key in b.rows}

    def work_bytes(self) -> int:
        """Bytes of the row buffers that are not optimizer state (momentum and v are)."""
        return self.flat["work"].nbytes

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
        lr, wd = group["lr"], group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        blocks = [self.blocks[i] for i in active]
        params = [p for b in blocks for p in b.unit.params]
        for b, f in zip(blocks, flags):
            if f & _REFRESH:
                self._refresh(group, b, f, fisher)
            if f & _REFACTOR:
                self._refactor(group, b)
        # The direction d = g (+ wd p, coupled; a missing gradient counts as 0), into momentum
        # and Adam's v, parameter by parameter through the row buffers' views.
        m_views = [v for b in blocks for v in b.views["momentum"]]
        has_grad = [i for i, p in enumerate(params) if p.grad is not None]
        dirs = [params[i].grad for i in has_grad]
        if not decoupled and wd:
            dirs = [g + wd * params[i] for g, i in zip(dirs, has_grad)]
            no_grad = [i for i in range(len(params)) if params[i].grad is None]
            dirs += [wd * params[i] for i in no_grad]
            has_grad += no_grad
        # On the CPU: m (v and Adam's row norms, grafted) in one pass per block (None: not
        # here); grafted, the decay joins the update's pass
        rows = self._rows_fused(group, active, steps, momentum_coef)
        fused = rows is not None
        adam_sq, m_sq, projections = ((rows[0][:, 0], rows[0][:, 1], rows[1]) if fused
                                      else (None, None, {}))
        if not fused:
            _scale_add(m_views, has_grad, dirs, momentum_coef)
        if graft and not fused:
            v_views = [v for b in blocks for v in b.views["second_moment"]]
            beta2 = group["betas"][1]
            torch._foreach_mul_(v_views, beta2)
            if dirs:
                torch._foreach_addcmul_([v_views[i] for i in has_grad], dirs, dirs,
                                        value=1 - beta2)
            adam_sq = self._adam_row_squares(group, active, steps, momentum_coef)
        decay = 1 - lr * wd if decoupled else 1.0
        if decay != 1 and not (fused and graft):
            _scale_add(params, [], [], decay)
        # The GEMMs that apply the blocks may run in TF32 (shared_matmul); the refresh's stay in
        # float32: the Nystrom core R (omega^T Y)^{-1} R^T amplifies a TF32 product's 1e-3
        # rounding into spurious eigenvalues (the ReLU autoencoder at rank 32 trained to 2.5x the
        # loss with TF32 refreshes; with TF32 applies only, within 1%: docs/options.md).
        matmul = group["shared_matmul"]
        if not graft:
            with shared_matmul(matmul, self.device):
                for i, b in zip(active, blocks):
                    b.update_params(lr, projections.get(i), fused)
            return
        # Every block's rows have a slot (0 for the inactive ones): one row index serves every
        # step.
        u_sq = adam_sq.new_zeros(adam_sq.shape)
        for i, b in zip(active, blocks):
            lo, hi = self.row_starts[i], self.row_starts[i + 1]
            u_sq[lo:hi] = b.measure(None if m_sq is None else m_sq[lo:hi], matmul,
                                    projections.get(i))
        coefs = self._graft_coefs(lr, u_sq, adam_sq)
        with shared_matmul(matmul, self.device):
            for i, b in zip(active, blocks):
                b.update_in_place(coefs[i], decay, fused)

    def _rows_fused(self, group: dict, active: list[int], steps: list[int],
                    beta1: float) -> tuple[Tensor, dict[int, Tensor]] | None:
        """The momentum update and, grafted, Adam's v and :meth:`_adam_row_squares` and |m_j|^2
        (rows, 2), and each projecting block's T = M V (by block index), in one pass per block
        over its rows (the C++ op ``graft_rows_``: 7 passes and a GEMM become 1), where it applies: on
        the CPU with the compiled kernels and float32 GEMMs, the step's direction the gradient
        itself (decoupled decay, or none), gradients and parameters in the state's dtype,
        contiguous. None where it does not (the caller takes the torch path)."""
        if (self.device.type != "cpu" or group["backend"] not in ("auto", "cpu")
                or not dispatch.backends()["cpu"].available
                # emulated TF32 GEMMs (for measuring it) are torch's: the fused passes' are not
                or resolve(group["shared_matmul"], self.device) == "tf32"
                or (group["weight_decay"] and not group["decoupled_weight_decay"])):
            return None
        dtype = self.flat["work"].dtype
        grads = []
        for i in active:
            b = self.blocks[i]
            seg = b.unit.segments[0]
            gw = b.unit.params[seg.main].grad
            gb = None if seg.tail is None else b.unit.params[seg.tail].grad
            if any(t is not None and (t.dtype != dtype or not t.is_contiguous())
                   for t in (gw, gb, *b.unit.params)):  # (the update's pass writes params)
                return None
            grads.append((gw, gb))
        beta2 = group["betas"][1]
        sq = torch.zeros(self.row_block.shape[0], 2, dtype=dtype, device=self.device)
        projections = {}
        for i, k, (gw, gb) in zip(active, steps, grads):
            b = self.blocks[i]
            c1, s2 = graft_bias_corrections(beta1, beta2, k)
            basis = b.lowrank.apply_basis if b.projects else None
            rows, projections[i] = torch.ops.mbf_kernels.graft_rows_(
                b.rows["momentum"], b.rows.get("second_moment"), gw, gb, beta1, beta2,
                group["eps"] / s2, basis)
            rows[:, 0] *= (c1 / s2) ** 2
            sq[self.row_starts[i]:self.row_starts[i + 1]] = rows
        return sq, {i: t for i, t in projections.items() if t.shape[1]}

    def _adam_row_squares(self, group: dict, active: list[int], steps: list[int],
                          beta1: float) -> Tensor:
        """|a_j|^2 of every row of every block (0 for inactive blocks), Adam's direction
        a = c1 m / (s2 sqrt(v) + eps), computed in the work rows over runs of consecutive
        active blocks with one step count."""
        sq = torch.zeros(self.row_block.shape[0], dtype=self.flat["work"].dtype,
                         device=self.row_block.device)
        for first, end, k in self.runs(active, steps):
            lo, hi = self.starts[first], self.starts[end]
            M, V, A = (self.flat[key][lo:hi] for key in ("momentum", "second_moment", "work"))
            c1, s2 = graft_bias_corrections(beta1, group["betas"][1], k)
            # a = (c1 / s2) m / (sqrt(v) + eps / s2): c1 / s2 is applied to the squared norm.
            torch.sqrt(V, out=A).add_(group["eps"] / s2)
            torch.div(M, A, out=A)
            norms = torch.cat([torch.linalg.vector_norm(b.rows["work"], dim=1)
                               for b in self.blocks[first:end]])
            sq[self.row_starts[first]:self.row_starts[end]] = norms.square() * (c1 / s2) ** 2
        return sq

    def _graft_coefs(self, lr: float, u_sq: Tensor, adam_sq: Tensor) -> list[Tensor]:
        """-lr * |a| / |u| per block (0 where |u| = 0), from the rows' squared norms: a row whose
        u or a is not finite counts as 0, so that one bad row cannot spread to its layer."""
        squares = torch.stack([u_sq, adam_sq])
        squares = torch.where(torch.isfinite(squares).all(0), squares, 0)
        sums = squares.new_zeros(2, len(self.blocks)).index_add_(1, self.row_block, squares)
        if self.reduce is not None:
            self.reduce(sums)
        su, sa = sums[0], sums[1]
        scale = torch.where(su > 0, (sa / su.clamp_min(torch.finfo(su.dtype).tiny)).sqrt(), 0)
        return (scale * -lr).unbind()

    def _refresh(self, group: dict, b: SharedBlock, f: int, fisher: dict[Tensor, Tensor]) -> None:
        grads = [fisher.get(p) if group["fisher"] == "true" else p.grad
                 for p in b.unit.params]  # MBF-True: the sampled gradient's curvature
        G = b.rows["work"]
        for g, view in zip(grads, b.views["work"]):  # a weight and its bias at most
            view.zero_() if g is None else view.copy_(g)
        if b.lowrank is not None:
            finite = b.lowrank.refresh(G, group["beta"], bool(f & _FIRST), b.unit.rows,
                                       self.reduce)
        else:
            C = G.mT @ G
            if self.reduce is not None:  # FSDP2: every rank's rows
                self.reduce(C)
            finite = torch.isfinite(C.diagonal().sum())  # as LowRankCurvature's |G|^2
            C /= max(b.unit.rows, 1)
            new = C if f & _FIRST else group["beta"] * b.curvature + (1 - group["beta"]) * C
            b.curvature.copy_(torch.where(finite, new, b.curvature))
        b.stats[0] += (~finite).to(torch.int64)

    @staticmethod
    def _refactor(group: dict, b: SharedBlock) -> None:
        damping, relative = group["damping"], group["damping_mode"] == "relative"
        if b.lowrank is not None:
            b.stats[1] += b.lowrank.refactor(damping, relative).to(torch.int64)
            return
        F = b.curvature
        if relative:  # as the bucket op's: the mean eigenvalue
            damping = reference.relative_damping(damping, F.diagonal().sum(), F.shape[0])
        L, info = torch.linalg.cholesky_ex(
            F + damping * torch.eye(F.shape[0], dtype=F.dtype, device=F.device))
        failed = info != 0
        L.diagonal().reciprocal_()
        fallback = torch.diag(reference.diagonal_fallback(F, damping))
        b.factor.copy_(torch.where(failed, fallback, L))
        b.derive_inverse()
        b.stats[1] += failed.to(torch.int64)
