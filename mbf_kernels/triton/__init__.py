"""Fused Triton kernels for every block op (``backend="triton"``), one module per op family,
each holding its kernels and their host launchers: :mod:`.linalg` (dense (N, d, d) batches),
:mod:`.compact` (the step's phases on the compact layout) and :mod:`.step` (the fused bucket
step); the register-tuple helpers they share are in :mod:`._tuples`, the host-side ones in
:mod:`._common`.

Importing this package imports Triton. The kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` is set before the import (Triton's interpreter: how CI tests them).
"""

from ._common import MAX_D
from .compact import compact_cholesky_ex, compact_outer_ema_, compact_solve
from .linalg import cholesky_ex, cholesky_solve, inv_spd_ex, outer_ema_, solve_spd_ex
from .step import mbf_bucket_step_, mbf_step_, owned_bucket_step_

__all__ = ["MAX_D", "cholesky_ex", "cholesky_solve", "solve_spd_ex", "inv_spd_ex", "outer_ema_",
           "compact_outer_ema_", "compact_cholesky_ex", "compact_solve", "mbf_step_",
           "mbf_bucket_step_", "owned_bucket_step_"]
