"""The MBF optimizer (:class:`MBF`), its parameter-to-block rules and a dense reference."""

from __future__ import annotations

from .fisher import sampled_loss, sampled_targets
from .mbf import DEFAULTS, MBF, PAPER, PAPER_DAMPING, PAPER_LR
from .reference import ReferenceMBF

__all__ = ["DEFAULTS", "MBF", "PAPER", "PAPER_DAMPING", "PAPER_LR", "ReferenceMBF", "sampled_loss", "sampled_targets"]
