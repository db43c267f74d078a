"""Fused Triton kernels for the optimizer's compact-layout ops (issue 4, in progress).

Importing this package imports Triton. The kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` is set before the import (Triton's interpreter: how CI tests them).
"""

from .ops import (compact_cholesky_ex, compact_outer_ema_, compact_solve, mbf_bucket_step_,
                  mbf_step_)

__all__ = ["compact_outer_ema_", "compact_cholesky_ex", "compact_solve", "mbf_step_",
           "mbf_bucket_step_"]
