"""A shared block kept at rank k: its Fisher as a scaled identity plus k eigenpairs (issue 16).

The exact shared block of a ``Linear(in, out)`` (d = in + 1) costs d^2 memory three times and an
out x d x d GEMM per step: 137 GFLOP for ``Linear(4096, 4096)``, 7.5 GB of state for an ImageNet
head. Kept at rank k, the block's curvature is

    F ~= r I + V diag(e) V^T        (V: d x k orthonormal columns, e >= 0, r >= 0)

and the damped inverse that the step applies is, with lambda the damping and s = r + lambda,

    (F + lambda I)^{-1} = (1 / s) (I - V diag(w) V^T),   w = e / (e + s),

two thin GEMMs per step (M V, then (M V) diag(w) V^T: 4 out d k FLOPs) and d k memory.

Refresh (every T1 steps), without ever forming a d x d matrix: the EMA ``beta F + (1 - beta) C``
(C = G^T G / out) is ``beta r I + L`` with ``L = beta V diag(e) V^T + (1 - beta) C``. L is
approximated by the randomized Nystrom method (Tropp et al., "Fixed-rank approximation of a
positive-semidefinite matrix from streaming data", 2017) from one product ``Y = L Omega`` with a
test matrix of k + p orthonormal columns: the previous basis V and p fresh Gaussian columns, so
that consecutive refreshes are steps of a subspace iteration that tracks the top eigenvectors
as the curvature drifts. Its top k eigenpairs are kept; the trace of L they miss is spread
evenly over all d directions (r grows by it / d), so the trace of F is kept exactly and relative
damping (a fraction of F's mean eigenvalue) sees the same F as the exact block would. With
k = d the test matrix spans everything and the block is exact (up to rounding).

The random columns come from a CPU generator seeded by the block and the refresh count: a run
is reproducible, and the same on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import reference

def oversampling(rank: int) -> int:
    """Fresh Gaussian columns beside the previous basis in a refresh's test matrix, the
    randomized Nystrom method's oversampling (its error bound needs p >= 2; Tropp et al. use
    5-10): a quarter of the rank, at least 4, at most 16."""
    return min(16, max(4, rank // 4))


def gaussian(rows: int, cols: int, seed: int, like: Tensor) -> Tensor:
    """(rows, cols) standard normal from a CPU generator seeded with ``seed``, on like's device
    and dtype: the same numbers on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=like.dtype).to(like.device)


def nystrom(Y: Tensor, omega: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank`` eigenpairs (V, e) of the Nystrom approximation Y (omega^T Y)^{-1} Y^T of a PSD
    matrix L from Y = L omega (omega: orthonormal columns), and whether it succeeded (a bool
    tensor). As Tropp et al.'s algorithm 3, with a shift nu (rounding's size) that makes a
    rank-deficient L no error: from Y + nu omega, eigenvalues less nu. The core is formed as
    R (omega^T Y)^{-1} R^T from Y = Q R, so that only a Cholesky (which reports failure instead
    of raising) and one s x s eigh meet the data."""
    nu = torch.finfo(Y.dtype).eps * Y.shape[0] ** 0.5 * torch.linalg.matrix_norm(Y)
    Y = Y + nu * omega
    B = omega.mT @ Y
    chol, info = torch.linalg.cholesky_ex((B + B.mT) / 2)
    Q, R = torch.linalg.qr(Y)
    W = reference.solve_cholesky(chol, R.mT)  # B^{-1} R^T (a failed factor: ``ok`` below)
    core = R @ W
    ok = (info == 0) & torch.isfinite(core).all()
    evals, vecs = torch.linalg.eigh(torch.where(ok, (core + core.mT) / 2, 0))
    evals, vecs = evals.flip(-1)[:rank], vecs.flip(-1)[:, :rank]
    return Q @ vecs, (evals - nu).clamp_min(0), ok


class LowRankCurvature:
    """The curvature (r, V, e) of one shared block and the inverse (scale, V, w) its step applies,
    cached at the last refactor."""

    def __init__(self, d: int, rank: int, dtype: torch.dtype, device: torch.device,
                 seed: int) -> None:
        self.d, self.rank, self.seed = d, min(rank, d), seed
        self.refreshes = 0  # the count in the random columns' seed
        zeros = dict(dtype=dtype, device=device)
        self.basis = torch.zeros(d, self.rank, **zeros)  # V
        self.excess = torch.zeros(self.rank, **zeros)  # e: eigenvalues of F above r
        self.residual = torch.zeros((), **zeros)  # r
        self.apply_basis = torch.zeros(d, self.rank, **zeros)
        self.apply_weight = torch.zeros(self.rank, **zeros)  # w
        self.apply_scale = torch.zeros((), **zeros)  # 1 / (r + lambda)
        self._basis_t: Tensor | None = None
        self._basis_t_version = -1

    @property
    def apply_basis_t(self) -> Tensor:
        """V^T of the cached inverse, (k, d) contiguous: the C++ row passes read it along d
        (:meth:`sync_basis_t`)."""
        return self.sync_basis_t()

    def sync_basis_t(self) -> Tensor:
        """:attr:`apply_basis_t`, kept beside the state (one tensor, which the CPU's bound step
        holds) and rewritten in place whenever the basis changed (its version counter: a
        refactor, a load, a checkpoint loaded into it), because the transposing copy cost 0.18
        ms per call on a 4097-wide layer, four calls a step (CIFAR VGG16, dev VM)."""
        if self._basis_t is None:
            self._basis_t = self.apply_basis.mT.contiguous()
        elif self._basis_t_version != self.apply_basis._version:
            self._basis_t.copy_(self.apply_basis.mT)
        self._basis_t_version = self.apply_basis._version
        return self._basis_t

    def curvature_state(self) -> dict[str, Tensor]:
        """F = residual I + basis diag(excess) basis^T, and the refresh count (the seed of the
        next refresh's random columns): the canonical state of the curvature."""
        return {"basis": self.basis, "excess": self.excess, "residual": self.residual,
                "refreshes": torch.tensor(self.refreshes)}

    def factor_state(self) -> dict[str, Tensor]:
        """(F + lambda I)^{-1} = scale (I - basis diag(weight) basis^T), cached at a refactor."""
        return {"basis": self.apply_basis, "weight": self.apply_weight, "scale": self.apply_scale}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.curvature_state().values(),
                                      *self.factor_state().values()))

    def load(self, curvature: dict[str, Tensor], factor: dict[str, Tensor]) -> None:
        """Copy a saved :meth:`curvature_state` and :meth:`factor_state` of the same d into this
        block (its dtype and device). Saved at another rank (a run moved between devices, whose
        default ranks differ): the leading eigenpairs are kept (they are stored largest first),
        the dropped eigenvalues spread into r so that the trace stays, and missing ones are
        zero (exact: a zero eigenvalue above r adds nothing)."""
        # Cloned first: the saved tensors may be this block's own (state_dict() hands out the
        # live ones, and torch.distributed.checkpoint loads into them in place).
        curvature = {k: v.clone() for k, v in curvature.items()}
        factor = {k: v.clone() for k, v in factor.items()}
        saved_excess = curvature["excess"]
        kept = min(self.rank, saved_excess.shape[0])
        for own, saved, in ((self.basis, curvature["basis"]), (self.apply_basis, factor["basis"])):
            own.zero_()
            own[:, :kept] = saved[:, :kept]
        self.excess.zero_()
        self.excess[:kept] = saved_excess[:kept]
        self.apply_weight.zero_()
        self.apply_weight[:kept] = factor["weight"][:kept]
        self.residual.copy_(curvature["residual"] + saved_excess[kept:].sum() / self.d)
        self.apply_scale.copy_(factor["scale"])
        self.refreshes = int(curvature["refreshes"])

    def trace(self) -> Tensor:
        return self.residual * self.d + self.excess.sum()

    def dense(self) -> Tensor:
        """F as a d x d matrix (tests and small-d inspection only)."""
        eye = torch.eye(self.d, dtype=self.basis.dtype, device=self.basis.device)
        return self.residual * eye + (self.basis * self.excess) @ self.basis.mT

    def refresh(self, G: Tensor | None, beta: float, first: bool, rows: int | None = None,
                reduce: Callable[[Tensor], None] | None = None,
                sketch: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """F <- C (first) or beta F + (1 - beta) C, C = G^T G / rows, at rank k. Nothing changes
        if G is not finite; returns that condition as a bool tensor (no host sync). Under FSDP2
        G is this rank's rows of ``rows``, and ``reduce`` sums the sketch over the ranks.
        ``sketch`` (then G is None and ``rows`` given): omega -> (G^T (G omega), |G|^2) computed
        elsewhere, the CPU's one pass over the gradient itself (``sketch_rows``)."""
        d, k = self.d, self.rank
        if G is not None:
            rows = G.shape[0] if rows is None else rows
            # One norm gives both the trace of C and whether G is finite (an element-wise
            # isfinite and where over G cost 15x a norm on a 4096 x 4097 layer, dev VM); a G
            # whose norm overflows is skipped as a non-finite one would be.
            sketch = lambda omega: (G.mT @ (G @ omega), torch.linalg.vector_norm(G).square())  # noqa: E731
        s = min(d, k + oversampling(k))
        fresh = gaussian(d, s if first else s - k, self.seed * 1_000_003 + self.refreshes,
                         self.basis)
        self.refreshes += 1
        scale = 1.0 if first else 1 - beta
        if first:
            omega = torch.linalg.qr(fresh).Q
        else:
            omega = torch.linalg.qr(torch.cat([self.basis, fresh], dim=1)).Q
        Y, g_sq = sketch(omega)
        if reduce is not None:  # one collective for both: the sketch and |G|^2
            both = torch.cat([Y.flatten(), g_sq[None]])
            reduce(both)
            Y, g_sq = both[:-1].view_as(Y), both[-1]
        finite = torch.isfinite(g_sq)
        Y *= scale / max(rows, 1)
        trace_L = torch.where(finite, g_sq, 0) * (scale / max(rows, 1))
        residual = torch.zeros_like(self.residual)
        if not first:
            Y += self.basis @ ((self.excess * beta)[:, None] * (self.basis.mT @ omega))
            trace_L = trace_L + beta * self.excess.sum()
            residual = beta * self.residual
        V, e, ok = nystrom(torch.where(torch.isfinite(Y), Y, 0), omega, k)
        residual = residual + (trace_L - e.sum()).clamp_min(0) / d
        ok = ok & finite & torch.isfinite(Y).all() & torch.isfinite(residual)
        self.basis.copy_(torch.where(ok, V, self.basis))
        self.excess.copy_(torch.where(ok, e, self.excess))
        self.residual.copy_(torch.where(ok, residual, self.residual))
        return finite

    def refactor(self, damping: float, relative: bool) -> Tensor:
        """Cache the inverse of F + damping I (relative: damping times F's mean eigenvalue, as
        the exact block's). If r + lambda is not positive beyond rounding, or anything is not
        finite, it falls back to the scaled identity 1 / lambda (1 at lambda = 0), as MBF_SPEC
        section 4's diagonal fallback does; returns whether it did."""
        lam = (reference.relative_damping(damping, self.trace(), self.d) if relative
               else torch.as_tensor(damping, dtype=self.residual.dtype,
                                    device=self.residual.device))
        s = self.residual + lam
        # The smallest eigenvalue of F + lambda I, s, must stand above the rounding of its
        # largest (a Cholesky's pivot test, as the exact block's factorisation fails).
        top = s + self.excess.max()
        failed = ~(torch.isfinite(top) & (s > top * (self.d * torch.finfo(s.dtype).eps)))
        floor = torch.where(lam > 0, lam.clamp_min(torch.finfo(s.dtype).tiny).reciprocal(), 1.0)
        self.apply_scale.copy_(torch.where(failed, floor, s.clamp_min(
            torch.finfo(s.dtype).tiny).reciprocal()))
        self.apply_weight.copy_(torch.where(failed, 0, self.excess / (self.excess + s)))
        self.apply_basis.copy_(self.basis)
        return failed

    def row_squares(self, m_sq: Tensor, T: Tensor) -> Tensor:
        """|u_j|^2 of the rows of u = M (I - V diag(w) V^T) from |m_j|^2 and T = M V, without u:
        V's columns are orthonormal, so m_j splits into T_j V^T and a part orthogonal to V, and
        |u_j|^2 = (|m_j|^2 - |T_j|^2) + |T_j (1 - w)|^2. The difference, m_j's part outside V,
        loses digits when m_j lies almost in V (its rounding, about |m_j|^2 times a few
        float32 epsilons per row, averages out over a layer's rows in the graft's sum); it is
        clamped at 0, so a row never counts less than its exact second term."""
        outside = (m_sq - T.square().sum(1)).clamp_min(0)
        return outside + (T * (1 - self.apply_weight)).square().sum(1)

    def apply(self, M: Tensor, out: Tensor) -> Tensor:
        """out = M (I - V diag(w) V^T): the step's direction up to the factor ``apply_scale``,
        which the caller folds into its scalar (the graft's rescaling cancels it)."""
        T = M @ self.apply_basis
        T.mul_(self.apply_weight)
        return torch.addmm(M, T, self.apply_basis.mT, alpha=-1, out=out)
