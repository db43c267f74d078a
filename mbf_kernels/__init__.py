"""mbf-kernels: fast batched small-SPD kernels and the Mini-Block Fisher (MBF) optimizer.

``mbf_kernels.linalg``   batched Cholesky / solve / inverse / outer-product EMA with backends
``mbf_kernels.packed``   the canonical packed lower-triangle layout of blocks
``mbf_kernels.compact``  the optimizer's compact (tiled) layout and its ops
``mbf_kernels.reference`` the plain-PyTorch oracle every backend is tested against
``mbf_kernels.MBF``       the Mini-Block Fisher optimizer (``MBF.from_model`` for module-aware blocks)
``mbf_kernels.backends()`` what is available on this machine, and why anything is not
"""

from __future__ import annotations

from . import compact, linalg, packed, reference
from .dispatch import BackendStatus, backends
from .optim import MBF

__version__ = "0.1.0"

__all__ = ["MBF", "BackendStatus", "backends", "compact", "linalg", "packed", "reference",
           "__version__"]
