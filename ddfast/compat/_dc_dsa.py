"""DatasetCondensation's ``DiffAugment`` and ``ParamDiffAug`` (utils.py), drop-in.

Same random draws as the reference (torch's global generators, re-seeded with seed, seed+1, …;
on the input's device), same ``param.Siamese``/``param.latestseed`` side effects, same
results; the ops run in ddfast's fused kernels. DC passes no ``align_corners`` to
affine_grid/grid_sample, which modern torch reads as False.
"""
from __future__ import annotations

from ..ops.dsa import ParamDiffAug, diff_augment

__all__ = ["DiffAugment", "ParamDiffAug"]


def DiffAugment(x, strategy="", seed=-1, param=None, *, backend="auto"):  # noqa: N802 (reference name)
    out = diff_augment(x, strategy, seed, param, align_corners=False, backend=backend)
    if param is not None and strategy not in ("None", "none", ""):
        param.Siamese = seed != -1  # DC's name for mtt's ``batchmode`` flag
    return out
