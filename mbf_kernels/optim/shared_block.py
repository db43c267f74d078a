"""One shared block of a large linear layer: its curvature (exact, or kept at a rank) and the
views of its rows in the row buffers of its :class:`~.shared.SharedSet`, which steps it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._extension import onednn_gemm_min_flops
from ..packed import pack_tril, unpack_tril
from .blocks import Unit
from .lowrank import LowRankCurvature
from .precision import BF16_MIN_FLOPS, shared_matmul

#: An exact shared block whose state passes this many bytes is announced (issue 16: a silent
#: 7.5 GB allocation for an ImageNet head is a bug, not a default).
WARN_BYTES = 1 << 30


def warn_if_large(name: str, d: int, itemsize: int) -> None:
    size = 3 * d * d * itemsize
    if size > WARN_BYTES:
        warnings.warn(f"MBF: the exact shared block of {name} (d = {d}) keeps three {d} x {d} "
                      f"matrices, {size / 2**30:.1f} GiB, and costs a {d} x {d} GEMM per row "
                      "block each step; large_linear='auto' or 'lowrank' keeps it at a rank "
                      "(shared_rank) in O(d k) memory", stacklevel=2)


def inverse_from_factor(factor: Tensor) -> Tensor:
    """(F + damping I)^{-1} from its stored factor (the Cholesky factor with 1 / L_ii on its
    diagonal), by torch's cholesky_inverse (its rounding depends on the thread count)."""
    L = factor.clone()
    L.diagonal().reciprocal_()
    return torch.cholesky_inverse(L)


def derive_inverses(blocks: list[SharedBlock]) -> None:
    """Each exact block's inverse from its stored factor: in one C++ call (``shared_inverse_``:
    each block on one thread, the blocks side by side; its rounding independent of the other
    blocks in the call) for the blocks whose group takes the CPU's ops,
    by :func:`inverse_from_factor` for the others."""
    cpu = [b for b in blocks if b.cpu_inverse]
    if cpu:
        torch.ops.mbf_kernels.shared_inverse_([b.inverse for b in cpu], [b.factor for b in cpu])
    for b in blocks:
        if not b.cpu_inverse:
            b.inverse.copy_(inverse_from_factor(b.factor))
        if b.inverse_bf16 is not None:
            b.inverse_bf16.copy_(b.inverse)


@dataclass
class SharedBlock:
    """One shared block and its views (n, d) into the set's row buffers. Exact (``curvature``,
    ``factor``, ``inverse``: dense d x d) or, with ``lowrank``, kept at a rank (:mod:`.lowrank`)."""

    unit: Unit
    stats: Tensor  # int64 (2,): skipped refreshes, failed factorisations
    curvature: Tensor | None = None  # (d, d)
    factor: Tensor | None = None  # (d, d) lower, diagonal stored as 1 / L_ii (canonical)
    inverse: Tensor | None = None  # (d, d) (F + damping I)^{-1}, derived from the factor
    # The inverse rounded to bfloat16 (shared_matmul="bfloat16"), made on first use and then
    # rewritten in place wherever the inverse is derived
    inverse_bf16: Tensor | None = None
    lowrank: LowRankCurvature | None = None
    rows: dict[str, Tensor] = field(default_factory=dict)
    views: dict[str, list[Tensor]] = field(default_factory=dict)  # param_views(key), kept
    # Between measure() (or the row pass) and update_in_place(): T = M V of a low-rank block whose
    # update goes straight into its parameters (None: U is in the work rows)
    projection: Tensor | None = None
    # Whether derive_inverses takes the CPU's C++ op (the group's tensors take the CPU's ops)
    cpu_inverse: bool = False

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
        extra = 0 if self.inverse_bf16 is None else self.inverse_bf16.nbytes
        return self.curvature.nbytes + self.factor.nbytes + self.inverse.nbytes + extra

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
        derived from the stored factor, by :func:`derive_inverses` (after every refactor, and on
        a load), so that a loaded state gives the same bits."""
        derive_inverses([self])

    def bf16_applies(self, matmul: str) -> bool:
        """Whether shared_matmul ``matmul`` (resolved) applies this block in bfloat16: an exact
        block of a float32 state whose GEMM has at least BF16_MIN_FLOPS (float64, low-rank and
        smaller blocks keep float32)."""
        return (matmul == "bfloat16" and self.lowrank is None
                and self.inverse.dtype == torch.float32 and self.gemm_flops >= BF16_MIN_FLOPS)

    def applied_inverse(self, bf16: bool) -> Tensor:
        """The inverse the step's GEMM reads: the state's, or (``bf16``) its bfloat16 copy."""
        if not bf16:
            return self.inverse
        if self.inverse_bf16 is None:
            self.inverse_bf16 = self.inverse.to(torch.bfloat16)
        return self.inverse_bf16

    def apply(self, bf16: bool = False) -> None:
        """rows["work"] = U, the step's direction for rows["momentum"] up to a positive scalar
        factor per block (the graft's rescaling, which uses it, makes that factor irrelevant);
        ``bf16`` (:meth:`bf16_applies`): U = bf16(bf16(M) bf16(inv)), widened."""
        M, U = self.rows["momentum"], self.rows["work"]
        if bf16:
            U.copy_(torch.mm(M.to(torch.bfloat16), self.applied_inverse(True)))
        elif self.lowrank is None:
            torch.mm(M, self.inverse, out=U)
        else:
            self.lowrank.apply(M, out=U)

    @property
    def gemm_flops(self) -> int:
        """FLOPs of the exact block's U = M inv (2 n d^2)."""
        n, d = self.rows["momentum"].shape
        return 2 * n * d * d

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
        work rows (its GEMM at ``matmul``, the resolved shared_matmul), and its norms. At a rank:
        only T = M V, and the norms from T and ``m_sq`` (|m_j|^2, None: computed here) with
        :meth:`LowRankCurvature.row_squares` (``projection``: T already computed); the update
        then adds M and T's rank-k term to the parameters, and U is never formed (on
        Linear(4096, 4096) that saves a copy of M, U's write and U's norm pass: 23.5 -> 18 ms
        of a 7.3 ms AdamW(fused) step, dev VM)."""
        M = self.rows["momentum"]
        if not self.projects:
            with shared_matmul(matmul, M.device):
                self.apply(self.bf16_applies(matmul))
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
            basis_t = self.lowrank.apply_basis_t
        if fused:  # (views 2-D: the rows of M and U, and V^T's column slices, are strided)
            rows = self.rows[key]
            weight = params[seg.main].view(seg.n_blocks, seg.width)
            torch.ops.mbf_kernels.scaled_add_(weight, rows[:, :seg.width], decay, coef, t,
                                              None if t is None else basis_t[:, :seg.width])
            if seg.tail is not None:
                torch.ops.mbf_kernels.scaled_add_(params[seg.tail].view(-1, 1),
                                                  rows[:, seg.width:], decay, coef, t,
                                                  None if t is None else basis_t[:, seg.width:])
            return
        for p, u in zip(params, self.views[key]):
            p.addcmul_(u, coef)
        if t is not None:
            params[seg.main].view(seg.n_blocks, seg.width).addmm_(t, basis_t[:, :seg.width])
            if seg.tail is not None:
                params[seg.tail].addmv_(t, basis_t[:, seg.width])

    def update_params(self, lr: float, projection: Tensor | None = None,
                      fused: bool = False, bf16: bool = False) -> None:
        """p -= lr u without grafting (any decay applied by the caller): u = M (F + damping
        I)^{-1} accumulated straight into the weight and bias (addmm_ / addmv_, no U buffer: on
        a large layer every pass over its rows counts); at a rank, as :meth:`update_in_place`
        from T = M V (``projection``: already computed); through U for parameters of another
        dtype than the state's; ``fused`` (the CPU's C++ passes apply) and a GEMM large enough
        for oneDNN: through U, with ``apply_inverse_`` and one ``scaled_add_`` pass. ``bf16``
        (:meth:`bf16_applies`): through U as :meth:`apply` makes it."""
        seg = self.unit.segments[0]
        M, params = self.rows["momentum"], self.unit.params
        if self.projects:
            self.projection = M @ self.lowrank.apply_basis if projection is None else projection
            self.update_in_place(self.lowrank.apply_scale * -lr, 1.0, fused)
            return
        if fused and self.lowrank is None and (bf16 or self.gemm_flops >= onednn_gemm_min_flops()):
            # U through apply_inverse_ (oneDNN's GEMM, 1.7x MKL's addmm_ for a 64 x 513 block
            # on the dev VM), then p -= lr U in one C++ pass; below, the extra calls per block
            # cost more than oneDNN saves
            torch.ops.mbf_kernels.apply_inverse_(self.rows["work"], M, self.applied_inverse(bf16))
            self.update_in_place(M.new_full((1,), -lr), 1.0, True)
            return
        if bf16 or not self._updates_in_place():
            self.apply(bf16)
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
