"""The Triton bucket step's segment tables (layout: ``SEG_FIELDS`` in step.py), built and checked
once per layout and tensors, the step counts' bias corrections filled in per call."""

from __future__ import annotations

from torch import Tensor

from ..layout import SEGMENT_FIELDS, check_segments
from ..reference import graft_bias_corrections
from ._common import LruCache, bits

#: int64 fields per segment in a table row (step.py's SEG_FIELDS).
TABLE_ROW = 14


#: The segment tables' fields of recent calls, keyed by everything they are built from but the
#: units' step counts: the same tensors and layout give the same fields every step, so a step only
#: fills in each row's bias corrections (grafting's, from its unit's step). Building and checking
#: them per call was half of a ResNet-32 step's host time (dev VM).
_PLANS = LruCache()
_STEP = SEGMENT_FIELDS - 1  # the step count's position in a segment's fields
_C1 = 12  # the bias corrections' position in a table row (SEG_FIELDS in step.py); c2 follows


def segment_tables(F: Tensor, params, grads, momenta, streams, segments, d: int,
                    graft: bool, momentum_coef: float, beta2: float) -> dict[int, tuple]:
    """flags -> (table fields, block counts) of the segments with those flags: every stream
    addressed by its offset from F's first element (layout: SEG_FIELDS in step.py), after the one
    segment check of :func:`mbf_kernels.layout.check_segments` (once per layout and tensors:
    ``_PLANS``)."""
    layout = list(segments)
    steps = layout[_STEP::SEGMENT_FIELDS]
    del layout[_STEP::SEGMENT_FIELDS]
    tensors = (*params, *grads, *momenta, *streams)
    key = (F.data_ptr(), F.shape[0], d, graft, tuple(layout),
           tuple(t.data_ptr() for t in tensors), tuple(t.numel() for t in params))
    plan = _PLANS.get(key, lambda: _table_plan(F, params, grads, momenta, streams, segments, d,
                                               graft))
    if not graft:
        return {flags: (fields, counts) for flags, (fields, counts, _) in plan.items()}
    if min(steps, default=1) < 1:  # (the plan was checked with other step counts)
        check_segments("mbf_kernels triton", segments, [p.numel() for p in params], d,
                       F.shape[0], graft)
    corrections: dict[int, tuple[int, int]] = {}
    groups = {}
    for flags, (fields, counts, rows) in plan.items():
        fields = fields.copy()
        for j, s in enumerate(rows):
            step = steps[s]
            if step not in corrections:
                c1, s2 = graft_bias_corrections(momentum_coef, beta2, step)
                corrections[step] = (bits(c1), bits(s2))
            k = j * TABLE_ROW + _C1
            fields[k], fields[k + 1] = corrections[step]
        groups[flags] = (fields, counts)
    return groups


def _table_plan(F: Tensor, params, grads, momenta, streams, segments, d: int,
                graft: bool) -> dict[int, tuple]:
    """flags -> (table fields with unit bias corrections of 1, block counts, the segments'
    indices in ``segments``): the checked, step-independent part of the segment tables."""
    size, base = F.element_size(), F.data_ptr()

    def offset(t: Tensor, elements: int) -> int:
        q, r = divmod(t.data_ptr() + elements * size - base, size)
        if r:
            raise ValueError("mbf_kernels triton: a tensor of the bucket is not aligned to "
                             "its element size")
        return q

    one = bits(1.0)
    groups: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for s, (main, tail, n, col, width, stride, tile0, flags, _) in enumerate(check_segments(
            "mbf_kernels triton", segments, [p.numel() for p in params], d, F.shape[0], graft)):
        if n == 0:
            continue
        t = tail if tail >= 0 else main
        fields, counts, rows = groups.setdefault(flags, ([], [], []))
        fields += [offset(params[main], col), offset(grads[main], col),
                   offset(momenta[main], col), offset(params[t], 0), offset(grads[t], 0),
                   offset(momenta[t], 0), n, stride, tile0, int(tail >= 0),
                   offset(streams[main], col), offset(streams[t], 0), one, one]
        counts.append(n)
        rows.append(s)
    return groups
