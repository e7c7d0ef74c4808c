"""Values computed once per tensor object and version: label bounds, host copies of device labels.

DD loops pass the same label tensor at every step, and reading it on the host every step is one
host sync per step, which on a GPU also waits for all the work queued before it. ``TensorCache``
keeps a value while the tensor is alive and its version counter unchanged (every in-place write
through torch bumps it). Writes that torch does not see (through ``.data`` or a raw pointer) are
not noticed: pass a new tensor instead.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, TypeVar

import torch

T = TypeVar("T")


class TensorCache:
    """``get(t, make)``: ``make()``'s result, computed once per (tensor identity, version); at most
    ``size`` tensors, the least recently used dropped first, and an entry leaves with its tensor."""

    def __init__(self, size: int):
        self.size = size
        self.entries: Dict[int, tuple] = {}  # id(tensor) -> (weakref to it, its version, value)

    def get(self, t: torch.Tensor, make: Callable[[], T]) -> T:
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter: nothing to key on
            return make()
        key, entries = id(t), self.entries
        entry = entries.get(key)
        if entry is not None and entry[0]() is t and entry[1] == version:
            entries[key] = entries.pop(key)  # most recently used last
            return entry[2]
        value = make()
        if key not in entries and len(entries) >= self.size:
            entries.pop(next(iter(entries)))
        entries[key] = (weakref.ref(t, lambda _ref: entries.pop(key, None)), version, value)
        return value


_host_copies = TensorCache(16)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, read from the device once per (tensor, version). Treat it as read-only."""
    if t.device.type == "cpu":
        return t
    return _host_copies.get(t, t.cpu)
