"""Fused Triton kernels for every block op: the dense linalg batches, the compact-layout phases
and the MBF bucket step (``backend="triton"``).

Importing this package imports Triton. The kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` is set before the import (Triton's interpreter: how CI tests them).
"""

from .ops import (MAX_D, cholesky_ex, cholesky_solve, compact_cholesky_ex, compact_outer_ema_,
                  compact_solve, inv_spd_ex, mbf_bucket_step_, mbf_step_, outer_ema_,
                  solve_spd_ex)

__all__ = ["MAX_D", "cholesky_ex", "cholesky_solve", "solve_spd_ex", "inv_spd_ex", "outer_ema_",
           "compact_outer_ema_", "compact_cholesky_ex", "compact_solve", "mbf_step_",
           "mbf_bucket_step_"]
