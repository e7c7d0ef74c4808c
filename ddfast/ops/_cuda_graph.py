"""``cuda_graph=True`` for the matchers: replay a step's kernels from one captured CUDA graph.

A DC or DM step on a GPU is a few milliseconds of many small kernels, so launch overhead matters.
``GraphedStep`` captures ``fn(*tensors)`` — forward and the backward to the inputs that require grad —
with ``torch.cuda.make_graphed_callables`` the first time it sees a key (the caller's static
description: shapes, dtypes, label tensors, parameter storage, module modes) and replays it while the
key repeats; a new key captures again. Everything the step reads besides its tensor arguments (model
parameters, cached label layouts) is read from the same storage at every replay, so in-place
updates (an optimizer step) are seen; replacing a parameter tensor changes the key.

When capture is impossible (CPU tensors, no grad wanted, or capture raising: a host sync or an
unsupported op inside the step) the step runs eagerly, with one warning per reason and matcher; a
key whose capture failed is not tried again (each try costs three warm-up steps).

``make_graphed_callables`` keeps its graphs in a class that only Python's cyclic collector frees,
and a collection that lands inside a capture would destroy an old graph there, which CUDA refuses
("operation not permitted when stream is capturing") and which invalidates the capture
(pytorch/pytorch#161037). So the collector is off during every capture, and a new key collects
first: that frees the old graph and its memory pool, unless the caller still holds one of its
outputs (whose autograd history reaches it).
"""
from __future__ import annotations

import gc
import warnings
from typing import Callable, Hashable, Optional, Sequence

import torch


def check_cuda_graph(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(value).__name__}")
    return value


def module_key(module) -> tuple:
    """What a captured graph of ``module`` depends on besides its inputs: its identity, the storage
    and shape of every parameter and buffer, and every submodule's training flag."""
    if not isinstance(module, torch.nn.Module):
        return (id(module),)
    tensors = [*module.parameters(), *module.buffers()]
    return (id(module), tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors),
            tuple(m.training for m in module.modules()))


def tensor_key(*tensors: torch.Tensor) -> tuple:
    """Shapes, dtypes, devices and gradient flags of a step's tensor arguments."""
    return tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in tensors)


def label_key(*labels: torch.Tensor) -> tuple:
    """Identity and version of label tensors: the matchers cache layouts on both."""
    return tuple((id(y), y._version, tuple(y.shape)) for y in labels)


class GraphedStep:
    """Capture-once, replay-many wrapper of one matcher's step (see the module doc)."""

    def __init__(self, owner: str):
        self.owner = owner
        self.key: Optional[Hashable] = None
        self.graphed: Optional[Callable] = None
        self.captures = 0        # how many graphs were captured (tests, diagnostics)
        self.replays = 0
        self.fallback_reason: Optional[str] = None
        self._warned = set()
        self._failed: dict = {}  # key -> reason, for the keys whose capture raised (a few at most)

    def _eager(self, fn, args, reason: str):
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{self.owner}(cuda_graph=True): {reason}; running the step eagerly", RuntimeWarning,
                          stacklevel=3)
        self.fallback_reason = reason
        return fn(*args)

    def _capture(self, fn, args) -> Optional[str]:
        """Capture ``fn`` on copies of ``args`` into ``self.graphed``; the failure's reason, or None."""
        self.key = None
        if self.graphed is not None:
            self.graphed = None
            gc.collect()  # the old graph dies here (unless its outputs are still held), not inside the capture
        # the graph owns its input buffers: every call copies into them (given the caller's own
        # tensors, a later call would overwrite the first call's inputs in place)
        static = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self.graphed = torch.cuda.make_graphed_callables(fn, static, allow_unused_input=True)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back, said once
            return f"capture failed ({type(exc).__name__}: {exc})"
        finally:
            if was_enabled:
                gc.enable()
        return None

    def __call__(self, fn: Callable, key: Hashable, args: Sequence[torch.Tensor]):
        args = tuple(args)
        if not all(a.is_cuda for a in args):
            return self._eager(fn, args, "CUDA graphs need CUDA tensors")
        if not torch.is_grad_enabled() or not any(a.requires_grad for a in args):
            return self._eager(fn, args, "no input requires grad (the graph holds forward and backward)")
        if key != self.key:
            if key in self._failed:
                return self._eager(fn, args, self._failed[key])
            reason = self._capture(fn, args)
            if reason is not None:
                if len(self._failed) >= 64:  # keys hold storage addresses: keep the memory bounded
                    self._failed.clear()
                self._failed[key] = reason
                return self._eager(fn, args, reason)
            self.key = key
            self.captures += 1
        self.replays += 1
        self.fallback_reason = None
        # the graph's outputs live in its static memory, rewritten by the next replay: hand out a copy
        return self.graphed(*args).clone()
