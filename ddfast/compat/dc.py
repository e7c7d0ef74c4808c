"""Drop-in replacements for VICO-UoE/DatasetCondensation ``utils.py`` (DC, DSA, DM).

    from ddfast.compat.dc import match_loss, distance_wb, DiffAugment, ParamDiffAug

Each function equals the reference numerically (see tests/test_compat_dc*.py).
"""
from __future__ import annotations

import importlib

# topic modules (one per op family); names are re-exported here
_PARTS = ("ddfast.compat._dc_match", "ddfast.compat._dc_dsa", "ddfast.compat._dc_loop", "ddfast.compat._dc_dm")
__all__ = []
for _name in _PARTS:
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as _exc:  # a part not written yet
        if _exc.name != _name:
            raise
        continue
    for _attr in getattr(_mod, "__all__", ()):
        globals()[_attr] = getattr(_mod, _attr)
        __all__.append(_attr)
