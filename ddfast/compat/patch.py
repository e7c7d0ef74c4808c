"""Swap ddfast's drop-ins into an imported module of a DD codebase — and into every module that
already bound its functions by name.

DatasetCondensation's ``main.py`` starts with ``from utils import match_loss, DiffAugment, ...``, so
patching ``utils`` afterwards would leave ``main``'s own names pointing at the reference functions.
``patch_dc(utils)`` therefore also rebinds, in every imported module, each global that *is* one of
the replaced objects (identity, not name), and ``unpatch(utils)`` restores them all.

In your copy of the codebase (one line after the imports of ``main.py`` / ``distill.py``)::

    import utils; from ddfast.compat import patch; patch.patch_dc(utils)    # DatasetCondensation
    import utils; from ddfast.compat import patch; patch.patch_mtt(utils)   # mtt-distillation

or, without editing anything, the launcher (imports the script's ``utils``, patches it, then runs the
script as ``__main__`` with its arguments)::

    python -m ddfast.compat.patch dc  main.py --dataset CIFAR10 --ipc 10
    python -m ddfast.compat.patch mtt distill.py --dataset CIFAR10 --ipc 10 --syn_steps 30

Only names the module already has are replaced (a codebase that lacks one keeps its own).
``patch_mtt`` refuses a DatasetCondensation module: the two codebases' DiffAugment differ
(``align_corners`` False vs True), so mixing them would silently change the augmentation.
"""
from __future__ import annotations

import contextlib
import os
import runpy
import sys
import types
from typing import Dict, List

_ORIGINALS = "__ddfast_originals__"
_IMPORTERS = "__ddfast_importers__"
# functions only DatasetCondensation's utils.py defines (mtt-distillation's utils.py dropped them)
_DC_ONLY = ("match_loss", "distance_wb", "get_loops")


def _rebind(module: types.ModuleType, replacements: Dict[str, object]) -> Dict[str, object]:
    originals = getattr(module, _ORIGINALS, {})
    done = {}
    for name, new in replacements.items():
        if name in vars(module):
            originals.setdefault(name, getattr(module, name))
            setattr(module, name, new)
            done[name] = new
    setattr(module, _ORIGINALS, originals)
    return done


def _rebind_importers(module: types.ModuleType, by_identity: Dict[int, object]) -> List[str]:
    """Rebind, in every other imported module, globals that are one of the replaced objects."""
    patched = []
    for name, other in list(sys.modules.items()):
        if other is None or other is module or name.startswith("ddfast") or not isinstance(other, types.ModuleType):
            continue
        try:
            hits = {k: by_identity[id(v)] for k, v in vars(other).items() if id(v) in by_identity}
        except Exception:  # exotic modules whose __dict__ cannot be read
            continue
        if hits:
            _rebind(other, hits)
            patched.append(name)
    return patched


def _patch(module: types.ModuleType, replacements: Dict[str, object]) -> Dict[str, object]:
    if not isinstance(module, types.ModuleType):
        raise TypeError(f"module must be an imported module, got {type(module).__name__}")
    before = dict(getattr(module, _ORIGINALS, {}))
    current = {name: getattr(module, name) for name in replacements if name in vars(module)}
    done = _rebind(module, replacements)
    # only functions and classes are followed into other modules (ids of strings/ints are shared)
    follow = lambda obj: isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type))  # noqa: E731
    by_identity = {id(current[n]): new for n, new in done.items() if current[n] is not new and follow(current[n])}
    by_identity.update({id(before[n]): done[n] for n in done if n in before and follow(before[n])})
    importers = _rebind_importers(module, by_identity) if by_identity else []
    setattr(module, _IMPORTERS, sorted(set(getattr(module, _IMPORTERS, [])) | set(importers)))
    return done


def _public(shim: types.ModuleType) -> Dict[str, object]:
    return {name: getattr(shim, name) for name in shim.__all__}


def patch_dc(module: types.ModuleType) -> Dict[str, object]:
    """Replace DatasetCondensation names (match_loss, distance_wb, DiffAugment, ParamDiffAug, ...) in
    ``module`` and in every imported module that bound them (``from utils import ...``)."""
    from . import dc

    return _patch(module, _public(dc))


def patch_mtt(module: types.ModuleType) -> Dict[str, object]:
    """Replace mtt-distillation names (DiffAugment, ParamDiffAug, trajectory loss) in ``module`` and
    its importers. Refuses a DatasetCondensation module (different DSA convention)."""
    from . import mtt

    if isinstance(module, types.ModuleType):
        dc_names = [n for n in _DC_ONLY if n in vars(module)]
        if dc_names:
            raise ValueError(f"patch_mtt: module {module.__name__!r} looks like DatasetCondensation's utils "
                             f"(defines {', '.join(dc_names)}); its DiffAugment uses align_corners=False while "
                             "mtt-distillation's uses True — use patch_dc for DatasetCondensation")
    return _patch(module, _public(mtt))


def unpatch(module: types.ModuleType) -> None:
    """Restore every name a patch replaced in ``module`` and in the importers patched with it."""
    for name in getattr(module, _IMPORTERS, []):
        other = sys.modules.get(name)
        if other is not None:
            _restore(other)
    _restore(module)
    if hasattr(module, _IMPORTERS):
        delattr(module, _IMPORTERS)


def _restore(module: types.ModuleType) -> None:
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


def launch(codebase: str, script: str, args: List[str], utils_name: str = "utils") -> None:
    """Import ``utils_name`` from the script's directory, patch it, run ``script`` as ``__main__``."""
    if codebase not in ("dc", "mtt"):
        raise ValueError(f"codebase must be 'dc' or 'mtt', got {codebase!r}")
    if not os.path.isfile(script):
        raise FileNotFoundError(f"script not found: {script}")
    folder = os.path.dirname(os.path.abspath(script))
    sys.path.insert(0, folder)
    import importlib

    utils = importlib.import_module(utils_name)
    (patch_dc if codebase == "dc" else patch_mtt)(utils)
    sys.argv = [script] + list(args)
    runpy.run_path(script, run_name="__main__")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) < 2 or argv[0] not in ("dc", "mtt"):
        print("usage: python -m ddfast.compat.patch dc|mtt SCRIPT.py [script arguments...]", file=sys.stderr)
        return 2
    launch(argv[0], argv[1], argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
