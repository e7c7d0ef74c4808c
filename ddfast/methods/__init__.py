"""Dataset-distillation methods built on ddfast's ops, and the registry the runner reads (SPEC 7).

Registry
--------
``get_method(name)`` returns the method class registered under ``name``; ``available()`` lists the
names; ``register(name, "package.module:Class")`` (or a class) adds one. Built-in entries are
imported lazily, so a method whose module needs something missing fails only when asked for.

Contract (two shapes; a method class has exactly one of ``step`` / ``run``)
--------------------------------------------------------------------------
Both shapes:
  * ``name`` (class attribute, the registry key) and ``kind``: "iterative" or "pipeline".
  * ``default_hparams(dataset, ipc) -> dict`` (classmethod): the reference hyper-parameters scaled
    to ``dataset`` (a ``ddfast.data.Dataset``); every key can be overridden by the caller.

Iterative methods (DC, DSA, DM, CAFE, MTT, TESLA) — ``kind = "iterative"``:
  * ``__init__(dataset, hparams, *, seed, device, model="convnet", addons=())``
  * ``init_synthetic(real, ipc, *, low_rank=None) -> SyntheticSet`` — the learnable synthetic set
    (``SyntheticSet.images()`` is differentiable w.r.t. its parameters; low-rank factors when
    ``low_rank`` is a rank, with the storage-budget rule of ``ddfast.low_rank_budget_ipc``).
  * ``step(iteration, real, syn) -> loss`` — one distillation iteration (including the method's
    own inner loops and optimiser steps, e.g. DC's outer/inner loops); returns the detached scalar
    loss. The runner calls ``init_synthetic`` once, then ``step`` for ``iteration = 0..K-1``.
  * add-ons (``ddfast.methods._common.MIM4DDAddon``) add their term to every loss the method
    back-propagates into the synthetic images (``IterativeMethod.update``).

Pipeline methods (SRe2L family: sre2l, dwa, infer) — ``kind = "pipeline"``:
  * ``run(dataset, ipc, *, hparams, seed, device, progress=True) -> DistillOutput`` — the whole
    pipeline (e.g. squeeze, recover, relabel). ``DistillOutput.labels`` may be soft (float (N, C));
    ``DistillOutput.soft_label_fn`` (callable(augmented_batch) -> probabilities) is handed to
    ``ddfast.evaluate`` for relabel-style evaluation.

Randomness: every draw comes from ``generator(seed, *keys)`` with keys such as
(iteration, class, purpose), so results do not depend on class order or on how classes are split.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, List, Union

from ._common import DistillOutput, IterativeMethod, SyntheticSet, derive_seed, generator

__all__ = ["get_method", "available", "register", "is_pipeline", "IterativeMethod", "SyntheticSet",
           "DistillOutput", "derive_seed", "generator"]

# name -> "module:Class" (imported on first use) or the class itself
_REGISTRY: Dict[str, Union[str, type]] = {
    "dc": "ddfast.methods.dc:DC",
    "dsa": "ddfast.methods.dc:DSA",
    "dm": "ddfast.methods.dm:DM",
    "cafe": "ddfast.methods.cafe:CAFE",
    "mtt": "ddfast.methods.mtt:MTT",
    "tesla": "ddfast.methods.mtt:TESLA",
    "sre2l": "ddfast.methods.sre2l:SRe2L",
    "dwa": "ddfast.methods.dwa:DWA",
    "infer": "ddfast.methods.infer:INFER",
}


def register(name: str, target: Union[str, type]) -> None:
    """Register a method class (or its "module:Class" path) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(target, (str, type)):
        raise TypeError(f"target must be a class or a 'module:Class' string, got {type(target).__name__}")
    _REGISTRY[name.lower()] = target


def _module_exists(path: str) -> bool:
    return importlib.util.find_spec(path.split(":")[0]) is not None


def available() -> List[str]:
    """Registered method names whose module exists (sorted)."""
    return sorted(n for n, t in _REGISTRY.items() if not isinstance(t, str) or _module_exists(t))


def get_method(name: str) -> type:
    """The method class registered under ``name`` (case-insensitive)."""
    key = str(name).lower()
    target = _REGISTRY.get(key)
    if target is None or (isinstance(target, str) and not _module_exists(target)):
        raise ValueError(f"method must be one of {available()}, got {name!r}")
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        target = getattr(importlib.import_module(module), cls)
        _REGISTRY[key] = target
    has_step, has_run = callable(getattr(target, "step", None)), callable(getattr(target, "run", None))
    if has_step == has_run:
        raise TypeError(f"method {name!r} must define exactly one of step() (iterative) or run() (pipeline)")
    return target


def is_pipeline(cls: type) -> bool:
    return callable(getattr(cls, "run", None)) and not callable(getattr(cls, "step", None))
