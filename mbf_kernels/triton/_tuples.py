"""Register-tuple building blocks shared by every Triton kernel of the package (private).

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

The block math is MBF_SPEC sections 3-4, as in :mod:`mbf_kernels.reference`: the factor is L of
``A + damping I`` row by row, its diagonal kept inverted (1 / L_jj, so that the solves multiply
only); ``info`` is the 1-based order of the first pivot that is not a finite positive number,
else 0. Scalars that enter the arithmetic are annotated ``tl.float64`` by the kernels and
rounded to the data's dtype here (:func:`scalar`), as torch rounds a Python float against a
tensor (Triton would otherwise pass them as float32, wrong for float64 data).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.constexpr_function
def tri(i, j):
    """Packed row-major lower-triangle index of (i, j), i >= j (a compile-time constant)."""
    return i * (i + 1) // 2 + j


@triton.jit
def scalar(x, dtype):
    """A float64 scalar argument rounded to ``dtype`` (through float64 also in the interpreter,
    which would otherwise read a Python float as float32)."""
    return tl.full([], x, tl.float64).to(dtype)


@triton.jit
def lane_range(n, BLOCK: tl.constexpr):
    lanes = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return lanes, lanes < n


@triton.jit
def compact_base(blocks, T: tl.constexpr):
    """Offset of entry 0 of each block in a compact tensor (entry e is 16 * e further)."""
    return (blocks // 16) * (T * 16) + blocks % 16


# Each stream is loaded and stored as ONE 2-D (BLOCK, NP) tile and split into a tuple of
# (BLOCK,) tensors by a tree of tl.split (tl.join to store). One memory op per stream keeps
# compile time linear in the block size: with one tl.load per entry, Triton's coalescing pass
# (quadratic in the number of memory ops of a connected kernel) took 8 s at d = 9 and over ten
# minutes at d = 27. Each row of the tile is one lane's block, held by one thread.


@triton.constexpr_function
def log2(x):
    return x.bit_length() - 1


@triton.constexpr_function
def bitrev(e, bits):
    """Where entry e of a split tree's input lands among its outputs (bit-reversed order)."""
    r = 0
    for _ in range(bits):
        r = (r << 1) | (e & 1)
        e >>= 1
    return r


@triton.constexpr_function
def pow2(x):
    return 1 << (x - 1).bit_length() if x > 1 else 1


@triton.jit
def unpack(tile, N: tl.constexpr):
    """(BLOCK, NP) -> tuple of the first N columns, each (BLOCK,)."""
    BLOCK: tl.constexpr = tile.shape[0]
    NP: tl.constexpr = tile.shape[1]
    if NP == 1:
        out = (tl.reshape(tile, [BLOCK]),)
    else:
        parts = (tile,)
        for level in tl.static_range(log2(NP)):
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
            out = out + (parts[bitrev(e, log2(NP))],)
    return out


@triton.jit
def pack(vals, N: tl.constexpr, NP: tl.constexpr):
    """Inverse of unpack: tuple of N (BLOCK,) -> (BLOCK, NP), zero past N."""
    BLOCK: tl.constexpr = vals[0].shape[0]
    if NP == 1:
        tile = tl.reshape(vals[0], [BLOCK, 1])
    else:
        parts = ()
        for q in tl.static_range(NP):
            if bitrev(q, log2(NP)) < N:
                parts = parts + (vals[bitrev(q, log2(NP))],)
            else:
                parts = parts + (tl.zeros_like(vals[0]),)
        for level in tl.static_range(log2(NP)):
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
def tri_rows_cols(D: tl.constexpr):
    """(row, col) of every packed entry e in [0, pow2(T)): row i holds entries i(i+1)/2 ..."""
    e = tl.arange(0, pow2(D * (D + 1) // 2))
    row = tl.zeros_like(e)
    for k in tl.static_range(1, D):
        row += (e >= k * (k + 1) // 2).to(e.dtype)
    return e, row, e - row * (row + 1) // 2


@triton.jit
def load_tri(ptr, base, mask, D: tl.constexpr, COMPACT: tl.constexpr):
    """The packed lower triangle of each lane's block: a tuple of d(d+1)/2 (BLOCK,) tensors.
    ``base`` is the offset of each block's first entry (compact layout, or dense row-major,
    where only the lower triangle is read)."""
    T: tl.constexpr = D * (D + 1) // 2
    e, row, col = tri_rows_cols(D)
    offs = e * 16 if COMPACT else row * D + col
    tile = tl.load(ptr + base[:, None] + offs[None, :], mask=mask[:, None] & (e[None, :] < T),
                   other=0.0)
    return unpack(tile, T)


@triton.jit
def store_tri(ptr, base, mask, a, D: tl.constexpr):
    """Store a packed triangle into a compact tensor."""
    T: tl.constexpr = D * (D + 1) // 2
    e = tl.arange(0, pow2(T))
    tl.store(ptr + base[:, None] + e[None, :] * 16, pack(a, T, pow2(T)).to(ptr.dtype.element_ty),
             mask=mask[:, None] & (e[None, :] < T))


@triton.jit
def store_dense(ptr, base, mask, a, D: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Store a packed triangle as dense d x d blocks: mirrored (SYMMETRIC) or with a zero upper
    triangle. Two stores of the packed tile, one through (i, j) and one through (j, i)."""
    T: tl.constexpr = D * (D + 1) // 2
    e, row, col = tri_rows_cols(D)
    tile = pack(a, T, pow2(T)).to(ptr.dtype.element_ty)
    m2 = mask[:, None] & (e[None, :] < T)
    tl.store(ptr + base[:, None] + (row * D + col)[None, :], tile, mask=m2)
    upper = ptr + base[:, None] + (col * D + row)[None, :]
    strict = m2 & (row > col)[None, :]
    if SYMMETRIC:
        tl.store(upper, tile, mask=strict)
    else:
        tl.store(upper, tl.zeros_like(tile), mask=strict)


@triton.jit
def load_vec(ptr, base, stride, mask, D: tl.constexpr):
    """Component i of each lane's vector at ``base + i * stride``: a tuple of D tensors."""
    i = tl.arange(0, pow2(D))
    return unpack(tl.load(ptr + base[:, None] + i[None, :] * stride,
                           mask=mask[:, None] & (i[None, :] < D), other=0.0), D)


@triton.jit
def store_vec(ptr, base, stride, mask, v, D: tl.constexpr):
    i = tl.arange(0, pow2(D))
    tl.store(ptr + base[:, None] + i[None, :] * stride,
             pack(v, D, pow2(D)).to(ptr.dtype.element_ty), mask=mask[:, None] & (i[None, :] < D))


@triton.jit
def select(cond, a, b, N: tl.constexpr):
    """Element-wise select between two tuples of N tensors."""
    out = ()
    for e in tl.static_range(N):
        out = out + (tl.where(cond, a[e], b[e]),)
    return out


@triton.jit
def recip(x):
    """1 / x, correctly rounded (Triton's float32 division and sqrt are approximate by default)."""
    one = tl.full(x.shape, 1.0, x.dtype)
    if x.dtype == tl.float32:
        r = tl.math.div_rn(one, x)
    else:
        r = one / x
    return r


@triton.jit
def rsqrt_ok(s):
    """(1 / sqrt(s) where s is a finite positive number, else 1; that test)."""
    ok = (s > 0) & (s < float("inf"))
    safe = tl.where(ok, s, tl.full(s.shape, 1.0, s.dtype))
    if s.dtype == tl.float32:
        root = tl.sqrt_rn(safe)
    else:
        root = tl.sqrt(safe)
    return recip(root), ok


@triton.jit
def cholesky(a, damping, D: tl.constexpr):
    """Factor each lane's ``A + damping I`` (A a packed triangle tuple), row by row.

    Returns (L as a packed tuple with its diagonal inverted, info int32 per lane). A failed
    pivot is replaced by 1 so the rest stays finite-ish; the caller discards such blocks.
    """
    l = ()
    info = tl.zeros(a[0].shape, dtype=tl.int32)
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            s = a[tri(i, j)]
            if i == j:
                s = s + damping
            for k in tl.static_range(j):
                s = s - l[tri(i, k)] * l[tri(j, k)]
            if i == j:
                r, ok = rsqrt_ok(s)
                info = tl.where((info == 0) & (ok == 0), i + 1, info)
                l = l + (r,)
            else:
                l = l + (s * l[tri(j, j)],)
    return l, info


@triton.jit
def diagonal_fallback(l, a, failed, damping, floor, D: tl.constexpr):
    """Failed lanes get the diagonal factor 1 / sqrt(A_jj + damping) (``floor`` where that is
    not a finite positive number: 1 / sqrt(damping), or 1): MBF_SPEC section 4."""
    out = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            if i == j:
                r, ok = rsqrt_ok(a[tri(i, i)] + damping)
                v = tl.where(ok, r, floor)
            else:
                v = tl.zeros_like(a[0])
            out = out + (tl.where(failed, v, l[tri(i, j)]),)
    return out


@triton.jit
def zero_where(cond, a, N: tl.constexpr):
    out = ()
    for e in tl.static_range(N):
        out = out + (tl.where(cond, tl.zeros_like(a[e]), a[e]),)
    return out


@triton.jit
def solve(l, b, D: tl.constexpr):
    """x = (L L^T)^{-1} b for each lane (L packed, diagonal inverted; b, x tuples of D)."""
    y = ()
    for i in tl.static_range(D):  # forward: L y = b
        s = b[i]
        for k in tl.static_range(i):
            s = s - l[tri(i, k)] * y[k]
        y = y + (s * l[tri(i, i)],)
    xr = ()  # backward: L^T x = y, built from the last component (xr[D - 1 - k] = x_k)
    for r in tl.static_range(D):  # row D - 1 - r
        s = y[D - 1 - r]
        for k in tl.static_range(D - r, D):
            s = s - l[tri(k, D - 1 - r)] * xr[D - 1 - k]
        xr = xr + (s * l[tri(D - 1 - r, D - 1 - r)],)
    x = ()
    for i in tl.static_range(D):
        x = x + (xr[D - 1 - i],)
    return x


@triton.jit
def inverse(l, D: tl.constexpr):
    """(L L^T)^{-1} as a packed triangle: W = L^{-1}, then W^T W."""
    w = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            if i == j:
                w = w + (l[tri(i, i)],)
            else:
                s = l[tri(i, j)] * w[tri(j, j)]
                for k in tl.static_range(j + 1, i):
                    s = s + l[tri(i, k)] * w[tri(k, j)]
                w = w + (-s * l[tri(i, i)],)
    inv = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            s = w[tri(i, i)] * w[tri(i, j)]
            for k in tl.static_range(i + 1, D):
                s = s + w[tri(k, i)] * w[tri(k, j)]
            inv = inv + (s,)
    return inv


@triton.jit
def outer(g, D: tl.constexpr):
    """g g^T as a packed triangle."""
    c = ()
    for i in tl.static_range(D):
        for j in tl.static_range(i + 1):
            c = c + (g[i] * g[j],)
    return c


@triton.jit
def ema(f, c, beta, one_minus_beta, N: tl.constexpr):
    out = ()
    for e in tl.static_range(N):
        out = out + (beta * f[e] + one_minus_beta * c[e],)
    return out


@triton.jit
def round_bf16(x):
    """float32 x rounded to the nearest bfloat16, ties to even (as the CPU kernels and torch
    round), still as float32: the conversion that follows is then exact, whatever rounding the
    compiler's or the interpreter's (which truncates) float32 -> bfloat16 uses."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def direction_entry(DIR, tile, lane, i, D: tl.constexpr):
    """Where entry i of each lane's u lives in the compact directions (tiles, D, 16)."""
    return DIR + (tile * D + i) * 16 + lane


@triton.jit
def moved(p, u, lr_u, lr_wd, DECOUPLED: tl.constexpr, D: tl.constexpr):
    """p - lr_u u, less the decoupled decay lr wd p."""
    new_p = ()
    for i in tl.static_range(D):
        if DECOUPLED:
            new_p = new_p + (p[i] - (lr_u * u[i] + lr_wd * p[i]),)
        else:
            new_p = new_p + (p[i] - lr_u * u[i],)
    return new_p
