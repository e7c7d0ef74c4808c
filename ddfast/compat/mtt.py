"""Drop-in replacements for GeorgeCazenavette/mtt-distillation (trajectory loss, DiffAugment with align_corners=True)."""
from __future__ import annotations

from ._mtt_dsa import DiffAugment, ParamDiffAug
from ._mtt_loss import trajectory_loss

__all__ = ["trajectory_loss", "DiffAugment", "ParamDiffAug"]
