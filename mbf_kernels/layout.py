"""The layout of the optimizer's state and of the fused bucket step: a leaf module.

Everything the kernels, the reference, the Triton launchers and the optimizer must agree on
about memory lives here, once: the compact tile layout of a bucket's curvature and factor, the
segment table of ``mbf_bucket_step_`` (its fields, flags and mode) and its one Python
validation. The C++ side mirrors it (csrc/ops_common.h ``kSegmentFields``, the comment in
csrc/registration.cpp) and points here.

Compact layout: kernels keep a bucket's packed triangles (curvature F, factor) in tiles of
:data:`COMPACT_TILE` blocks, block index fastest: shape ``(ceil(N/16), d(d+1)/2, 16)``. Each
row of a tile is one vector register (or two, or a coalesced GPU load), so the kernels read
whole rows with no shuffles. The canonical form, used by ``state_dict`` and by the reference,
is ``(N, d(d+1)/2)``: one packed lower triangle per block, row-major (:mod:`mbf_kernels.packed`).
Padding blocks (N up to a multiple of 16) hold finite values and are dropped on conversion.
The factor stores L with its diagonal inverted (1 / L_ii), an exact representation that makes
the solve multiplication-only; :func:`factor_from_cholesky` and :func:`cholesky_from_factor`
convert to and from a plain Cholesky factor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

from .packed import pack_tril, tril_dim, tril_size, unpack_tril

#: Blocks per compact tile (csrc/include/mbf/batched.h: kCompactTile).
COMPACT_TILE = 16


def n_tiles(n_blocks: int) -> int:
    """Compact tiles that hold ``n_blocks`` blocks."""
    return -(-n_blocks // COMPACT_TILE)


def compact_shape(n_blocks: int, d: int) -> tuple[int, int, int]:
    return (n_tiles(n_blocks), tril_size(d), COMPACT_TILE)


def to_compact(P: Tensor, *, pad: Tensor | None = None) -> Tensor:
    """(N, T) canonical packed rows -> (ceil(N/16), T, 16). ``pad`` (T,) fills padding blocks (zeros)."""
    n, t = P.shape
    tiles = n_tiles(n)
    padded = P.new_zeros(tiles * COMPACT_TILE, t) if pad is None else pad.expand(tiles * COMPACT_TILE, t).clone()
    padded[:n] = P
    return padded.view(tiles, COMPACT_TILE, t).transpose(1, 2).contiguous()


def from_compact(C: Tensor, n_blocks: int) -> Tensor:
    """(ceil(N/16), T, 16) -> (N, T) canonical packed rows."""
    tiles, t, width = C.shape
    if width != COMPACT_TILE or tiles * COMPACT_TILE < n_blocks:
        raise ValueError(f"from_compact: shape {tuple(C.shape)} cannot hold {n_blocks} blocks")
    return C.transpose(1, 2).reshape(tiles * COMPACT_TILE, t)[:n_blocks].contiguous()


def identity_factor(d: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The packed factor of the identity (also the padding value of factor state): (T,)."""
    return pack_tril(torch.eye(d, dtype=dtype, device=device))


def factor_from_cholesky(L: Tensor) -> Tensor:
    """(..., d, d) lower Cholesky factor -> (..., T) packed with the diagonal inverted."""
    L = L.clone()
    L.diagonal(dim1=-2, dim2=-1).reciprocal_()
    return pack_tril(L)


def cholesky_from_factor(P: Tensor) -> Tensor:
    """(..., T) packed factor with inverted diagonal -> (..., d, d) lower Cholesky factor."""
    L = unpack_tril(P, symmetric=False)
    L.diagonal(dim1=-2, dim2=-1).reciprocal_()
    return L


#: The int8 unit factor (factor_dtype="int8"; csrc/include/mbf/batched.h ``UnitI8``): L = U D
#: with U unit lower, its strictly lower entries int8 codes times one float scale per block,
#: and r = D^{-2} in bfloat16. A tile is :func:`unit_factor_rows` rows of COMPACT_TILE bytes:
#: the codes of (i, j), i > j, at row i(i-1)/2 + j, the scales (UNIT_SCALE_ROWS rows), then the
#: pivots r_i (two rows each). From UNIT_MIN_DIM on it is smaller than the bfloat16 factor.
UNIT_SCALE_ROWS = 4
UNIT_MIN_DIM = 4


def unit_factor_rows(d: int) -> int:
    return d * (d - 1) // 2 + UNIT_SCALE_ROWS + 2 * d


def unit_from_factor(C: Tensor) -> Tensor:
    """A compact float32 factor (tiles, T, 16), diagonal inverted, as the int8 unit factor
    (tiles, unit_factor_rows(d), 16), coded as the CPU kernels' refactor codes it: U_ij = L_ij
    / L_jj as round(U_ij / scale) (ties to even), scale = max |U| / 127 per block rounded to
    bfloat16, and r_i = (1 / L_ii)^2 rounded to bfloat16; a block whose U is not finite codes
    zeros (U = I)."""
    tiles, t, _ = C.shape
    d = tril_dim(t)
    L = unpack_tril(C.transpose(1, 2).float(), symmetric=False)  # (tiles, 16, d, d)
    inv = L.diagonal(dim1=-2, dim2=-1)
    strict = torch.tril_indices(d, d, -1, device=C.device)
    U = L[..., strict[0], strict[1]] * inv[..., strict[1]]  # row-major (i, j), i > j
    amax = U.abs().amax(dim=-1, keepdim=True) if d > 1 else U.new_zeros(tiles, COMPACT_TILE, 1)
    finite = amax.isfinite()
    # (the scale rounded to bfloat16: decoding and coding again gives the same bytes)
    scale = torch.where(finite, (amax / 127).bfloat16().float(), torch.zeros_like(amax))
    coding = torch.where(finite & (amax > 0), 1 / scale, torch.zeros_like(amax))
    codes = torch.round(torch.where(finite, U * coding, torch.zeros_like(U))).to(torch.int8)
    pivots = (inv * inv).to(torch.bfloat16)
    parts = (codes.transpose(1, 2), scale.reshape(tiles, COMPACT_TILE).view(torch.int8),
             pivots.transpose(1, 2).contiguous().view(torch.int8))
    return torch.cat([x.reshape(tiles, -1, COMPACT_TILE) for x in parts], dim=1)


def factor_from_unit(Q: Tensor, d: int) -> Tensor:
    """The int8 unit factor (tiles, unit_factor_rows(d), 16) as a compact float32 factor
    (tiles, T, 16), diagonal inverted: L_ij = code_ij scale r_j^{-1/2}, 1 / L_ii = r_i^{1/2}
    (in float64, then rounded: a coded factor decoded and coded again is the same bytes)."""
    tiles, rows, width = Q.shape
    if rows != unit_factor_rows(d) or width != COMPACT_TILE or Q.dtype != torch.int8:
        raise ValueError(f"factor_from_unit: an int8 factor of d = {d} has shape (tiles, "
                         f"{unit_factor_rows(d)}, {COMPACT_TILE}), got {Q.dtype} "
                         f"{tuple(Q.shape)}")
    k = d * (d - 1) // 2
    codes = Q[:, :k].transpose(1, 2).double()  # (tiles, 16, k)
    scale = Q[:, k:k + UNIT_SCALE_ROWS].contiguous().view(torch.float32).reshape(tiles, -1, 1)
    r = Q[:, k + UNIT_SCALE_ROWS:].contiguous().view(torch.bfloat16).reshape(tiles, d, -1)
    root = r.double().transpose(1, 2).sqrt()  # (tiles, 16, d): 1 / L_ii
    L = torch.diag_embed(root)
    strict = torch.tril_indices(d, d, -1, device=Q.device)
    pivot = root[..., strict[1]]  # (padding blocks: r = 0, U = 0)
    L[..., strict[0], strict[1]] = torch.where(pivot > 0, codes * scale.double() / pivot, 0.0)
    return pack_tril(L).float().transpose(1, 2).contiguous()


def unit_coded(rows: Tensor) -> Tensor:
    """(n, T) float32 factor rows (diagonal inverted) as an int8 unit factor keeps them."""
    d = tril_dim(rows.shape[-1])
    return from_compact(factor_from_unit(unit_from_factor(to_compact(rows)), d), rows.shape[0])


def unit_factor_fits(d: int, device: torch.device) -> bool:
    """Whether a float32 bucket of blocks of size d on ``device`` can keep an int8 unit factor:
    on CPU tensors (the cpu and torch backends read it) from UNIT_MIN_DIM on (below it the
    bfloat16 factor is smaller)."""
    return d >= UNIT_MIN_DIM and device.type == "cpu"


def factor_shape(tiles: int, d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """A bucket's compact factor in its storage: (tiles, T, 16), or (tiles,
    unit_factor_rows(d), 16) for an int8 unit factor."""
    return (tiles, unit_factor_rows(d) if dtype == torch.int8 else tril_size(d), COMPACT_TILE)


def factor_rows(C: Tensor, n_blocks: int, d: int | None) -> Tensor:
    """(n, T) canonical rows of the compact factor C in its storage: an int8 unit factor (of
    blocks of size d) decoded to float32, any other as stored."""
    return from_compact(factor_from_unit(C, d) if C.dtype == torch.int8 else C, n_blocks)


def stored_factor(rows: Tensor, like: Tensor) -> Tensor:
    """(n, T) canonical rows as a compact factor in the storage of ``like`` (padding blocks
    zeros): rounded to its dtype, or coded as an int8 unit factor (as the CPU kernels code it)."""
    if like.dtype == torch.int8:
        return unit_from_factor(to_compact(rows.float()))
    return to_compact(rows.to(like))


# ---------------------------------------------------------------------------------------------
# The bucket step's segment table (mbf_bucket_step_ in csrc/registration.cpp, the reference and
# the Triton launcher).

#: ints per segment in the ``segments`` list of ``mbf_bucket_step_``.
SEGMENT_FIELDS = 9


class SegmentFlags(enum.IntFlag):
    """The flags field of a segment: what the step does to its curvature."""

    REFRESH = 1  # refresh the curvature (EMA of g g^T)
    FIRST = 2  # ... and it is the first refresh: F = g g^T (needs REFRESH)
    REFACTOR = 4  # refactor F + damping I


@dataclass(frozen=True)
class Segment:
    """A strided run of ``n_blocks`` same-size blocks, as the bucket step reads them: block i is
    ``tensors[main].flatten()[offset + i * row_stride:][:width]``, followed by
    ``tensors[tail][i]`` when ``tail`` is not None (d = width + 1: a Linear bias joined to its
    weight row). ``tensors`` are params, grads or momenta, all contiguous in the layout."""

    main: int
    tail: int | None
    n_blocks: int
    offset: int
    width: int
    row_stride: int

    @property
    def d(self) -> int:
        return self.width + (self.tail is not None)

    def _main_view(self, tensor: Tensor) -> Tensor:
        flat = tensor.reshape(-1)
        return flat.as_strided((self.n_blocks, self.width), (self.row_stride, 1),
                               flat.storage_offset() + self.offset)

    def rows(self, tensors: list[Tensor]) -> Tensor:
        """The segment's blocks of ``tensors``: (n_blocks, d) (a copy when there is a tail)."""
        r = self._main_view(tensors[self.main])
        if self.tail is None:
            return r
        return torch.cat([r, tensors[self.tail].reshape(-1)[: self.n_blocks, None]], dim=1)

    def write_rows(self, tensors: list[Tensor], X: Tensor) -> None:
        """Inverse of :meth:`rows`: write (n_blocks, d) block values into ``tensors`` in place."""
        self._main_view(tensors[self.main]).copy_(X[:, : self.width])
        if self.tail is not None:
            tensors[self.tail].reshape(-1)[: self.n_blocks].copy_(X[:, self.width])


class StepMode(enum.IntFlag):
    """What one call of the bucket step does besides the curvature refresh and refactor its
    segments' flags ask for (the ``mode`` argument of ``mbf_bucket_step_``).

    ``WRITE``: store the new momentum and update the parameters (the paper's one pass).
    ``GRAFT`` alone, the measuring pass of a grafted step: store the new momentum and Adam's
    second moment ``v`` of the step's direction, MBF's direction ``u`` of each block to
    ``directions`` (compact, (tiles, d, 16)) and each block's ``[|u_b|^2, |a_b|^2]`` (MBF's
    direction, Adam's) to ``tile_norms`` (or, shaped (tiles, 2, 1), their sums per tile);
    the parameters are not touched.
    ``WRITE | GRAFT``, the writing pass of a grafted step: update the parameters by the stored
    direction, scaled per tile by ``tile_scale``; it reads no gradient, momentum, v or factor
    (a grafted step moves 12 B more per element than the paper's instead of 40).
    ``WRITE | GRAFT | LAGGED``, the grafted step in one pass (``graft_norms="previous"``):
    the measuring pass's work (m, v and the norms stored, no direction) and the parameters
    moved by u scaled by ``tile_scale``, which holds the previous step's ratios (a grafted step
    then moves 8 B more per element than the paper's).
    No bit at all runs the refresh/refactor only (relative damping's first pass).
    """

    NONE = 0
    WRITE = 1
    GRAFT = 2
    LAGGED = 4

    @property
    def measures(self) -> bool:
        """Whether the pass measures the graft's norms (and updates Adam's v)."""
        return bool(self & StepMode.GRAFT) and (not self & StepMode.WRITE
                                                 or bool(self & StepMode.LAGGED))

    @property
    def applies_direction(self) -> bool:
        """Whether the pass moves the parameters by stored directions (the writing pass)."""
        return self == StepMode.WRITE | StepMode.GRAFT

    @property
    def uses_directions(self) -> bool:
        """Whether the pass is one of a two-pass grafted step's, which store (the measuring
        pass) or read (the writing pass) each block's direction."""
        return self in (StepMode.GRAFT, StepMode.WRITE | StepMode.GRAFT)


#: The modes a bucket pass takes (:class:`StepMode`).
STEP_MODES = (StepMode.NONE, StepMode.WRITE, StepMode.GRAFT, StepMode.WRITE | StepMode.GRAFT,
              StepMode.WRITE | StepMode.GRAFT | StepMode.LAGGED)


def check_mode(fn: str, mode: int, tile_scale, tile_norms, directions) -> StepMode:
    """``mode`` as a :class:`StepMode`, checked to be one of :data:`STEP_MODES` with the
    grafting tensors it needs; ``fn`` starts each error message."""
    if mode not in STEP_MODES:
        raise ValueError(f"{fn}: mode must be 0, 1 (write), 2 (graft), 3 (write | graft) or 7 "
                         f"(write | graft | lagged), got {int(mode)}")
    mode = StepMode(mode)
    if mode.uses_directions and directions is None:
        raise ValueError(f"{fn}: a two-pass grafted step needs directions (modes 2 and 3)")
    if mode.measures and tile_norms is None:
        raise ValueError(f"{fn}: a grafted step needs tile_norms to measure (modes 2 and 7)")
    if mode & StepMode.WRITE and mode & StepMode.GRAFT and tile_scale is None:
        raise ValueError(f"{fn}: a grafted step needs tile_scale to write (modes 3 and 7)")
    return mode


def check_segments(fn: str, segments: list[int], numels: list[int], d: int, tiles: int,
                   graft: bool) -> list[tuple[int, ...]]:
    """Check a segment table against the tensors it reads (``numels``: elements of each params
    tensor) and the state's ``tiles``; return its segments as tuples of the
    :data:`SEGMENT_FIELDS` ints. ``fn`` starts each error message."""
    if len(segments) % SEGMENT_FIELDS:
        raise ValueError(f"{fn}: segments must hold {SEGMENT_FIELDS} ints per segment, got "
                         f"{len(segments)}")
    out = []
    next_free_tile = 0
    for s in range(0, len(segments), SEGMENT_FIELDS):
        seg = tuple(segments[s:s + SEGMENT_FIELDS])
        main, tail, n, col, width, stride, tile0, flags, step = seg
        where = f"{fn}: segment {s // SEGMENT_FIELDS}"
        if not (0 <= main < len(numels) and -1 <= tail < len(numels)):
            raise ValueError(f"{where} names tensor {main} / {tail} of {len(numels)}")
        if width + (tail >= 0) != d or n < 0 or col < 0 or stride < width:
            raise ValueError(f"{where} has a bad layout (n {n}, offset {col}, width {width}, "
                             f"stride {stride}) for blocks of size {d}")
        if n and col + (n - 1) * stride + width > numels[main]:
            raise ValueError(f"{where} reaches past the end of params[{main}]")
        if tail >= 0 and numels[tail] < n:
            raise ValueError(f"{where} needs {n} tail values, params[{tail}] has "
                             f"{numels[tail]}")
        if tile0 < next_free_tile or tile0 + n_tiles(n) > tiles:
            raise ValueError(f"{where} owns tiles [{tile0}, {tile0 + n_tiles(n)}), which overlap "
                             f"the previous segment's or exceed the {tiles} tiles of the state")
        if not 0 <= flags < 8 or (flags & SegmentFlags.FIRST and
                                  not flags & SegmentFlags.REFRESH):
            raise ValueError(f"{where} has bad flags {flags} (1: update curvature, 2: first "
                             "update, which needs 1, 4: refactor)")
        if graft and step < 1:
            raise ValueError(f"{where} has step {step}; a grafted step needs the unit's step "
                             "count >= 1")
        next_free_tile = tile0 + n_tiles(n)
        out.append(seg)
    return out


def check_bucket_step_fake(params, grads, momenta, curvature, factor, stats,
                           segments) -> None:
    """What a fake (meta) bucket step can check while torch.compile traces: the argument
    structure, with ``torch._check`` (the values are checked by the real kernels)."""
    torch._check(len(params) == len(grads) == len(momenta),
                 lambda: "params, grads and momenta must have the same length")
    for i, (p, g, m) in enumerate(zip(params, grads, momenta)):
        torch._check(g.shape == p.shape and m.shape == p.shape,
                     lambda: f"grads[{i}] and momenta[{i}] must have the shape of params[{i}]")
        # A call mixing devices dispatches to the highest of them: with one meta tensor among
        # CPU ones that is this fake kernel, which must then refuse it, not return.
        for name, t in (("params", p), ("grads", g), ("momenta", m)):
            torch._check(t.device == curvature.device and t.dtype == curvature.dtype,
                         lambda: f"{name}[{i}] must match curvature ({curvature.dtype} on "
                                 f"{curvature.device}), got {t.dtype} on {t.device}")
    for name, t in (("factor", factor), ("stats", stats)):
        torch._check(t.device == curvature.device,
                     lambda: f"{name} must be on {curvature.device}, got {t.device}")
    torch._check(curvature.dim() == 3 and curvature.shape[2] == COMPACT_TILE,
                 lambda: "curvature must be a compact tensor")
    torch._check(factor.shape == factor_shape(curvature.shape[0], tril_dim(curvature.shape[1]),
                                              factor.dtype),
                 lambda: "factor must have the curvature's compact shape (an int8 factor: "
                         "(tiles, unit_factor_rows(d), 16))")
    torch._check(stats.numel() == 2, lambda: "stats must hold 2 counters")
    torch._check(len(segments) % SEGMENT_FIELDS == 0,
                 lambda: f"segments must hold {SEGMENT_FIELDS} ints per segment")
