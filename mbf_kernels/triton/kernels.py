"""Triton kernels for the block ops: dense (N, d, d) batches and the compact state layout.

One block per lane. A program owns ``BLOCK`` blocks, and each lane keeps its whole block in
registers as a *tuple* of (BLOCK,) tensors, one per packed entry: the loops over the block size
are unrolled at compile time (``D`` is a ``tl.constexpr``, loops are ``tl.static_range``), so
every packed index is a compile-time constant and no value ever goes back through memory before
the final store (no lane reads what another thread wrote: no barriers needed, and nothing
depends on how Triton lays the lanes out over threads).

Memory layouts:

* dense: block b of an (N, d, d) batch at ``b * d * d``, row-major; vectors (N, d) or (N, d, k).
* compact (:mod:`mbf_kernels.layout`): entry e of block b at ``((b // 16) * T + e) * 16 + b % 16``
  with T = d(d+1)/2: 16 consecutive lanes read 16 consecutive values, so every state load and
  store is coalesced (64 B per 16 lanes in float32).

The math is MBF_SPEC sections 3-4, as in :mod:`mbf_kernels.reference`:

* factor: L of ``A + damping I`` row by row, its diagonal kept inverted (1 / L_jj, so that the
  solves multiply only); ``info`` is the 1-based order of the first pivot that is not a finite
  positive number, else 0.
* fused step: momentum, optional curvature EMA (skipped for a block whose gradient is not
  finite, counted), solve with the cached factor and parameter update, in one pass; on a
  refactor step (every T2-th) a refactor kernel runs first: the refresh, the factor, and for a
  failed block the diagonal preconditioner 1 / sqrt(F_jj + damping), counted.

Scalars that enter the arithmetic are annotated ``tl.float64`` and rounded to the data's dtype
in the kernel, as torch rounds a Python float against a tensor (Triton would otherwise pass
them as float32, wrong for float64 data).

Naming ladder (as Liger-Kernel): ``_name`` (``@triton.jit``) -> host launchers in
:mod:`mbf_kernels.triton.ops` -> the public API.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Largest block size the Triton kernels take (why: mbf_kernels.dispatch).
from ..limits import TRITON_MAX_D as MAX_D  # noqa: F401
from ..limits import triton_interpreted

# The step kernel's segment table: SEG_FIELDS int64 per segment (offsets, in elements from the
# curvature's first, of p, g, m and of their tails; n_blocks, row stride, first tile, has a tail;
# the offsets of Adam's v and its tail, and the float64 bits of the unit's bias corrections c1,
# s2 when grafting), then the float64 bit patterns of lr, momentum, beta, damping, weight_decay,
# lr * weight_decay, the fallback floor, beta2 and eps. (Globals a kernel reads must be
# tl.constexpr.)
(SEG_P, SEG_G, SEG_M, SEG_PT, SEG_GT, SEG_MT, SEG_N, SEG_STRIDE, SEG_TILE, SEG_TAIL, SEG_V,
 SEG_VT, SEG_C1, SEG_S2) = (tl.constexpr(i) for i in range(14))
SEG_FIELDS = tl.constexpr(14)

#: (BLOCK, num_warps) candidates. BLOCK >= 32 * num_warps: each block has exactly one owning
#: thread (two per thread only when registers allow: fits).
CONFIGS = ((128, 4), (64, 2), (256, 4), (128, 2), (32, 1))


def fits(block: int, warps: int, d: int) -> bool:
    """Whether a (BLOCK, num_warps) config is worth trying for block size d: two blocks per
    thread only while a block's triangle leaves room in the 255 registers."""
    per_thread = block // (32 * warps)
    return per_thread == 1 or (per_thread == 2 and d <= 10)


def _prune(configs, named_args, **kwargs):
    if triton_interpreted():
        return [configs[0]]  # the interpreter ignores warps; tuning it would only cost time
    d = kwargs.get("D", named_args.get("D"))
    kept = [c for c in configs if fits(c.kwargs["BLOCK"], c.num_warps, d)]
    return kept or [configs[0]]


def _autotune(restore=()):
    """Tile size and warps tuned per block size (and size class, and dtype) on first use; the
    kernels that update in place restore their output between the trial runs."""
    return triton.autotune(
        configs=[triton.Config({"BLOCK": b}, num_warps=w, num_stages=1) for b, w in CONFIGS],
        key=["D", "NBIN"], restore_value=list(restore),
        prune_configs_by={"early_config_prune": _prune})


# ---------------------------------------------------------------------------------------------
# Register-tuple building blocks


@triton.constexpr_function
def _tri(i, j):
    """Packed row-major lower-triangle index of (i, j), i >= j (a compile-time constant)."""
    return i * (i + 1) // 2 + j


@triton.jit
def _scalar(x, dtype):
    """A float64 scalar argument rounded to ``dtype`` (through float64 also in the interpreter,
    which would otherwise read a Python float as float32)."""
    return tl.full([], x, tl.float64).to(dtype)


@triton.jit
def _lanes(n, BLOCK: tl.constexpr):
    lanes = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return lanes, lanes < n


@triton.jit
def _compact_base(blocks, T: tl.constexpr):
    """Offset of entry 0 of each block in a compact tensor (entry e is 16 * e further)."""
    return (blocks // 16) * (T * 16) + blocks % 16


# Each stream is loaded and stored as ONE 2-D (BLOCK, NP) tile and split into a tuple of
# (BLOCK,) tensors by a tree of tl.split (tl.join to store). One memory op per stream keeps
# compile time linear in the block size: with one tl.load per entry, Triton's coalescing pass
# (quadratic in the number of memory ops of a connected kernel) took 8 s at d = 9 and over ten
# minutes at d = 27. Each row of the tile is one lane's block, held by one thread.


@triton.constexpr_function
def _log2(x):
    return x.bit_length() - 1


@triton.constexpr_function
def _bitrev(e, bits):
    """Where entry e of a split tree's input lands among its outputs (bit-reversed order)."""
    r = 0
    for _ in range(bits):
        r = (r << 1) | (e & 1)
        e >>= 1
    return r


@triton.constexpr_function
def _pow2(x):
    return 1 << (x - 1).bit_length() if x > 1 else 1


@triton.jit
def _unpack(tile, N: tl.constexpr):
    """(BLOCK, NP) -> tuple of the first N columns, each (BLOCK,)."""
    BLOCK: tl.constexpr = tile.shape[0]
    NP: tl.constexpr = tile.shape[1]
    if NP == 1:
        out = (tl.reshape(tile, [BLOCK]),)
    else:
        parts = (tile,)
        for level in tl.static_range(_log2(NP)):
            split = ()
            for q in tl.static_range(2 ** level):
                if (NP >> level) == 2:
                    a, b = tl.split(parts[q])
                else:
                    a, b = tl.split(tl.reshape(parts[q], [BLOCK, NP >> (level + 1), 2]))
                split = split + (a, b)
            parts = split
        out = ()
        for e in tl.static_range(N):
            out = out + (parts[_bitrev(e, _log2(NP))],)
    return out


@triton.jit
def _pack(vals, N: tl.constexpr, NP: tl.constexpr):
    """Inverse of _unpack: tuple of N (BLOCK,) -> (BLOCK, NP), zero past N."""
    BLOCK: tl.constexpr = vals[0].shape[0]
    if NP == 1:
        tile = tl.reshape(vals[0], [BLOCK, 1])
    else:
        parts = ()
        for q in tl.static_range(NP):
            if _bitrev(q, _log2(NP)) < N:
                parts = parts + (vals[_bitrev(q, _log2(NP))],)
            else:
                parts = parts + (tl.zeros_like(vals[0]),)
        for level in tl.static_range(_log2(NP)):
            joined = ()
            for q in tl.static_range(NP >> (level + 1)):
                if level == 0:
                    joined = joined + (tl.join(parts[2 * q], parts[2 * q + 1]),)
                else:
                    joined = joined + (tl.reshape(tl.join(parts[2 * q], parts[2 * q + 1]),
                                                  [BLOCK, 2 << level]),)
            parts = joined
        tile = parts[0]
    return tile


@triton.jit
def _tri_rows_cols(D: tl.constexpr):
    """(row, col) of every packed entry e in [0, pow2(T)): row i holds entries i(i+1)/2 ..."""
    e = tl.arange(0, _pow2(D * (D + 1) // 2))
    row = tl.zeros_like(e)
    for k in tl.static_range(1, D):
        row += (e >= k * (k + 1) // 2).to(e.dtype)
    return e, row, e - row * (row + 1) // 2


@triton.jit
def _load_tri(ptr, base, mask, D: tl.constexpr, COMPACT: tl.constexpr):
    """The packed lower triangle of each lane's block: a tuple of d(d+1)/2 (BLOCK,) tensors.
    ``base`` is the offset of each block's first entry (compact layout, or dense row-major,
    where only the lower triangle is read)."""
    T: tl.constexpr = D * (D + 1) // 2
    e, row, col = _tri_rows_cols(D)
    offs = e * 16 if COMPACT else row * D + col
    tile = tl.load(ptr + base[:, None] + offs[None, :], mask=mask[:, None] & (e[None, :] < T),
                   other=0.0)
    return _unpack(tile, T)


@triton.jit
def _store_tri(ptr, base, mask, a, D: tl.constexpr):
    """Store a packed triangle into a compact tensor."""
    T: tl.constexpr = D * (D + 1) // 2
    e = tl.arange(0, _pow2(T))
    tl.store(ptr + base[:, None] + e[None, :] * 16, _pack(a, T, _pow2(T)).to(ptr.dtype.element_ty),
             mask=mask[:, None] & (e[None, :] < T))


@triton.jit
def _store_dense(ptr, base, mask, a, D: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Store a packed triangle as dense d x d blocks: mirrored (SYMMETRIC) or with a zero upper
    triangle. Two stores of the packed tile, one through (i, j) and one through (j, i)."""
    T: tl.constexpr = D * (D + 1) // 2
    e, row, col = _tri_rows_cols(D)
    tile = _pack(a, T, _pow2(T)).to(ptr.dtype.element_ty)
    m2 = mask[:, None] & (e[None, :] < T)
    tl.store(ptr + base[:, None] + (row * D + col)[None, :], tile, mask=m2)
    upper = ptr + base[:, None] + (col * D + row)[None, :]
    strict = m2 & (row > col)[None, :]
    if SYMMETRIC:
        tl.store(upper, tile, mask=strict)
    else:
        tl.store(upper, tl.zeros_like(tile), mask=strict)


@triton.jit
def _load_vec(ptr, base, stride, mask, D: tl.constexpr):
    """Component i of each lane's vector at ``base + i * stride``: a tuple of D tensors."""
    i = tl.arange(0, _pow2(D))
    return _unpack(tl.load(ptr + base[:, None] + i[None, :] * stride,
                           mask=mask[:, None] & (i[None, :] < D), other=0.0), D)


@triton.jit
def _store_vec(ptr, base, stride, mask, v, D: tl.constexpr):
    i = tl.arange(0, _pow2(D))
    tl.store(ptr + base[:, None] + i[None, :] * stride,
             _pack(v, D, _pow2(D)).to(ptr.dtype.element_ty), mask=mask[:, None] & (i[None, :] < D))


@triton.jit
def _where(cond, a, b, N: tl.constexpr):
    """Element-wise select between two tuples of N tensors."""
    out = ()
    for e in tl.static_range(N):
        out = out + (tl.where(cond, a[e], b[e]),)
    return out


@triton.jit
def _recip(x):
    """1 / x, correctly rounded (Triton's float32 division and sqrt are approximate by default)."""
    one = tl.full(x.shape, 1.0, x.dtype)
    if x.dtype == tl.float32:
        r = tl.math.div_rn(one, x)
    else:
        r = one / x
    return r


@triton.jit
def _rsqrt_ok(s):
    """(1 / sqrt(s) where s is a finite positive number, else 1; that test)."""
    ok = (s > 0) & (s < float("inf"))
    safe = tl.where(ok, s, tl.full(s.shape, 1.0, s.dtype))
    if s.dtype == tl.float32:
        root = tl.sqrt_rn(safe)
    else:
        root = tl.sqrt(safe)
    return _recip(root), ok


@triton.jit
def _cholesky(a, damping, D: tl.constexpr):
    """Factor each lane's ``A + damping I`` (A a packed triangle tuple), row by row.

    Returns (L as a packed tuple with its diagonal inverted, info int32 per lane). A failed
    pivot is replaced by 1 so the rest stays finite-ish; the caller discards such blocks.
    """
    l = ()
    info = tl.zeros(a[0].shape, dtype=tl.int32)
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            s = a[_tri(i, j)]
            if i == j:
                s = s + damping
            for k in tl.static_range(j):
                s = s - l[_tri(i, k)] * l[_tri(j, k)]
            if i == j:
                r, ok = _rsqrt_ok(s)
                info = tl.where((info == 0) & (ok == 0), i + 1, info)
                l = l + (r,)
            else:
                l = l + (s * l[_tri(j, j)],)
    return l, info


@triton.jit
def _diagonal_fallback(l, a, failed, damping, floor, D: tl.constexpr):
    """Failed lanes get the diagonal factor 1 / sqrt(A_jj + damping) (``floor`` where that is
    not a finite positive number: 1 / sqrt(damping), or 1): MBF_SPEC section 4."""
    out = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            if i == j:
                r, ok = _rsqrt_ok(a[_tri(i, i)] + damping)
                v = tl.where(ok, r, floor)
            else:
                v = tl.zeros_like(a[0])
            out = out + (tl.where(failed, v, l[_tri(i, j)]),)
    return out


@triton.jit
def _zero_where(cond, a, N: tl.constexpr):
    out = ()
    for e in tl.static_range(N):
        out = out + (tl.where(cond, tl.zeros_like(a[e]), a[e]),)
    return out


@triton.jit
def _solve(l, b, D: tl.constexpr):
    """x = (L L^T)^{-1} b for each lane (L packed, diagonal inverted; b, x tuples of D)."""
    y = ()
    for i in tl.static_range(D):  # forward: L y = b
        s = b[i]
        for k in tl.static_range(i):
            s = s - l[_tri(i, k)] * y[k]
        y = y + (s * l[_tri(i, i)],)
    xr = ()  # backward: L^T x = y, built from the last component (xr[D - 1 - k] = x_k)
    for r in tl.static_range(D):  # row D - 1 - r
        s = y[D - 1 - r]
        for k in tl.static_range(D - r, D):
            s = s - l[_tri(k, D - 1 - r)] * xr[D - 1 - k]
        xr = xr + (s * l[_tri(D - 1 - r, D - 1 - r)],)
    x = ()
    for i in tl.static_range(D):
        x = x + (xr[D - 1 - i],)
    return x


@triton.jit
def _inverse(l, D: tl.constexpr):
    """(L L^T)^{-1} as a packed triangle: W = L^{-1}, then W^T W."""
    w = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            if i == j:
                w = w + (l[_tri(i, i)],)
            else:
                s = l[_tri(i, j)] * w[_tri(j, j)]
                for k in tl.static_range(j + 1, i):
                    s = s + l[_tri(i, k)] * w[_tri(k, j)]
                w = w + (-s * l[_tri(i, i)],)
    inv = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            s = w[_tri(i, i)] * w[_tri(i, j)]
            for k in tl.static_range(i + 1, D):
                s = s + w[_tri(k, i)] * w[_tri(k, j)]
            inv = inv + (s,)
    return inv


@triton.jit
def _outer(g, D: tl.constexpr):
    """g g^T as a packed triangle."""
    c = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            c = c + (g[i] * g[j],)
    return c


@triton.jit
def _ema(f, c, beta, one_minus_beta, N: tl.constexpr):
    out = ()
    for e in tl.static_range(N):
        out = out + (beta * f[e] + one_minus_beta * c[e],)
    return out


# ---------------------------------------------------------------------------------------------
# Dense (N, d, d) kernels: the linalg API


@triton.jit
def _dense_factor(A, lanes, mask, damping, D: tl.constexpr):
    """The factor of each lane's dense block of A plus damping I: (packed L with its diagonal
    inverted, info)."""
    return _cholesky(_load_tri(A, lanes * (D * D), mask, D, False),
                     _scalar(damping, A.dtype.element_ty), D)


@triton.jit
def _invert_diagonal(l, mask, D: tl.constexpr):
    """Packed L with its diagonal replaced by its reciprocal (either direction between a dense
    factor and the kernels' form). Lanes past the batch invert 1, not the 0 they read, so that
    the interpreter does not warn of a division by 0."""
    out = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            if i == j:
                out = out + (_recip(tl.where(mask, l[_tri(i, i)], 1.0)),)
            else:
                out = out + (l[_tri(i, j)],)
    return out


@_autotune()
@triton.jit
def _dense_cholesky_kernel(A, L, info_ptr, n, damping: tl.float64, NBIN,
                           D: tl.constexpr, BLOCK: tl.constexpr):
    """L (N, D, D) lower = chol(A + damping I), zero where it failed; info (N,) int32."""
    lanes, mask = _lanes(n, BLOCK)
    l, info = _dense_factor(A, lanes, mask, damping, D)
    dense = _invert_diagonal(l, mask, D)  # the dense factor holds L_jj itself
    _store_dense(L, lanes * (D * D), mask, _zero_where(info != 0, dense, D * (D + 1) // 2), D,
                 False)
    tl.store(info_ptr + lanes, info, mask=mask)


@_autotune()
@triton.jit
def _dense_cholesky_solve_kernel(L, B, X, n, k, NBIN, D: tl.constexpr, BLOCK: tl.constexpr):
    """X (N, D, k) = (L L^T)^{-1} B for a dense lower factor L (N, D, D)."""
    lanes, mask = _lanes(n, BLOCK)
    l = _invert_diagonal(_load_tri(L, lanes * (D * D), mask, D, False), mask, D)
    for c in range(k):
        base = lanes * (D * k) + c
        x = _solve(l, _load_vec(B, base, k, mask, D), D)
        _store_vec(X, base, k, mask, x, D)


@_autotune()
@triton.jit
def _dense_solve_spd_kernel(A, B, X, info_ptr, n, k, damping: tl.float64, NBIN,
                            D: tl.constexpr, BLOCK: tl.constexpr):
    """X = (A + damping I)^{-1} B, factor and solves fused; X = 0 where the factor failed."""
    lanes, mask = _lanes(n, BLOCK)
    l, info = _dense_factor(A, lanes, mask, damping, D)
    failed = info != 0
    for c in range(k):
        base = lanes * (D * k) + c
        x = _solve(l, _load_vec(B, base, k, mask, D), D)
        _store_vec(X, base, k, mask, _zero_where(failed, x, D), D)
    tl.store(info_ptr + lanes, info, mask=mask)


@_autotune()
@triton.jit
def _dense_inv_spd_kernel(A, Ainv, info_ptr, n, damping: tl.float64, NBIN,
                          D: tl.constexpr, BLOCK: tl.constexpr):
    """Ainv = (A + damping I)^{-1} (symmetric, dense); zero where the factor failed."""
    lanes, mask = _lanes(n, BLOCK)
    l, info = _dense_factor(A, lanes, mask, damping, D)
    inv = _zero_where(info != 0, _inverse(l, D), D * (D + 1) // 2)
    _store_dense(Ainv, lanes * (D * D), mask, inv, D, True)
    tl.store(info_ptr + lanes, info, mask=mask)


@_autotune(restore=("F",))
@triton.jit
def _dense_outer_ema_kernel(F, G, n, S, beta: tl.float64, NBIN, D: tl.constexpr,
                            BLOCK: tl.constexpr):
    """In place: F = beta F + (1 - beta)/S sum_s g_s g_s^T, G (N, S, D); F's lower triangle is
    read and written mirrored, so F stays exactly symmetric."""
    lanes, mask = _lanes(n, BLOCK)
    T: tl.constexpr = D * (D + 1) // 2
    dt = F.dtype.element_ty
    c = ()
    for e in tl.static_range(T):
        c = c + (tl.zeros([BLOCK], dtype=dt),)
    for s in range(S):
        g = _load_vec(G, (lanes * S + s) * D, 1, mask, D)
        gg = _outer(g, D)
        nc = ()
        for e in tl.static_range(T):
            nc = nc + (c[e] + gg[e],)
        c = nc
    base = lanes * (D * D)
    f = _load_tri(F, base, mask, D, False)
    f = _ema(f, c, _scalar(beta, dt), _scalar((1 - tl.full([], beta, tl.float64)) / S, dt), T)
    _store_dense(F, base, mask, f, D, True)


# ---------------------------------------------------------------------------------------------
# Compact-layout kernels: the step's phases as standalone ops


@_autotune(restore=("F",))
@triton.jit
def _compact_outer_ema_kernel(F, G, n, beta: tl.float64, NBIN, D: tl.constexpr,
                              BLOCK: tl.constexpr):
    """F (compact) = beta F + (1 - beta) g g^T, one gradient row g of G (N, D) per block."""
    lanes, mask = _lanes(n, BLOCK)
    T: tl.constexpr = D * (D + 1) // 2
    dt = F.dtype.element_ty
    base = _compact_base(lanes, T)
    f = _load_tri(F, base, mask, D, True)
    c = _outer(_load_vec(G, lanes * D, 1, mask, D), D)
    _store_tri(F, base, mask, _ema(f, c, _scalar(beta, dt), _scalar(1 - tl.full([], beta, tl.float64), dt), T), D)


@_autotune()
@triton.jit
def _compact_cholesky_kernel(F, L, info_ptr, n, damping: tl.float64, NBIN,
                             D: tl.constexpr, BLOCK: tl.constexpr):
    """L (compact, diagonal inverted; zero for failed blocks), info (N,) int32."""
    lanes, mask = _lanes(n, BLOCK)
    T: tl.constexpr = D * (D + 1) // 2
    base = _compact_base(lanes, T)
    l, info = _cholesky(_load_tri(F, base, mask, D, True), _scalar(damping, F.dtype.element_ty), D)
    _store_tri(L, base, mask, _zero_where(info != 0, l, T), D)
    tl.store(info_ptr + lanes, info, mask=mask)


@_autotune()
@triton.jit
def _compact_solve_kernel(L, B, X, n, NBIN, D: tl.constexpr, BLOCK: tl.constexpr):
    """X (N, D) = (L L^T)^{-1} B (N, D), L compact with its diagonal inverted."""
    lanes, mask = _lanes(n, BLOCK)
    l = _load_tri(L, _compact_base(lanes, D * (D + 1) // 2), mask, D, True)
    x = _solve(l, _load_vec(B, lanes * D, 1, mask, D), D)
    _store_vec(X, lanes * D, 1, mask, x, D)


# ---------------------------------------------------------------------------------------------
# The fused optimizer step over a bucket of segments


@triton.jit
def _load_rows(ptr, tail, rows, blocks, mask, has_tail, D: tl.constexpr):
    """Each lane's block vector: D - has_tail values at ``ptr + rows``, then ``tail[block]``
    when the segment has a tail (a Linear bias joined to its weight row)."""
    i = tl.arange(0, _pow2(D))
    width = D - has_tail
    v = _unpack(tl.load(ptr + rows[:, None] + i[None, :],
                        mask=mask[:, None] & (i[None, :] < width[:, None]), other=0.0), D)
    t = tl.load(tail + blocks, mask=mask & (has_tail != 0), other=0.0)
    out = ()
    for j in tl.static_range(D - 1):
        out = out + (v[j],)
    return out + (tl.where(has_tail != 0, t, v[D - 1]),)


@triton.jit
def _store_rows(ptr, tail, rows, blocks, mask, has_tail, v, D: tl.constexpr):
    i = tl.arange(0, _pow2(D))
    width = D - has_tail
    tl.store(ptr + rows[:, None] + i[None, :], _pack(v, D, _pow2(D)).to(ptr.dtype.element_ty),
             mask=mask[:, None] & (i[None, :] < width[:, None]))
    tl.store(tail + blocks, v[D - 1].to(tail.dtype.element_ty), mask=mask & (has_tail != 0))


@triton.jit
def _hyper(table, k):
    return tl.load(table + k).to(tl.float64, bitcast=True)


@triton.jit
def _segment_blocks(table, n_seg, BLOCK: tl.constexpr):
    """This program's segment of the table and its blocks there: (row of the table, blocks,
    mask, has_tail per lane, the blocks' row offsets). Programs are dealt to the segments in
    order, ceil(n / BLOCK) each (a scalar scan over the table)."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.full([], 0, tl.int64)
    first = tl.full([], 0, tl.int64)
    start = tl.full([], 0, tl.int64)
    for s in range(n_seg):
        count = tl.cdiv(tl.load(table + s * SEG_FIELDS + SEG_N), BLOCK)
        hit = (pid >= start) & (pid < start + count)
        seg = tl.where(hit, s, seg)
        first = tl.where(hit, start, first)
        start += count
    row = table + seg * SEG_FIELDS
    blocks = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    mask = blocks < tl.load(row + SEG_N)
    # 0 or 1 per lane: the interpreter mistypes a vector mask combined with a scalar one
    has_tail = tl.zeros_like(blocks) + tl.load(row + SEG_TAIL)
    return row, blocks, mask, has_tail, blocks * tl.load(row + SEG_STRIDE)


@triton.jit
def _refresh(F, state, mask, g, beta64, FIRST: tl.constexpr, D: tl.constexpr):
    """Curvature refresh of each lane's block, stored; blocks whose gradient is not finite keep
    their F. Returns (the block's F after the step, finite per lane)."""
    T: tl.constexpr = D * (D + 1) // 2
    dt = F.dtype.element_ty
    finite = tl.abs(g[0]) < float("inf")
    for i in tl.static_range(1, D):
        finite = finite & (tl.abs(g[i]) < float("inf"))
    c = _outer(g, D)
    if FIRST:
        old = _load_tri(F, state, mask & (finite == 0), D, True)  # kept by skipped blocks
        f = c
    else:
        old = _load_tri(F, state, mask, D, True)
        f = _ema(old, c, beta64.to(dt), (1 - beta64).to(dt), T)
    f = _where(finite, f, old, T)
    _store_tri(F, state, mask & finite, f, D)
    return f, finite


# Lane masks apply to memory and counts only: per-lane math stays in the layout of the unpacked
# tiles (mixing in the mask's layout slowed Triton's layout pass several-fold).


@triton.jit
def _tiles(row, blocks):
    """(compact tile, lane in it) of each lane's block of the bucket state."""
    state_block = blocks + tl.load(row + SEG_TILE) * 16
    return state_block // 16, state_block % 16


@triton.jit
def _bucket_refactor_kernel(F, L, table, stats, n_seg, TD, UPDATE_CURVATURE: tl.constexpr,
                            FIRST_CURVATURE: tl.constexpr, TILE_DAMPING: tl.constexpr,
                            D: tl.constexpr, BLOCK: tl.constexpr):
    """The refactor phase of a step (every T2-th): optional curvature refresh, then the factor
    of F + damping I, a failed block getting the diagonal fallback; F and L stored. The step
    kernel follows with the cached factor. Apart, because the factorisation and the solve in
    one kernel compiled in 13 s at d = 9 and 260 s at d = 16 (Triton's layout passes), for one
    more read of g and L every T2 steps. Table layout: _bucket_step_kernel."""
    T: tl.constexpr = D * (D + 1) // 2
    row, blocks, mask, has_tail, rows = _segment_blocks(table, n_seg, BLOCK)
    hyper = table + n_seg * SEG_FIELDS
    damping = _hyper(hyper, 3).to(F.dtype.element_ty)
    floor = _hyper(hyper, 6).to(F.dtype.element_ty)
    if TILE_DAMPING:  # relative damping: one value per compact tile (its unit's)
        tile, _ = _tiles(row, blocks)
        damping = tl.load(TD + tile, mask=mask, other=1.0)
        floor = tl.where(damping > 0, 1.0 / tl.sqrt(tl.maximum(damping, 1e-30)), 1.0).to(
            F.dtype.element_ty)
    state = _compact_base(blocks + tl.load(row + SEG_TILE) * 16, T)
    if UPDATE_CURVATURE:
        g = _load_rows(F + tl.load(row + SEG_G), F + tl.load(row + SEG_GT), rows, blocks, mask,
                       has_tail, D)
        f, finite = _refresh(F, state, mask, g, _hyper(hyper, 2), FIRST_CURVATURE, D)
        skipped = tl.sum((mask & (finite == 0)).to(tl.int64), axis=0)
        tl.atomic_add(stats, skipped, mask=skipped > 0)
    else:
        f = _load_tri(F, state, mask, D, True)
    l, info = _cholesky(f, damping, D)
    l = _diagonal_fallback(l, f, info != 0, damping, floor, D)
    _store_tri(L, state, mask, l, D)
    n_failed = tl.sum((mask & (info != 0)).to(tl.int64), axis=0)
    tl.atomic_add(stats + 1, n_failed, mask=n_failed > 0)


@triton.jit
def _bucket_step_kernel(F, L, table, stats, n_seg, TS, TN,
                        DECOUPLED: tl.constexpr, UPDATE_CURVATURE: tl.constexpr,
                        FIRST_CURVATURE: tl.constexpr, WRITE: tl.constexpr, GRAFT: tl.constexpr,
                        D: tl.constexpr, BLOCK: tl.constexpr):
    """One MBF step with the cached factor (and an optional curvature refresh) for the segments
    of a bucket that share this step's flags.

    ``table`` holds SEG_FIELDS int64 per segment, then the float64 hyper-parameters. A
    segment's blocks are rows ``[0, n)`` of a strided view: block i reads D - has_tail values at
    ``F + p_off + i * row_stride`` (likewise g, m, v: every stream is addressed from F, the
    bucket's curvature, so one kernel serves any number of parameter tensors), then
    ``F + tail_off + i`` when it has a tail. Its state is compact tiles from ``tile`` on of F
    (curvature) and L (factor). stats (int64 (2,)) += [skipped curvature refreshes, failed
    factorisations]. GRAFT (MBF_SPEC 3b, mbf_kernels.reference.mbf_bucket_step_): Adam's v
    kept, each block's [|u|^2, |a|^2] stored to TN (tiles, 2, 16), the update scaled by TS
    (tiles,); WRITE stores m, v, p. Neither: the refresh alone.
    """
    T: tl.constexpr = D * (D + 1) // 2
    dt = F.dtype.element_ty
    row, blocks, mask, has_tail, rows = _segment_blocks(table, n_seg, BLOCK)
    hyper = table + n_seg * SEG_FIELDS
    lr = _hyper(hyper, 0).to(dt)
    rho = _hyper(hyper, 1).to(dt)
    wd = _hyper(hyper, 4).to(dt)
    lr_wd = _hyper(hyper, 5).to(dt)
    state = _compact_base(blocks + tl.load(row + SEG_TILE) * 16, T)
    g = _load_rows(F + tl.load(row + SEG_G), F + tl.load(row + SEG_GT), rows, blocks, mask,
                   has_tail, D)
    if UPDATE_CURVATURE:
        f, finite = _refresh(F, state, mask, g, _hyper(hyper, 2), FIRST_CURVATURE, D)
        skipped = tl.sum((mask & (finite == 0)).to(tl.int64), axis=0)
        tl.atomic_add(stats, skipped, mask=skipped > 0)
    if WRITE or GRAFT:
        l = _load_tri(L, state, mask, D, True)
        p_ptr = F + tl.load(row + SEG_P)
        pt_ptr = F + tl.load(row + SEG_PT)
        m_ptr = F + tl.load(row + SEG_M)
        mt_ptr = F + tl.load(row + SEG_MT)
        p = _load_rows(p_ptr, pt_ptr, rows, blocks, mask, has_tail, D)
        m = _load_rows(m_ptr, mt_ptr, rows, blocks, mask, has_tail, D)
        direction = ()
        mom = ()
        for i in tl.static_range(D):
            if DECOUPLED:
                direction = direction + (g[i],)
            else:
                direction = direction + (g[i] + wd * p[i],)
            mom = mom + (rho * m[i] + direction[i],)
        u = _solve(l, mom, D)
        lr_u = lr
        if GRAFT:
            tile, lane = _tiles(row, blocks)
            v_ptr = F + tl.load(row + SEG_V)
            vt_ptr = F + tl.load(row + SEG_VT)
            v = _load_rows(v_ptr, vt_ptr, rows, blocks, mask, has_tail, D)
            beta2 = _hyper(hyper, 7).to(dt)
            eps = _hyper(hyper, 8).to(dt)
            c1 = tl.load(row + SEG_C1).to(tl.float64, bitcast=True).to(dt)
            s2 = tl.load(row + SEG_S2).to(tl.float64, bitcast=True).to(dt)
            new_v = ()
            su = tl.zeros_like(u[0])
            sa = tl.zeros_like(u[0])
            for i in tl.static_range(D):
                new_v = new_v + (beta2 * v[i] + (1 - beta2) * direction[i] * direction[i],)
                a = c1 * mom[i] / (s2 * tl.sqrt(new_v[i]) + eps)
                su += u[i] * u[i]
                sa += a * a
            # A block whose norms are not finite (a NaN gradient) is left out of its unit's.
            ok = (tl.abs(su) < float("inf")) & (tl.abs(sa) < float("inf"))
            su = tl.where(ok & mask, su, 0.0)
            sa = tl.where(ok & mask, sa, 0.0)
            # Padding blocks of the segment's last tile get zeros too.
            tile_mask = blocks < tl.cdiv(tl.load(row + SEG_N), 16) * 16
            tl.store(TN + tile * 32 + lane, su.to(dt), mask=tile_mask)
            tl.store(TN + tile * 32 + 16 + lane, sa.to(dt), mask=tile_mask)
            if WRITE:
                lr_u = lr * tl.load(TS + tile, mask=mask, other=0.0)
                _store_rows(v_ptr, vt_ptr, rows, blocks, mask, has_tail, new_v, D)
        if WRITE:
            new_p = ()
            for i in tl.static_range(D):
                if DECOUPLED:
                    new_p = new_p + (p[i] - (lr_u * u[i] + lr_wd * p[i]),)
                else:
                    new_p = new_p + (p[i] - lr_u * u[i],)
            _store_rows(m_ptr, mt_ptr, rows, blocks, mask, has_tail, mom, D)
            _store_rows(p_ptr, pt_ptr, rows, blocks, mask, has_tail, new_p, D)
