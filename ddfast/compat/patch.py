"""Swap ddfast's drop-ins into an imported module of a DD codebase.

    import utils                      # DatasetCondensation's utils.py
    from ddfast.compat import patch
    patch.patch_dc(utils)             # utils.match_loss, utils.DiffAugment, ... are now ddfast's

    with patch.patched(utils, "dc"):  # or temporarily
        ...

Only names the module already has are replaced (a codebase that lacks one keeps its own), and
the originals are kept so ``unpatch`` restores them.
"""
from __future__ import annotations

import contextlib
import types
from typing import Dict

_ORIGINALS = "__ddfast_originals__"


def _patch(module: types.ModuleType, replacements: Dict[str, object]) -> Dict[str, object]:
    if not isinstance(module, types.ModuleType):
        raise TypeError(f"module must be an imported module, got {type(module).__name__}")
    originals = getattr(module, _ORIGINALS, {})
    done = {}
    for name, new in replacements.items():
        if hasattr(module, name):
            originals.setdefault(name, getattr(module, name))
            setattr(module, name, new)
            done[name] = new
    setattr(module, _ORIGINALS, originals)
    return done


def _public(shim: types.ModuleType) -> Dict[str, object]:
    return {name: getattr(shim, name) for name in shim.__all__}


def patch_dc(module: types.ModuleType) -> Dict[str, object]:
    """Replace DatasetCondensation names (match_loss, distance_wb, DiffAugment, ParamDiffAug, ...) in ``module``."""
    from . import dc

    return _patch(module, _public(dc))


def patch_mtt(module: types.ModuleType) -> Dict[str, object]:
    """Replace mtt-distillation names (DiffAugment, ParamDiffAug, trajectory loss helpers) in ``module``."""
    from . import mtt

    return _patch(module, _public(mtt))


def unpatch(module: types.ModuleType) -> None:
    """Restore every name a patch replaced in ``module``."""
    for name, old in getattr(module, _ORIGINALS, {}).items():
        setattr(module, name, old)
    if hasattr(module, _ORIGINALS):
        delattr(module, _ORIGINALS)


@contextlib.contextmanager
def patched(module: types.ModuleType, codebase: str = "dc"):
    """Context manager: ``codebase`` is "dc" (DatasetCondensation) or "mtt" (mtt-distillation)."""
    if codebase not in ("dc", "mtt"):
        raise ValueError(f"codebase must be 'dc' or 'mtt', got {codebase!r}")
    (patch_dc if codebase == "dc" else patch_mtt)(module)
    try:
        yield module
    finally:
        unpatch(module)
