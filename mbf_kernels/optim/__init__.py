"""The MBF optimizer (:class:`MBF`), its options, its parameter-to-block rules and a dense
reference."""

from __future__ import annotations

from .fisher import sampled_loss, sampled_targets
from .mbf import MBF
from .options import DEFAULTS, PAPER, PAPER_DAMPING, PAPER_LR, SHARED_BETA, MBFOptions
from .reference import ReferenceMBF

__all__ = ["DEFAULTS", "MBF", "MBFOptions", "PAPER", "PAPER_DAMPING", "PAPER_LR", "ReferenceMBF",
           "SHARED_BETA", "sampled_loss", "sampled_targets"]
