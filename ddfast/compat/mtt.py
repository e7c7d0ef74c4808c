"""Drop-in replacements for GeorgeCazenavette/mtt-distillation (trajectory loss, DiffAugment with align_corners=True)."""
from __future__ import annotations

import importlib

_PARTS = ("ddfast.compat._mtt_loss", "ddfast.compat._mtt_dsa")
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
