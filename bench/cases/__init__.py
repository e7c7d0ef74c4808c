"""Every module here contributes ``cases() -> list[Case]``; ``all_cases`` gathers them."""
from __future__ import annotations

import importlib
import pkgutil
import re
import warnings
from typing import List, Optional

from ..case import Case


def all_cases() -> List[Case]:
    found: List[Case] = []
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        try:
            module = importlib.import_module(f"{__name__}.{mod.name}")
            found.extend(module.cases())
        except Exception as exc:  # noqa: BLE001 - one broken case module must not stop the others
            warnings.warn(f"ddfast bench: cases of '{mod.name}' could not be loaded: {type(exc).__name__}: {exc}")
    names = [c.name for c in found]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise RuntimeError(f"duplicate benchmark case names: {sorted(dupes)}")
    return found


def select_cases(device_type: str, full: bool, pattern: Optional[str] = None) -> List[Case]:
    """The cases a run times: those for this device, default ones unless ``full``, matching ``pattern``."""
    return [c for c in all_cases() if device_type in c.devices and (full or c.default)
            and (pattern is None or re.search(pattern, c.name))]
