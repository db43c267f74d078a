"""Triton kernels on the compact block layout (:mod:`mbf_kernels.compact`).

One block per lane: a program owns ``BLOCK`` consecutive blocks (a multiple of the 16-block
compact tile), so every load of a packed entry reads 16 consecutive values per tile (64 B in
float32): coalesced. Block element (b, e) of a compact tensor with T packed entries lives at
``((b // 16) * T + e) * 16 + b % 16``. Every loop over the block size is unrolled at compile
time (``D`` is a ``tl.constexpr``, loops are ``tl.static_range``), so packed indices are
compile-time constants. The math is MBF_SPEC sections 3-4, as in :mod:`mbf_kernels.reference`:

* factor: L of ``F + damping I`` with its diagonal stored inverted (1 / L_jj); ``info`` is the
  1-based order of the first pivot that is not a finite positive number, else 0.
* solve with a factor: forward then backward substitution, multiplication only.
* fused step: momentum, optional curvature EMA (skipped for a block whose gradient is not
  finite, counted), optional refactor (a failed block gets the diagonal preconditioner
  1 / sqrt(F_jj + damping), counted), solve and parameter update, in one pass.

Naming ladder (as Liger-Kernel): ``_name`` (private ``@triton.jit``) -> host launchers in
:mod:`mbf_kernels.triton.ops`.
"""

from __future__ import annotations

import triton
import triton.language as tl

TILE = 16  # blocks per compact tile (mbf_kernels.compact.COMPACT_TILE)


@triton.constexpr_function
def _idx(i, j):
    """Packed row-major lower-triangle index of (i, j), i >= j (a compile-time constant)."""
    return i * (i + 1) // 2 + j


@triton.jit
def _compact_base(lanes, T: tl.constexpr):
    return (lanes // 16) * (T * 16) + lanes % 16


@triton.jit
def _component(ptr, tail, lanes, row_stride, mask, j: tl.constexpr, WIDTH: tl.constexpr):
    """Component j of each lane's block vector: row ``lanes`` of a strided (N, WIDTH) view,
    and for j == WIDTH the tail vector (a Linear's bias joined to its weight row)."""
    if j < WIDTH:
        v = tl.load(ptr + lanes * row_stride + j, mask=mask, other=0.0)
    else:
        v = tl.load(tail + lanes, mask=mask, other=0.0)
    return v


@triton.jit
def _store_component(ptr, tail, lanes, row_stride, mask, v, j: tl.constexpr, WIDTH: tl.constexpr):
    if j < WIDTH:
        tl.store(ptr + lanes * row_stride + j, v, mask=mask)
    else:
        tl.store(tail + lanes, v, mask=mask)


@triton.jit
def _column(tile, cols, j: tl.constexpr):
    """Column j of a (BLOCK, DP) register tile, as a (BLOCK,) vector."""
    return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _set_column(tile, cols, j: tl.constexpr, v):
    return tl.where(cols[None, :] == j, v[:, None], tile)


@triton.jit
def _factor(src, dst, base, mask, damping, D: tl.constexpr):
    """Left-looking damped Cholesky of the compact blocks at ``src`` into ``dst`` (diagonal
    inverted); returns info per lane. ``dst`` doubles as the workspace: each lane only reads
    back what it wrote itself."""
    info = tl.zeros(base.shape, dtype=tl.int32)
    for j in tl.static_range(D):
        s = tl.load(src + base + _idx(j, j) * 16, mask=mask, other=1.0) + damping
        for k in tl.static_range(j):
            l = tl.load(dst + base + _idx(j, k) * 16, mask=mask, other=0.0)
            s -= l * l
        ok = (s > 0) & (s < float("inf"))
        info = tl.where((info == 0) & (ok == 0), j + 1, info)
        r = 1.0 / tl.sqrt(tl.where(ok, s, 1.0))
        tl.store(dst + base + _idx(j, j) * 16, r, mask=mask)
        for i in tl.static_range(j + 1, D):
            a = tl.load(src + base + _idx(i, j) * 16, mask=mask, other=0.0)
            for k in tl.static_range(j):
                a -= (tl.load(dst + base + _idx(i, k) * 16, mask=mask, other=0.0)
                      * tl.load(dst + base + _idx(j, k) * 16, mask=mask, other=0.0))
            tl.store(dst + base + _idx(i, j) * 16, a * r, mask=mask)
    return info


@triton.jit
def _fill_failed(src, dst, base, mask, damping, floor, DIAGONAL: tl.constexpr, D: tl.constexpr):
    """Overwrite the factor of the lanes in ``mask``: zeros (cholesky_ex), or with DIAGONAL the
    diagonal preconditioner 1 / sqrt(F_jj + damping) (``floor`` = 1 / sqrt(damping), or 1,
    where that is not finite and positive)."""
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            if DIAGONAL and i == j:
                s = tl.load(src + base + _idx(j, j) * 16, mask=mask, other=1.0) + damping
                ok = (s > 0) & (s < float("inf"))
                v = tl.where(ok, 1.0 / tl.sqrt(tl.where(ok, s, 1.0)), floor)
            else:
                v = tl.zeros(base.shape, dtype=dst.dtype.element_ty)
            tl.store(dst + base + _idx(i, j) * 16, v.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _solve(fac, base, b, mask, cols, D: tl.constexpr):
    """x = (L L^T)^{-1} b for each lane; b and x are (BLOCK, DP) register tiles."""
    x = b
    for i in tl.static_range(D):  # forward: L y = b
        y = _column(x, cols, i)
        for k in tl.static_range(i):
            y -= tl.load(fac + base + _idx(i, k) * 16, mask=mask, other=0.0) * _column(x, cols, k)
        y *= tl.load(fac + base + _idx(i, i) * 16, mask=mask, other=1.0)
        x = _set_column(x, cols, i, y)
    for ii in tl.static_range(D):  # backward: L^T x = y
        i: tl.constexpr = D - 1 - ii
        v = _column(x, cols, i)
        for k in tl.static_range(i + 1, D):
            v -= tl.load(fac + base + _idx(k, i) * 16, mask=mask, other=0.0) * _column(x, cols, k)
        v *= tl.load(fac + base + _idx(i, i) * 16, mask=mask, other=1.0)
        x = _set_column(x, cols, i, v)
    return x


@triton.jit
def _outer_ema_kernel(F, G, n, beta, D: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr):
    """F (compact) = beta F + (1 - beta) g g^T, one gradient row g of G (N, D) per block."""
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = lanes < n
    base = _compact_base(lanes, T)
    for i in tl.static_range(D):
        gi = tl.load(G + lanes * D + i, mask=mask, other=0.0)
        for j in tl.static_range(i + 1):
            gj = tl.load(G + lanes * D + j, mask=mask, other=0.0)
            f = tl.load(F + base + _idx(i, j) * 16, mask=mask, other=0.0)
            tl.store(F + base + _idx(i, j) * 16, beta * f + (1 - beta) * gi * gj, mask=mask)


@triton.jit
def _cholesky_kernel(F, L, info_ptr, n, damping, D: tl.constexpr, T: tl.constexpr,
                     BLOCK: tl.constexpr):
    """L (compact, diagonal inverted; zero for failed blocks), info (N,) int32."""
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = lanes < n
    base = _compact_base(lanes, T)
    info = _factor(F, L, base, mask, damping, D)
    _fill_failed(F, L, base, mask & (info != 0), damping, 1.0, False, D)
    tl.store(info_ptr + lanes, info, mask=mask)


@triton.jit
def _solve_kernel(L, B, X, n, D: tl.constexpr, DP: tl.constexpr, T: tl.constexpr,
                  BLOCK: tl.constexpr):
    """X (N, D) = (L L^T)^{-1} B (N, D), L compact with its diagonal inverted."""
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = lanes < n
    base = _compact_base(lanes, T)
    cols = tl.arange(0, DP)
    m2 = mask[:, None] & (cols[None, :] < D)
    b = tl.load(B + lanes[:, None] * D + cols[None, :], mask=m2, other=0.0)
    x = _solve(L, base, b, mask, cols, D)
    tl.store(X + lanes[:, None] * D + cols[None, :], x, mask=m2)


@triton.jit
def _step_kernel(p, g, m, p_tail, g_tail, m_tail, F, L, stats, n, row_stride,
                 lr, momentum_coef, beta, damping, weight_decay, floor,
                 DECOUPLED: tl.constexpr, UPDATE_CURVATURE: tl.constexpr,
                 FIRST_CURVATURE: tl.constexpr, REFACTOR: tl.constexpr,
                 WIDTH: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, T: tl.constexpr,
                 BLOCK: tl.constexpr):
    """One MBF step for a segment of n blocks: block i is row i of the strided (n, WIDTH)
    views p/g/m (row_stride apart), plus element i of p_tail/g_tail/m_tail when D = WIDTH + 1.
    F and L are the segment's compact curvature and factor; stats (int64 (2,)) += [skipped
    curvature refreshes, failed factorisations]."""
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = lanes < n
    base = _compact_base(lanes, T)
    cols = tl.arange(0, DP)
    if UPDATE_CURVATURE:
        finite = mask
        for i in tl.static_range(D):
            gi = _component(g, g_tail, lanes, row_stride, mask, i, WIDTH)
            finite = finite & (tl.abs(gi) < float("inf"))
        for i in tl.static_range(D):
            gi = _component(g, g_tail, lanes, row_stride, mask, i, WIDTH)
            for j in tl.static_range(i + 1):
                gj = _component(g, g_tail, lanes, row_stride, mask, j, WIDTH)
                c = gi * gj
                if not FIRST_CURVATURE:
                    c = beta * tl.load(F + base + _idx(i, j) * 16, mask=finite, other=0.0) \
                        + (1 - beta) * c
                tl.store(F + base + _idx(i, j) * 16, c.to(F.dtype.element_ty), mask=finite)
        tl.atomic_add(stats, tl.sum((mask & (finite == 0)).to(tl.int64), axis=0))
    if REFACTOR:
        info = _factor(F, L, base, mask, damping, D)
        failed = mask & (info != 0)
        _fill_failed(F, L, base, failed, damping, floor, True, D)
        tl.atomic_add(stats + 1, tl.sum(failed.to(tl.int64), axis=0))
    # Momentum and parameters as (BLOCK, DP) tiles: the strided main part, then the tail.
    m2 = mask[:, None] & (cols[None, :] < WIDTH)
    offs = lanes[:, None] * row_stride + cols[None, :]
    gv = tl.load(g + offs, mask=m2, other=0.0)
    mv = tl.load(m + offs, mask=m2, other=0.0)
    pv = tl.load(p + offs, mask=m2, other=0.0)
    if D > WIDTH:
        gv = _set_column(gv, cols, WIDTH, tl.load(g_tail + lanes, mask=mask, other=0.0))
        mv = _set_column(mv, cols, WIDTH, tl.load(m_tail + lanes, mask=mask, other=0.0))
        pv = _set_column(pv, cols, WIDTH, tl.load(p_tail + lanes, mask=mask, other=0.0))
    if DECOUPLED:
        mv = momentum_coef * mv + gv
    else:
        mv = momentum_coef * mv + (gv + weight_decay * pv)
    u = _solve(L, base, mv, mask, cols, D)
    if DECOUPLED:
        pv = pv - (lr * u + lr * weight_decay * pv)
    else:
        pv = pv - lr * u
    tl.store(m + offs, mv, mask=m2)
    tl.store(p + offs, pv, mask=m2)
    if D > WIDTH:
        tl.store(m_tail + lanes, _column(mv, cols, WIDTH), mask=mask)
        tl.store(p_tail + lanes, _column(pv, cols, WIDTH), mask=mask)


def block_lanes(d: int) -> int:
    """Blocks per program: a multiple of the tile, fewer for larger d (register pressure)."""
    return 64 if d <= 10 else 32 if d <= 27 else 16

