"""Host copies of small device tensors (labels, DSA group ids) kept across calls.

DD loops pass the same label tensor at every step. Reading it on the host every step is one host
sync per step, which on a GPU also waits for all the work queued before it. ``host_copy`` reads a
device tensor once and returns the same CPU copy while the tensor is alive and its version counter
unchanged (every in-place write through torch bumps it). Writes that torch does not see (through
``.data`` or a raw pointer) are not noticed: pass a new tensor instead.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict

import torch

# id(tensor) -> (weakref to it, its version when copied, the CPU copy)
_copies: Dict[int, tuple] = {}
CACHE_SIZE = 16


def cached_by_identity(t: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``'s result, computed once per (tensor identity, version); bounded to CACHE_SIZE
    tensors, the least recently used dropped first, and an entry leaves with its tensor."""
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter: nothing to key on
        return make()
    key = id(t)
    entry = _copies.get(key)
    if entry is not None and entry[0]() is t and entry[1] == version:
        _copies[key] = _copies.pop(key)  # most recently used last
        return entry[2]
    value = make()
    if key not in _copies and len(_copies) >= CACHE_SIZE:
        _copies.pop(next(iter(_copies)))
    drop = lambda _ref, k=key: _copies.pop(k, None)  # noqa: E731
    _copies[key] = (weakref.ref(t, drop), version, value)
    return value


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, read from the device once per (tensor, version). Treat it as read-only."""
    if t.device.type == "cpu":
        return t
    return cached_by_identity(t, t.cpu)
