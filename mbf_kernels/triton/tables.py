"""The Triton bucket step's segment tables (layout: ``SEG_FIELDS`` in step.py), built, checked
and copied to the device once per layout and tensors; what changes from step to step (the
hyper-parameters, grafting's bias corrections) travels apart, in a few floats per launch."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import SEGMENT_FIELDS, check_segments
from ..reference import graft_bias_corrections
from ._common import TABLES, LruCache

#: int64 fields per segment in a table row (step.py's SEG_FIELDS).
TABLE_ROW = 12

#: The segment tables of recent calls, keyed by everything they are built from but the units'
#: step counts: the same tensors and layout give the same tables every step. Building, checking
#: and uploading them per call was most of a ResNet-32 step's host time (dev VM). (A bucket has
#: one plan per pass and set of flags, about ten: room for a few dozen buckets.)
_PLANS = LruCache(256)
_STEP = SEGMENT_FIELDS - 1  # the step count's position in a segment's fields


class Launch:
    """One launch of the step kernels: the segments that share a set of flags (and, grafted,
    a step count, whose bias corrections the launch takes as scalars): their device table and
    block counts, and the step they are at (1 when it does not matter)."""

    __slots__ = ("flags", "table", "counts", "step", "_programs")

    def __init__(self, flags: int, table: Tensor, counts: list[int], step: int,
                 programs: dict[int, int] | None = None) -> None:
        self.flags, self.table, self.counts, self.step = flags, table, counts, step
        self._programs = {} if programs is None else programs

    def programs(self, block: int) -> int:
        """The launch's grid: ``block`` blocks per program over each segment. Remembered per
        block size and shared with the plan's launch it copies: summed with ``triton.cdiv`` (a
        constexpr function, ~2 us a call) over ResNet-32's ~200 segments, it had been a third
        of a cached step's host time (dev VM, ``bench/bench_host.py``)."""
        grid = self._programs.get(block)
        if grid is None:
            grid = self._programs[block] = sum(-(-n // block) for n in self.counts)
        return grid


def segment_launches(F: Tensor, params, grads, momenta, streams, segments, d: int,
                     graft: bool) -> list[Launch]:
    """The launches of a bucket op's call: every stream addressed by its offset from F's first
    element (layout: SEG_FIELDS in step.py), after the one segment check of
    :func:`mbf_kernels.layout.check_segments` (once per layout and tensors: ``_PLANS``)."""
    layout = list(segments)
    steps = layout[_STEP::SEGMENT_FIELDS]
    layout[_STEP::SEGMENT_FIELDS] = [0] * len(steps)
    # (map over the unbound methods: a third cheaper than a generator, per tensor of ~400)
    key = (F.data_ptr(), F.shape[0], d, graft, tuple(layout),
           tuple(map(Tensor.data_ptr, (*params, *grads, *momenta, *streams))),
           tuple(map(Tensor.numel, params)))
    plan = _PLANS.get(key, lambda: _table_plan(F, params, grads, momenta, streams, segments, d,
                                               graft))
    if not graft:
        return plan
    if min(steps, default=1) < 1:  # (the plan was checked with other step counts)
        check_segments("mbf_kernels triton", segments, [p.numel() for p in params], d,
                       F.shape[0], graft)
    launches = []
    for launch in plan:
        rows = launch.rows
        first = steps[rows[0]]
        if all(steps[s] == first for s in rows):  # (the units of a model step together)
            launches.append(Launch(launch.flags, launch.table, launch.counts, first,
                                   launch._programs))
            continue
        by_step: dict[int, list[int]] = {}
        for j, s in enumerate(rows):
            by_step.setdefault(steps[s], []).append(j)
        for step, js in by_step.items():
            fields = [x for j in js for x in launch.fields[j * TABLE_ROW:(j + 1) * TABLE_ROW]]
            launches.append(Launch(launch.flags, TABLES.table(fields, F.device),
                                   [launch.counts[j] for j in js], step))
    return launches


class _PlannedLaunch(Launch):
    """A launch of the plan, with its host fields and the segments' indices in the call."""

    __slots__ = ("fields", "rows")


def _table_plan(F: Tensor, params, grads, momenta, streams, segments, d: int,
                graft: bool) -> list[_PlannedLaunch]:
    """The checked, step-independent launches: one per set of flags."""
    size, base = F.element_size(), F.data_ptr()

    def offset(t: Tensor, elements: int) -> int:
        q, r = divmod(t.data_ptr() + elements * size - base, size)
        if r:
            raise ValueError("mbf_kernels triton: a tensor of the bucket is not aligned to "
                             "its element size")
        return q

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
                   offset(streams[main], col), offset(streams[t], 0)]
        counts.append(n)
        rows.append(s)
    plan = []
    for flags, (fields, counts, rows) in groups.items():
        launch = _PlannedLaunch(flags, TABLES.table(fields, F.device), counts, 1)
        launch.fields, launch.rows = fields, rows
        plan.append(launch)
    return plan


def launch_scalars(launches: list[Launch], hyper: tuple[float, ...], graft: bool,
                   momentum_coef: float, beta2: float, device: torch.device) -> Tensor:
    """(launches, len(hyper) + 2) float64: each launch's hyper-parameters, then grafting's bias
    corrections c1, s2 at its step (1 when not grafting). One small copy per call, where a
    schedule's lr or the step count changes the values every step."""
    rows = []
    for launch in launches:
        c1, s2 = (graft_bias_corrections(momentum_coef, beta2, launch.step) if graft
                  else (1.0, 1.0))
        rows += (*hyper, c1, s2)
    return TABLES.table(rows, device, dtype=torch.float64).view(len(launches), -1)
