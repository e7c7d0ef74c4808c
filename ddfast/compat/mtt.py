"""Drop-in replacements for GeorgeCazenavette/mtt-distillation (the inner loop as one call, trajectory
loss, DiffAugment with align_corners=True)."""
from __future__ import annotations

from ._mtt_dsa import DiffAugment, ParamDiffAug
from ._mtt_inner import mtt_inner_loss
from ._mtt_loss import trajectory_loss
from ..ops.trajectory_matcher import TrajectoryMatcher

__all__ = ["mtt_inner_loss", "TrajectoryMatcher", "trajectory_loss", "DiffAugment", "ParamDiffAug"]
