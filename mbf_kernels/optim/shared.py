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

from collections.abc import Callable

import torch
from torch import Tensor

from .. import dispatch, reference
from ..layout import SegmentFlags
from ..reference import graft_bias_corrections
from .blocks import Unit
from .lowrank import LowRankCurvature
from .options import shared_beta
from .precision import resolve, shared_matmul
from .shared_block import SharedBlock, derive_inverses, warn_if_large

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


class SharedSet:
    """The shared blocks of one param group with one state dtype and device."""

    def __init__(self, units: list[Unit], dtype: torch.dtype, device: torch.device,
                 graft: bool, reduce: Callable[[Tensor], None] | None = None,
                 cpu_inverse: bool = False) -> None:
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
                warn_if_large(unit.name, seg.d, dtype.itemsize)
                zeros = torch.zeros(seg.d, seg.d, dtype=dtype, device=device)
                block = SharedBlock(unit, stats, zeros.clone(), zeros.clone(), zeros.clone(),
                                    cpu_inverse=cpu_inverse)
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
        # Each block's rows, and the block of each row: grafting sums its rows' norms per block.
        self.block_rows = torch.tensor(row_counts, dtype=torch.int64, device=device)
        self.block_index = torch.arange(len(self.blocks), device=device)
        # Each block's last measured graft ratio |a| / |u| (graft_norms="previous" steps by it)
        self.ratios = torch.zeros(len(self.blocks), dtype=dtype, device=device)
        self._row_params_of: dict[tuple[int, ...], tuple[list[Tensor], list[int]]] = {}
        self._bound_of: dict[tuple[int, ...], object | None] = {}
        self.row_block = torch.repeat_interleave(
            self.block_index, self.block_rows,
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
             steps: list[int], fisher: dict[Tensor, Tensor], lagged: bool = False) -> None:
        """One step of the blocks ``active`` (indices, ascending), each with its segment flags
        and its unit's step count (this step's, from 1); ``lagged``: grafted at each block's
        previous ratio (:attr:`ratios`, GroupPlan.lags_graft), this step's stored for the
        next."""
        graft = group["graft"] == "adam"
        lr, wd = group["lr"], group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        blocks = [self.blocks[i] for i in active]
        # Every due refresh, then every due refactor (each block's after its refresh).
        if not self._refresh_fused(group, active, flags, fisher):
            for b, f in zip(blocks, flags):
                if f & _REFRESH:
                    self._refresh(group, b, f, fisher)
        refactoring = [b for b, f in zip(blocks, flags) if f & _REFACTOR]
        if not self._refactor_fused(group, refactoring):
            for b in refactoring:
                self._refactor(group, b)
        decay = 1 - lr * wd if decoupled else 1.0
        if graft and self._bound_step(group, active, steps, momentum_coef, decay, lagged):
            return
        # The direction d = g (+ wd p, coupled; a missing gradient counts as 0), into momentum
        # and Adam's v, parameter by parameter through the row buffers' views.
        params = [p for b in blocks for p in b.unit.params]
        m_views = [v for b in blocks for v in b.views["momentum"]]
        has_grad = [i for i, p in enumerate(params) if p.grad is not None]
        dirs = [params[i].grad for i in has_grad]
        if not decoupled and wd:
            dirs = [g + wd * params[i] for g, i in zip(dirs, has_grad)]
            no_grad = [i for i in range(len(params)) if params[i].grad is None]
            dirs += [wd * params[i] for i in no_grad]
            has_grad += no_grad
        # On the CPU: m (v and Adam's row norms, grafted) in one pass per block (None: not
        # here); grafted, the decay joins the update's pass. Lagged, a low-rank block's update
        # joins its row pass too (at the coefficient from its previous ratio).
        lag = self.ratios * -lr if graft and lagged else None
        rows = self._rows_fused(group, active, steps, momentum_coef, lag, decay)
        fused = rows is not None
        adam_sq, m_sq, projections, updated = ((rows[0][:, 0], rows[0][:, 1], rows[1], rows[2])
                                               if fused else (None, None, {}, set()))
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
        if decay != 1 and not (fused and graft):
            _scale_add(params, [], [], decay)
        # The GEMMs that apply the blocks may run in TF32 (shared_matmul); the refresh's stay in
        # float32: the Nystrom core R (omega^T Y)^{-1} R^T amplifies a TF32 product's 1e-3
        # rounding into spurious eigenvalues (the ReLU autoencoder at rank 32 trained to 2.5x the
        # loss with TF32 refreshes; with TF32 applies only, within 1%: docs/options.md).
        matmul = self.matmul(group)
        if not graft:
            with shared_matmul(matmul, self.device):
                for i, b in zip(active, blocks):
                    b.update_params(lr, projections.get(i), fused, b.bf16_applies(matmul))
            return
        # Every block's rows have a slot (0 for the inactive ones): one row index serves every
        # step.
        u_sq = adam_sq.new_zeros(adam_sq.shape)
        for i, b in zip(active, blocks):
            lo, hi = self.row_starts[i], self.row_starts[i + 1]
            u_sq[lo:hi] = b.measure(None if m_sq is None else m_sq[lo:hi], matmul,
                                    projections.get(i))
        coefs = self._graft_coefs(group, u_sq, adam_sq, active, lag)
        with shared_matmul(matmul, self.device):
            for i, b in zip(active, blocks):
                if i in updated:  # (its row pass moved it; its T served the norms only)
                    b.projection = None
                else:
                    b.update_in_place(coefs[i], decay, fused)

    def _row_params(self, active: list[int]) -> tuple[list[Tensor], list[int]]:
        """Each block of ``active``'s weight, then its bias where it has one, in one list, and
        the count per block (1 or 2): built once per active set (each step's are the same on a
        small model, whose step costs its Python)."""
        key = tuple(active)
        if key not in self._row_params_of:
            params, counts = [], []
            for i in active:
                seg = self.blocks[i].unit.segments[0]
                unit_params = self.blocks[i].unit.params
                tail = [] if seg.tail is None else [unit_params[seg.tail]]
                params += [unit_params[seg.main], *tail]
                counts.append(1 + len(tail))
            self._row_params_of[key] = params, counts
        return self._row_params_of[key]

    def _bound(self, active: list[int], matmul: str) -> object | None:
        """The ``active`` blocks bound to the C++ ``BoundShared`` (rows; the exact inverses, in
        bfloat16 where ``matmul`` says so; V^T and w at a rank; the parameters, whose gradients
        it reads), once per active set and mode: refactors and loads rewrite them in place (the
        op's arguments, built and checked per step, cost 30 us of the ReLU autoencoder's
        460-us step). None where a block at a rank does not project."""
        key = (tuple(active), matmul)
        if key not in self._bound_of:
            blocks = [self.blocks[i] for i in active]
            low = [b.lowrank for b in blocks]
            none = self.flat["work"].new_empty(0)
            self._bound_of[key] = None if any(r and not b.projects for r, b in zip(low, blocks)) \
                else torch.classes.mbf_kernels.BoundShared(
                    *([b.rows[k] for b in blocks] for k in ("momentum", "second_moment", "work")),
                    [none if r else b.applied_inverse(b.bf16_applies(matmul))
                     for r, b in zip(low, blocks)],
                    *([getattr(r, k) if r else none for r in low] if any(low) else []
                      for k in ("apply_basis_t", "apply_weight")), *self._row_params(active))
        return self._bound_of[key]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bound_of": {}}  # (C++ objects: bound again on first use)

    def matmul(self, group: dict) -> str:
        """The group's shared_matmul resolved for this set's device and damping."""
        return resolve(group["shared_matmul"], self.device, group["damping_mode"])

    def _row_passes_serve(self, group: dict) -> bool:
        """Whether the C++ row passes serve the group's step: on the CPU with the compiled
        kernels and float32 GEMMs, the step's direction the gradient itself (decoupled decay,
        or none)."""
        return (dispatch.cpu_ops(group, self.device)
                # emulated TF32 GEMMs (for measuring it) are torch's: the fused passes' are not
                and self.matmul(group) != "tf32"
                and not (group["weight_decay"] and not group["decoupled_weight_decay"]))

    def _fused_grads(self, group: dict, active: list[int]) -> list[Tensor | None] | None:
        """The gradients of :meth:`_row_params` where the C++ row passes serve
        (:meth:`_row_passes_serve`) and gradients and parameters are in the state's dtype,
        contiguous (None where not: the caller takes the torch path)."""
        if not self._row_passes_serve(group):
            return None
        dtype = self.flat["work"].dtype
        params = self._row_params(active)[0]
        grads = [p.grad for p in params]
        for t in (*grads, *params):  # (the update's pass writes params)
            if t is not None and (t.dtype != dtype or not t.is_contiguous()):
                return None
        return grads

    def _bound_step(self, group: dict, active: list[int], steps: list[int],
                    beta1: float, decay: float, lagged: bool) -> bool:
        """A grafted step in one C++ call (``BoundShared.step``: ``shared_graft_step_`` on the
        bound tensors) where the row passes serve, the gradients qualify and no FSDP2 sum
        intervenes; whether it ran. In Python it had cost more than the ReLU autoencoder's
        GEMMs, and 1 ms of VGG16-w512's step (its head: two rank-16 blocks, one exact)."""
        if self.reduce is not None or not self._row_passes_serve(group):
            return False
        for low in [self.blocks[i].lowrank for i in active if self.blocks[i].lowrank]:
            low.sync_basis_t()  # (the bound V^T, rewritten in place where V moved)
        bound = self._bound(active, self.matmul(group))
        if bound is None:
            return False
        beta2 = group["betas"][1]
        per_step = {k: graft_bias_corrections(beta1, beta2, k) for k in set(steps)}
        corrections = [per_step[k] for k in steps]
        every = len(active) == len(self.blocks)
        # (the active blocks' ratios: in with lagged, out always)
        ratios = self.ratios if every else self.ratios[active]
        if not bound.step([c1 / s2 for c1, s2 in corrections],
                          [group["eps"] / s2 for _, s2 in corrections], beta1, beta2,
                          group["lr"], decay, ratios, lagged):
            return False
        if not every:
            self.ratios[active] = ratios
        return True

    def _rows_fused(self, group: dict, active: list[int], steps: list[int], beta1: float,
                    lag: Tensor | None = None, decay: float = 1.0
                    ) -> tuple[Tensor, dict[int, Tensor], set[int]] | None:
        """The momentum update and, grafted, Adam's v and :meth:`_adam_row_squares` and |m_j|^2
        (rows, 2), and each projecting block's T = M V (by block index), in one pass per block
        over its rows (the C++ op ``graft_rows_``: 7 passes and a GEMM become 1), where
        :meth:`_fused_grads` applies; None where not. ``lag`` (the lagged graft's coefficient
        per block): a projecting block's update ``decay p + coef u`` in the same pass (on
        Linear(4096, 4096) its second pass over p and m had cost as much as the first); the
        third element is the set of blocks so updated."""
        grads = self._fused_grads(group, active)
        if grads is None:
            return None
        dtype = self.flat["work"].dtype
        beta2 = group["betas"][1]
        sq = torch.zeros(self.row_block.shape[0], 2, dtype=dtype, device=self.device)
        projections, updated = {}, set()
        params, counts = self._row_params(active)
        firsts = [sum(counts[:j]) for j in range(len(counts))]
        for i, k, first, count in zip(active, steps, firsts, counts):
            b = self.blocks[i]
            gw, gb = grads[first], (grads[first + 1] if count == 2 else None)
            c1, s2 = graft_bias_corrections(beta1, beta2, k)
            basis = b.lowrank.apply_basis_t.mT if b.projects else None  # V^T contiguous: no copy
            update = {}
            if lag is not None and b.projects:
                update = dict(weight=params[first], bias=params[first + 1] if count == 2 else None,
                              apply_weight=b.lowrank.apply_weight, decay=decay,
                              coef=lag[i:i + 1])
                updated.add(i)
            rows, projections[i] = torch.ops.mbf_kernels.graft_rows_(
                b.rows["momentum"], b.rows.get("second_moment"), gw, gb, beta1, beta2,
                group["eps"] / s2, basis, **update)
            rows[:, 0] *= (c1 / s2) ** 2
            sq[self.row_starts[i]:self.row_starts[i + 1]] = rows
        return sq, {i: t for i, t in projections.items() if t.shape[1]}, updated

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

    def _graft_coefs(self, group: dict, u_sq: Tensor, adam_sq: Tensor, active: list[int],
                     lag: Tensor | None) -> list[Tensor]:
        """-lr * |a| / |u| per block (0 where |u| = 0), from the rows' squared norms: a row whose
        u or a is not finite counts as 0, so that one bad row cannot spread to its layer.
        The ``active`` blocks' ratios are stored in :attr:`ratios`; ``lag`` (the coefficients
        from the ratios stored before, the lagged graft's) is returned in their place."""
        squares = torch.stack([u_sq, adam_sq])
        if self.reduce is None and dispatch.cpu_ops(group, self.device):  # one C++ call
            # (rows, 2, 1): each row a "tile" of one block, each block an entry of its rows
            scale = torch.ops.mbf_kernels.unit_ratios(
                [squares.mT.contiguous()[:, :, None]], [self.block_rows],
                [self.block_index], len(self.blocks))
        else:
            squares = torch.where(torch.isfinite(squares).all(0), squares, 0)
            sums = squares.new_zeros(2, len(self.blocks)).index_add_(1, self.row_block, squares)
            if self.reduce is not None:
                self.reduce(sums)
            su, sa = sums[0], sums[1]
            scale = torch.where(su > 0, (sa / su.clamp_min(torch.finfo(su.dtype).tiny)).sqrt(),
                                0)
        if len(active) == len(self.blocks):
            self.ratios.copy_(scale)
        else:
            self.ratios[active] = scale[active]
        return (scale * -group["lr"] if lag is None else lag).unbind()

    def _refresh(self, group: dict, b: SharedBlock, f: int, fisher: dict[Tensor, Tensor]) -> None:
        grads = [fisher.get(p) if group["fisher"] == "true" else p.grad
                 for p in b.unit.params]  # MBF-True: the sampled gradient's curvature
        sketch = self._sketch_from_grads(group, b, grads)
        if sketch is not None:  # one pass over the gradient: G is never copied
            finite = b.lowrank.refresh(None, shared_beta(group), bool(f & _FIRST), b.unit.rows,
                                       sketch=sketch)
        else:
            finite = self._refresh_from_rows(group, b, f, grads)
        b.stats[0] += (~finite).to(torch.int64)

    def _refresh_fused(self, group: dict, active: list[int], flags: list[int],
                       fisher: dict[Tensor, Tensor]) -> bool:
        """The refresh of the blocks due one in one C++ call (``shared_refresh_``), where they
        are all exact, on the CPU's ops, with no FSDP2 sum, and their gradients are contiguous
        in the state's dtype; whether it ran. On the ReLU autoencoder (seven blocks) it took
        a refresh's cost beyond a cached step from 1.06 to 0.50 ms (AMD Zen 3, 2 threads): the
        per-block torch calls had cost more than the GEMMs."""
        due_pairs = [(i, f) for i, f in zip(active, flags) if f & _REFRESH]
        due_index = [i for i, _ in due_pairs]
        due = [(self.blocks[i], f) for i, f in due_pairs]
        if (not due or self.reduce is not None or any(b.lowrank is not None for b, _ in due)
                or not dispatch.cpu_ops(group, self.device)):
            return False
        dtype = self.flat["work"].dtype
        true_fisher = group["fisher"] == "true"  # MBF-True: the sampled gradient's curvature
        params, counts = self._row_params(due_index)
        grads = [fisher.get(p) if true_fisher else p.grad for p in params]
        if any(g is not None and (g.dtype != dtype or not g.is_contiguous()) for g in grads):
            return False
        torch.ops.mbf_kernels.shared_refresh_(
            [b.curvature for b, _ in due], [b.rows["work"] for b, _ in due],
            [b.stats for b, _ in due], grads, counts, [b.unit.rows for b, _ in due],
            [bool(f & _FIRST) for _, f in due], shared_beta(group))
        return True

    def _refresh_from_rows(self, group: dict, b: SharedBlock, f: int,
                           grads: list[Tensor | None]) -> Tensor:
        """The refresh from the gradient copied into the work rows G; whether G was finite."""
        G = b.rows["work"]
        for g, view in zip(grads, b.views["work"]):  # a weight and its bias at most
            view.zero_() if g is None else view.copy_(g)
        if b.lowrank is not None:
            return b.lowrank.refresh(G, shared_beta(group), bool(f & _FIRST), b.unit.rows,
                                     self.reduce)
        if self.reduce is None and self.device.type == "cpu":
            # On the CPU reading a flag costs no sync: a non-finite G is skipped by a branch, and
            # the EMA rides in the GEMM (addmm_ in place; the general path's C, where and copy
            # were 3x the GEMM on the ReLU autoencoder's seven blocks, dev VM).
            first = bool(f & _FIRST)
            finite = torch.isfinite(torch.linalg.vector_norm(G))  # as LowRankCurvature's
            if finite:
                beta = shared_beta(group)
                b.curvature.addmm_(G.mT, G, beta=0.0 if first else beta,
                                   alpha=(1.0 if first else 1 - beta) / max(b.unit.rows, 1))
            return finite
        C = G.mT @ G
        if self.reduce is not None:  # FSDP2: every rank's rows
            self.reduce(C)
        finite = torch.isfinite(C.diagonal().sum())  # as LowRankCurvature's |G|^2
        C /= max(b.unit.rows, 1)
        decay = shared_beta(group)
        new = C if f & _FIRST else decay * b.curvature + (1 - decay) * C
        b.curvature.copy_(torch.where(finite, new, b.curvature))
        return finite

    def _sketch_from_grads(self, group: dict, b: SharedBlock, grads: list[Tensor | None]
                           ) -> Callable[[Tensor], tuple[Tensor, Tensor]] | None:
        """A low-rank block's refresh sketch omega -> (G^T (G omega), |G|^2) in one C++ pass over
        the gradient (``sketch_rows``: on Linear(4096, 4096) 8 ms against 24 ms for the copy into
        the work rows, the norm and torch's two thin GEMMs, dev VM), where it applies: on the
        CPU, no FSDP2 sum, every gradient present, contiguous, in the state's dtype."""
        if (b.lowrank is None or self.reduce is not None
                or not dispatch.cpu_ops(group, self.device)):
            return None
        dtype = self.flat["work"].dtype
        if any(g is None or g.dtype != dtype or not g.is_contiguous() for g in grads):
            return None
        seg = b.unit.segments[0]
        gw = grads[seg.main].view(seg.n_blocks, seg.width)
        gb = None if seg.tail is None else grads[seg.tail]
        return lambda omega: torch.ops.mbf_kernels.sketch_rows(gw, gb, omega)

    def _refactor_fused(self, group: dict, blocks: list[SharedBlock]) -> bool:
        """The refactor of ``blocks`` in one C++ call (``shared_refactor_``, the blocks shared
        among the threads), where they are all exact and on the CPU's ops; whether it ran. The
        inverses follow from the factors as on a load (:func:`derive_inverses`)."""
        if (not blocks or any(b.lowrank is not None for b in blocks)
                or not dispatch.cpu_ops(group, self.device)):
            return False
        torch.ops.mbf_kernels.shared_refactor_(
            [b.curvature for b in blocks], [b.factor for b in blocks],
            [b.stats for b in blocks], group["damping"], group["damping_mode"] == "relative",
            reference.RELATIVE_DAMPING_FLOOR)
        derive_inverses(blocks)
        return True

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
