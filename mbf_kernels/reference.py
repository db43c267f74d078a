"""Plain-PyTorch reference for every kernel: the oracle all other backends are tested against.

Each function accepts any leading batch shape, follows ``torch.linalg`` semantics and is
differentiable where the underlying torch functions are. The compiled and Triton backends
must agree with these functions to within floating-point rounding.

Conventions shared by every backend:

* Only the lower triangle of an SPD input is read (as ``torch.linalg.cholesky`` does).
* ``info`` is int32 per matrix: 0 when the damped factorisation succeeded with finite
  values, else the order of the first leading minor whose pivot is not a finite positive
  number (LAPACK's convention, extended to non-finite input).
* The ``_ex`` solves return zeros for matrices whose factorisation failed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .layout import (COMPACT_TILE, SEGMENT_FIELDS, Segment, SegmentFlags, StepMode, check_mode,
                     cholesky_from_factor, factor_from_cholesky, factor_rows, from_compact,
                     n_tiles, stored_factor, to_compact, unit_coded)
from .packed import pack_tril, tril_dim, unpack_tril

__all__ = [
    "mbf_step_",
    "compact_outer_ema_",
    "compact_cholesky_ex",
    "compact_solve",
    "add_damping",
    "cholesky_ex",
    "cholesky_solve",
    "solve_spd_ex",
    "inv_spd_ex",
    "outer_ema_",
]


def add_damping(A: Tensor, damping: float | Tensor) -> Tensor:
    """``A + damping * I`` for a batch ``A`` of shape (..., d, d); ``A`` itself when damping is 0.
    A tensor ``damping`` of A's batch shape (...) damps each matrix by its own value."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    if isinstance(damping, Tensor):
        return A + damping.to(A.dtype)[..., None, None] * eye
    if damping == 0:
        return A
    return A + damping * eye


def _first_bad_row(bad_rows: Tensor) -> Tensor:
    """1 + index of the first True along the last dim, 0 where there is none (int32)."""
    first = bad_rows.to(torch.int32).argmax(dim=-1).to(torch.int32) + 1
    return torch.where(bad_rows.any(dim=-1), first, 0).to(torch.int32)


def cholesky_ex(A: Tensor, damping: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factor of ``A + damping*I``. A: (..., d, d) -> (L (..., d, d), info (...) int32).

    ``info`` follows the contract in the module docstring exactly, also for non-finite input,
    where LAPACK implementations disagree (MKL's float32 potrf reports +Inf at (0, 0) as a
    failure of order 2, its float64 one as success). With row i the first row of the lower
    triangle holding a non-finite entry, the first pivot that is not a finite positive number is
    either that of a non-PD leading minor of order <= i (rows before i are finite), or pivot i,
    which the non-finite entry reaches whatever its position in the row.
    """
    Ad = add_damping(A, damping)
    d = Ad.shape[-1]
    lower = torch.ones(d, d, dtype=torch.bool, device=Ad.device).tril()
    bad = ~torch.isfinite(Ad) & lower
    # Factor a copy with the non-finite entries zeroed: its leading minors before the first
    # non-finite row are those of Ad itself. Branch-free, so no host sync.
    L, info = torch.linalg.cholesky_ex(Ad.masked_fill(bad, 0))
    first_bad = _first_bad_row(bad.any(dim=-1))
    info = torch.where((first_bad > 0) & ((info == 0) | (info > first_bad)), first_bad, info)
    # Finite input can still overflow inside the factorisation (entries near the dtype's max),
    # leaving Inf in L with info == 0: report the first such row too.
    overflow = _first_bad_row(~torch.isfinite(L).all(dim=-1))
    info = torch.where((info == 0) & (overflow > 0), overflow, info)
    return L, info


def cholesky_solve(B: Tensor, L: Tensor) -> Tensor:
    """Solve ``(L L^T) X = B``. B: (..., d, k), L: (..., d, d) lower -> X: (..., d, k)."""
    return torch.cholesky_solve(B, L)


def _zero_failed(X: Tensor, info: Tensor) -> Tensor:
    return X.masked_fill((info != 0)[..., None, None], 0)


def solve_spd_ex(A: Tensor, B: Tensor, damping: float = 0.0) -> tuple[Tensor, Tensor]:
    """Solve ``(A + damping*I) X = B`` through a Cholesky factor. A: (..., d, d), B: (..., d, k)."""
    L, info = cholesky_ex(A, damping)
    return _zero_failed(torch.cholesky_solve(B, L), info), info


def inv_spd_ex(A: Tensor, damping: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(A + damping*I)^{-1}`` through a Cholesky factor. A: (..., d, d)."""
    L, info = cholesky_ex(A, damping)
    return _zero_failed(torch.cholesky_inverse(L), info), info


def outer_ema_(F: Tensor, G: Tensor, beta: float) -> Tensor:
    """In place ``F = beta*F + (1-beta) * mean_s g_s g_s^T``. F: (..., d, d), G: (..., S, d)."""
    C = torch.matmul(G.mT, G) / G.shape[-2]
    # The kernels mirror the lower triangle, so the reference does too: F stays exactly
    # symmetric whatever the rounding of the matmul.
    C = torch.tril(C) + torch.tril(C, diagonal=-1).mT
    return F.mul_(beta).add_(C, alpha=1 - beta)


def diagonal_fallback(F: Tensor, damping: float | Tensor) -> Tensor:
    """1 / L_ii of the diagonal preconditioner that replaces a failed factor of F + damping I
    (MBF_SPEC section 4): 1 / sqrt(F_ii + damping) where that is finite and positive, else
    1 / sqrt(damping), else 1. F: (..., d, d) -> (..., d); a tensor damping has F's batch shape."""
    if isinstance(damping, Tensor):
        damping = damping.to(F.dtype)[..., None]
        floor = torch.where(damping > 0, damping.clamp_min(torch.finfo(F.dtype).tiny).rsqrt(),
                            torch.ones_like(damping))
    else:
        floor = damping ** -0.5 if damping > 0 else 1.0
    s = F.diagonal(dim1=-2, dim2=-1) + damping
    ok = torch.isfinite(s) & (s > 0)
    return torch.where(ok, s.clamp_min(torch.finfo(s.dtype).tiny).rsqrt(),
                       torch.as_tensor(floor, dtype=s.dtype, device=s.device).expand_as(s))


#: Added to a relative damping so that a unit whose gradients are all zero still factors.
RELATIVE_DAMPING_FLOOR = 1e-12


def relative_damping(damping: float, diagonal_sum, count):
    """damping_mode="relative" (docs/options.md): ``damping`` times the mean diagonal entry of a
    unit's curvature blocks (the mean eigenvalue of its block-diagonal Fisher), from their
    diagonal's sum and entry count, plus :data:`RELATIVE_DAMPING_FLOOR`."""
    return damping * diagonal_sum / count + RELATIVE_DAMPING_FLOOR


def graft_bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """(c1, s2) of Adam's bias correction at ``step`` (>= 1), as the kernels use them: Adam's
    direction is ``a = c1 m / (s2 sqrt(v) + eps)`` with MBF's heavy-ball momentum ``m``
    (coefficient beta1, so Adam's first moment is (1 - beta1) m), c1 = (1 - beta1) /
    (1 - beta1^step) and s2 = 1 / sqrt(1 - beta2^step)."""
    step = max(int(step), 1)
    return (1 - beta1) / (1 - beta1 ** step), (1 - beta2 ** step) ** -0.5


def solve_cholesky(L: Tensor, B: Tensor) -> Tensor:
    """(L L^T)^{-1} B for a lower Cholesky factor L (..., d, d) and B (..., d, k): two
    triangular solves, not torch.cholesky_solve, which checks an info it reads back to the host
    (a device sync each call on a GPU: per bucket and step in this reference's step)."""
    Y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, Y, upper=True)


def mbf_step_(
    param: Tensor,
    grad: Tensor,
    momentum: Tensor,
    curvature: Tensor,
    factor: Tensor,
    stats: Tensor,
    *,
    lr: float,
    momentum_coef: float,
    beta: float,
    damping: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    update_curvature: bool,
    first_curvature: bool,
    refactor: bool,
    second_moment: Tensor | None = None,
    block_damping: Tensor | None = None,
    block_scale: Tensor | None = None,
    block_norms: Tensor | None = None, direction: Tensor | None = None,
    beta2: float = 0.999, eps: float = 1e-8, step: int = 1,
    mode: StepMode = StepMode.WRITE,
    coded: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """One MBF step for a bucket of N blocks of size d, straight from MBF_SPEC section 3.

    param, grad, momentum: (N, d), updated in place (not grad). curvature, factor: (N, T)
    canonical packed rows (the factor with its diagonal inverted, see :mod:`mbf_kernels.layout`).
    stats: int64 (2,) += [blocks whose non-finite gradient skipped the curvature update,
    blocks whose factorisation failed and fell back to the diagonal].

    Beyond the paper (MBF_SPEC section 3b), per block: ``block_damping`` (N,) replaces ``damping``
    at the refactor (relative damping); with ``mode & GRAFT``, ``second_moment`` (N, d) is Adam's v
    (or (N, 1): :func:`_second_moment_ema_`), ``block_norms`` (N, 2) receives ``[|u|^2, |a|^2]``
    (0, 0 where either is not finite: one bad block cannot spread to its unit), ``direction``
    (N, d) receives u; ``WRITE | GRAFT``: the update is ``lr * block_scale * direction``;
    ``WRITE | GRAFT | LAGGED``: measured as ``GRAFT``, the update ``lr * block_scale * u``
    (:class:`StepMode`). ``step``: the unit's step count (:func:`graft_bias_corrections`).
    ``coded``: the new factor as its storage keeps it (an int8 unit factor: layout.unit_coded)."""

    if update_curvature:
        finite = torch.isfinite(grad).all(dim=-1)
        C = pack_tril(grad[:, :, None] * grad[:, None, :])
        new = C if first_curvature else beta * curvature + (1 - beta) * C
        curvature.copy_(torch.where(finite[:, None], new, curvature))
        stats[0] += (~finite).sum().to(stats.device)  # a tensor add: no host sync
    if refactor:
        lam = damping if block_damping is None else block_damping
        blocks = unpack_tril(curvature)
        L, info = cholesky_ex(blocks, lam)
        failed = info != 0
        fallback = diagonal_fallback(blocks, lam)
        # Failed blocks: the diagonal preconditioner (fallback already holds 1 / L_ii).
        new = torch.where(failed[:, None], pack_tril(torch.diag_embed(fallback)),
                          factor_from_cholesky(L))
        factor.copy_(new if coded is None else coded(new))
        stats[1] += failed.sum().to(stats.device)
    mode = StepMode(mode)
    if not mode:
        return
    decay = lr * weight_decay * param if decoupled_weight_decay else 0
    if mode.applies_direction:  # the stored direction, scaled
        param.sub_(lr * block_scale.to(direction.dtype)[:, None] * direction + decay)
        return
    step_direction = grad if decoupled_weight_decay else grad + weight_decay * param
    new_m = momentum_coef * momentum + step_direction
    L = cholesky_from_factor(factor.to(new_m.dtype))  # a bfloat16 factor as stored (rounded)
    u = solve_cholesky(L, new_m[:, :, None])[:, :, 0]
    momentum.copy_(new_m)
    if not mode & StepMode.GRAFT:
        param.sub_(lr * u + decay)
        return
    # the measuring pass, or the lagged one-pass step
    _second_moment_ema_(second_moment, step_direction, beta2)
    block_norms.copy_(_graft_norms(u, new_m, second_moment, momentum_coef, beta2, eps, step))
    if mode & StepMode.LAGGED:
        param.sub_(lr * block_scale.to(u.dtype)[:, None] * u + decay)
    else:
        direction.copy_(u)


def _second_moment_ema_(v: Tensor, direction: Tensor, beta2: float) -> None:
    """Adam's v (N, d) = beta2 v + (1 - beta2) d^2, in place; v of shape (N, 1) is kept per block
    (graft_second_moment="block"): the EMA of the mean of the block's d^2, which is the mean of
    its entries' v (the EMA is linear)."""
    squares = direction * direction
    if v.shape[-1] == 1:
        squares = squares.mean(-1, keepdim=True)
    v.mul_(beta2).add_((1 - beta2) * squares)


def _graft_norms(u: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float, eps: float,
                 step: int) -> Tensor:
    """Each block's [|u|^2, |a|^2] (N, 2), Adam's direction a = c1 m / (s2 sqrt(v) + eps) from
    the new m and v; (0, 0) where either is not finite."""
    c1, s2 = graft_bias_corrections(beta1, beta2, step)
    a = c1 * m / (s2 * v.sqrt() + eps)
    norms = torch.stack([(u * u).sum(-1), (a * a).sum(-1)], dim=-1)
    return torch.where(torch.isfinite(norms).all(-1, keepdim=True), norms, 0)


def _write_compact_rows(C: Tensor, X: Tensor) -> None:
    """Write the (n, T) canonical rows X into the first n blocks of the compact C, in place;
    the padding blocks keep their values (an int8 unit factor's decode and code to the same
    bytes)."""

    d = tril_dim(X.shape[1]) if C.dtype == torch.int8 else None
    padded = factor_rows(C, C.shape[0] * COMPACT_TILE, d).clone()
    padded[: X.shape[0]] = X
    C.copy_(stored_factor(padded, C))


def mbf_bucket_step_(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor],
                     curvature: Tensor, factor: Tensor, stats: Tensor, segments: list[int], *,
                     lr: float, momentum_coef: float, beta: float, damping: float,
                     weight_decay: float, decoupled_weight_decay: bool,
                     second_moments: list[Tensor] = (), tile_damping: Tensor | None = None,
                     tile_scale: Tensor | None = None, tile_norms: Tensor | None = None,
                     directions: Tensor | None = None, beta2: float = 0.999, eps: float = 1e-8,
                     mode: int = StepMode.WRITE,
                     block_second_moment: Tensor | None = None) -> None:
    """The fused step for a bucket of segments: :func:`mbf_step_` on each segment's blocks.

    ``segments`` holds :data:`SEGMENT_FIELDS` ints per segment, as the compiled op takes them
    (csrc/registration.cpp): [tensor, tail tensor or -1, n_blocks, offset, width, row_stride,
    tile_offset, flags, step], the fields of :class:`Segment` plus where its compact tiles
    start, its :class:`SegmentFlags` and its unit's step count (Adam's bias correction).
    curvature/factor are compact (tiles, T, 16). Per compact tile: ``tile_damping`` (tiles,)
    replaces ``damping`` at the refactor. Grafting (:class:`StepMode`): ``second_moments`` are
    Adam's v, one per params tensor; the measuring pass (``GRAFT``) writes each block's
    [|u|^2, |a|^2] to ``tile_norms`` (tiles, 2, 16), or their sums over each tile's blocks
    to a ``tile_norms`` of shape (tiles, 2, 1) (the grafting needs them per unit only, and a
    unit's blocks fill whole tiles; the torch and cpu backends take it), and its u to
    ``directions`` (tiles, d, 16), compact like the state; the writing pass
    (``WRITE | GRAFT``) applies ``directions`` scaled by ``tile_scale`` (tiles,); the lagged
    pass (``WRITE | GRAFT | LAGGED``) measures as the measuring pass and moves the parameters
    by u scaled by ``tile_scale``. ``block_second_moment`` (tiles, 16), compact like the
    state, replaces ``second_moments`` with Adam's v kept per block (:func:`mbf_step_`'s (N, 1)
    form; padding blocks keep theirs).
    """

    mode = check_mode("mbf_kernels torch", mode, tile_scale, tile_norms, directions)
    for s in range(0, len(segments), SEGMENT_FIELDS):
        main, tail, n, offset, width, stride, tile0, flags, step = segments[s:s + SEGMENT_FIELDS]
        if n == 0:
            continue
        seg = Segment(main, None if tail < 0 else tail, n, offset, width, stride)
        tiles = n_tiles(n)
        P, G, Mm = seg.rows(params), seg.rows(grads), seg.rows(momenta)
        F_c, L_c = curvature[tile0:tile0 + tiles], factor[tile0:tile0 + tiles]
        F, L = from_compact(F_c, n), factor_rows(L_c, n, tril_dim(F_c.shape[1]))

        def per_block(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[tile0:tile0 + tiles].repeat_interleave(
                COMPACT_TILE)[:n]

        measure = mode.measures
        v_per_block = block_second_moment is not None
        if measure and v_per_block:
            V = block_second_moment[tile0:tile0 + tiles].view(-1)[:n, None].clone()
        else:
            V = seg.rows(second_moments) if measure else None
        U = from_compact(directions[tile0:tile0 + tiles], n) if mode.uses_directions else None
        norms = torch.zeros(n, 2, dtype=curvature.dtype, device=curvature.device)
        mbf_step_(P, G, Mm, F, L, stats, lr=lr, momentum_coef=momentum_coef, beta=beta,
                  damping=damping, weight_decay=weight_decay,
                  decoupled_weight_decay=decoupled_weight_decay,
                  update_curvature=bool(flags & SegmentFlags.REFRESH),
                  first_curvature=bool(flags & SegmentFlags.FIRST),
                  refactor=bool(flags & SegmentFlags.REFACTOR), second_moment=V,
                  block_damping=per_block(tile_damping), block_scale=per_block(tile_scale),
                  block_norms=norms, direction=U, beta2=beta2, eps=eps, step=step, mode=mode,
                  coded=unit_coded if L_c.dtype == torch.int8 else None)
        if mode & StepMode.WRITE:
            seg.write_rows(params, P)
        if mode == StepMode.WRITE or measure:
            seg.write_rows(momenta, Mm)
        if measure:
            if v_per_block:
                block_second_moment[tile0:tile0 + tiles].view(-1)[:n] = V[:, 0]
            else:
                seg.write_rows(second_moments, V)
            if mode.uses_directions:
                _write_compact_rows(directions[tile0:tile0 + tiles], U)
            # Padding blocks of the segment's last tile hold zeros.
            out = norms.new_zeros(tiles * COMPACT_TILE, 2)
            out[:n] = norms
            pairs = out.view(tiles, COMPACT_TILE, 2).transpose(1, 2)
            tile_norms[tile0:tile0 + tiles] = (pairs if tile_norms.shape[2] == COMPACT_TILE
                                               else pairs.sum(2, keepdim=True))
        _write_compact_rows(F_c, F)
        _write_compact_rows(L_c, L)


# The packed-layout ops: the same math on the compact layout, through the canonical one.


def compact_outer_ema_(F: Tensor, G: Tensor, beta: float) -> None:
    """F compact (ceil(N/16), T, 16), in place; G (N, d): F = beta F + (1 - beta) g g^T."""

    n = G.shape[0]
    dense = unpack_tril(from_compact(F, n))
    outer_ema_(dense, G[:, None, :], beta)
    _write_compact_rows(F, pack_tril(dense))


def compact_cholesky_ex(F: Tensor, n_blocks: int, damping: float) -> tuple[Tensor, Tensor]:
    """F compact -> (factor compact, diagonal inverted, failed blocks zero; info (N,) int32)."""

    L, info = cholesky_ex(unpack_tril(from_compact(F, n_blocks)), damping)
    rows = factor_from_cholesky(L).masked_fill((info != 0)[:, None], 0)
    return to_compact(rows), info


def compact_solve(factor: Tensor, B: Tensor) -> Tensor:
    """factor compact (diagonal inverted), B (N, d) -> X = (L L^T)^{-1} B, (N, d)."""

    L = cholesky_from_factor(from_compact(factor, B.shape[0]))
    return torch.cholesky_solve(B[:, :, None], L)[:, :, 0]
