"""Host launchers of the Triton kernels: the compact-layout ops and the fused MBF step, with
the same signatures and results as their references in :mod:`mbf_kernels.reference`
(``compact_outer_ema_``, ``compact_cholesky_ex``, ``compact_solve``, ``mbf_step_``,
``mbf_bucket_step_``). They run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (how CI tests them)."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..compact import COMPACT_TILE
from ..packed import tril_size
from ..reference import SEGMENT_FIELDS
from .kernels import (_cholesky_kernel, _outer_ema_kernel, _solve_kernel, _step_kernel,
                      block_lanes)

__all__ = ["compact_outer_ema_", "compact_cholesky_ex", "compact_solve", "mbf_step_",
           "mbf_bucket_step_"]

_REFRESH, _FIRST, _REFACTOR = 1, 2, 4


def _grid(n: int, d: int) -> tuple[int]:
    return (max(triton.cdiv(n, block_lanes(d)), 1),)


def _floor(damping: float) -> float:
    return damping ** -0.5 if damping > 0 else 1.0


def compact_outer_ema_(F: Tensor, G: Tensor, beta: float) -> None:
    """F compact (ceil(N/16), T, 16), in place; G (N, d): F = beta F + (1 - beta) g g^T."""
    n, d = G.shape
    if n:
        _outer_ema_kernel[_grid(n, d)](F, G.contiguous(), n, float(beta), D=d, T=tril_size(d),
                                       BLOCK=block_lanes(d))


def compact_cholesky_ex(F: Tensor, n_blocks: int, damping: float) -> tuple[Tensor, Tensor]:
    """F compact -> (factor compact with its diagonal inverted, zero for failed blocks;
    info (N,) int32)."""
    t = F.shape[1]
    d = int(round(((8 * t + 1) ** 0.5 - 1) / 2))
    L = torch.zeros_like(F)
    info = torch.zeros(n_blocks, dtype=torch.int32, device=F.device)
    if n_blocks:
        _cholesky_kernel[_grid(n_blocks, d)](F, L, info, n_blocks, float(damping), D=d, T=t,
                                             BLOCK=block_lanes(d))
    return L, info


def compact_solve(factor: Tensor, B: Tensor) -> Tensor:
    """factor compact (diagonal inverted), B (N, d) -> X = (L L^T)^{-1} B, (N, d)."""
    n, d = B.shape
    B = B.contiguous()
    X = torch.empty_like(B)
    if n:
        _solve_kernel[_grid(n, d)](factor, B, X, n, D=d, DP=triton.next_power_of_2(d),
                                   T=tril_size(d), BLOCK=block_lanes(d))
    return X


def _launch_segment(p, g, m, tails, F, L, stats, n, row_stride, width, d, flags, hyper) -> None:
    p_tail, g_tail, m_tail = tails if tails is not None else (p, g, m)  # unused when D == WIDTH
    _step_kernel[_grid(n, d)](
        p, g, m, p_tail, g_tail, m_tail, F, L, stats, n, row_stride,
        hyper["lr"], hyper["momentum_coef"], hyper["beta"], hyper["damping"],
        hyper["weight_decay"], _floor(hyper["damping"]),
        DECOUPLED=bool(hyper["decoupled_weight_decay"]),
        UPDATE_CURVATURE=bool(flags & _REFRESH), FIRST_CURVATURE=bool(flags & _FIRST),
        REFACTOR=bool(flags & _REFACTOR), WIDTH=width, D=d, DP=triton.next_power_of_2(d),
        T=tril_size(d), BLOCK=block_lanes(d))


def _hyper(lr, momentum_coef, beta, damping, weight_decay, decoupled_weight_decay) -> dict:
    return dict(lr=float(lr), momentum_coef=float(momentum_coef), beta=float(beta),
                damping=float(damping), weight_decay=float(weight_decay),
                decoupled_weight_decay=bool(decoupled_weight_decay))


def mbf_step_(param: Tensor, grad: Tensor, momentum: Tensor, curvature: Tensor, factor: Tensor,
              stats: Tensor, *, lr: float, momentum_coef: float, beta: float, damping: float,
              weight_decay: float, decoupled_weight_decay: bool, update_curvature: bool,
              first_curvature: bool, refactor: bool) -> None:
    """The fused step on one contiguous (N, d) bucket; curvature/factor compact."""
    n, d = param.shape
    flags = (_REFRESH * update_curvature) | (_FIRST * first_curvature) | (_REFACTOR * refactor)
    if n:
        _launch_segment(param, grad, momentum, None, curvature, factor, stats, n, d, d, d, flags,
                        _hyper(lr, momentum_coef, beta, damping, weight_decay,
                               decoupled_weight_decay))


def mbf_bucket_step_(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor],
                     curvature: Tensor, factor: Tensor, stats: Tensor, segments: list[int],
                     lr: float, momentum_coef: float, beta: float, damping: float,
                     weight_decay: float, decoupled_weight_decay: bool) -> None:
    """The bucket op (schema in csrc/registration.cpp): one launch per segment, each reading
    its strided rows (and tail) in place and its own tiles of the bucket's compact state."""
    hyper = _hyper(lr, momentum_coef, beta, damping, weight_decay, decoupled_weight_decay)
    for k in range(0, len(segments), SEGMENT_FIELDS):
        main, tail, n, offset, width, row_stride, tile_offset, flags = segments[k:k + SEGMENT_FIELDS]
        if n == 0:
            continue
        d = width + (tail >= 0)
        view = [t.reshape(-1)[offset:] for t in (params[main], grads[main], momenta[main])]
        tails = ([t.reshape(-1) for t in (params[tail], grads[tail], momenta[tail])]
                 if tail >= 0 else None)
        tiles = -(-n // COMPACT_TILE)
        F = curvature[tile_offset:tile_offset + tiles]
        L = factor[tile_offset:tile_offset + tiles]
        _launch_segment(*view, tails, F, L, stats, n, row_stride, width, d, flags, hyper)
