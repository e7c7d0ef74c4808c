"""mtt-distillation's ``DiffAugment`` and ``ParamDiffAug`` (utils.py), drop-in.

Identical to DatasetCondensation's (ddfast.compat._dc_dsa) except that scale and rotate call
affine_grid/grid_sample with ``align_corners=True``.
"""
from __future__ import annotations

from ..ops.dsa import ParamDiffAug, diff_augment

__all__ = ["DiffAugment", "ParamDiffAug"]


def DiffAugment(x, strategy="", seed=-1, param=None, *, backend="auto"):  # noqa: N802 (reference name)
    return diff_augment(x, strategy, seed, param, align_corners=True, backend=backend)
