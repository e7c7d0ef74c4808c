"""Drop-in replacements for VICO-UoE/DatasetCondensation ``utils.py`` (DC, DSA, DM).

    from ddfast.compat.dc import match_loss, distance_wb, DiffAugment, ParamDiffAug

Each function equals the reference numerically (see tests/test_compat_dc*.py).
"""
from __future__ import annotations

# one topic module per op family; their names are re-exported here
from ._dc_dm import DistributionMatcher, dm_class_loop_loss, dm_loss
from ._dc_dsa import DiffAugment, ParamDiffAug
from ._dc_loop import dc_class_loop_loss
from ._dc_match import distance_wb, match_loss

__all__ = ["match_loss", "distance_wb", "DiffAugment", "ParamDiffAug", "dc_class_loop_loss", "dm_loss",
           "DistributionMatcher", "dm_class_loop_loss"]
