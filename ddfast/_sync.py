"""Host-sync counter: what would stall the host on a GPU, counted on any device (CPU CI included).

    from ddfast._sync import count_syncs
    with count_syncs() as syncs:
        loss = ddfast.gradient_match(g_syn, g_real); loss.backward()
    assert syncs.count == 0, syncs.events

Counted (each adds one entry to ``events``):

* data-dependent aten ops, seen by a ``TorchDispatchMode``: ``_local_scalar_dense`` (``.item()``,
  ``int(t)``, ``bool(t)``...), ``nonzero``/``argwhere``/one-argument ``where``, ``unique*``,
  ``bincount``, ``masked_select``, ``repeat_interleave`` without ``output_size``, indexing and
  ``index_put_`` with a boolean mask, ``is_nonzero``, ``equal``;
* copies between devices (``_to_copy``/``copy_``): device to host always, host to device unless it
  is ``non_blocking`` from pinned memory (an asynchronous copy);
* tensors created from Python data (``torch.tensor(...)``/``lift_fresh``): on CUDA a pageable
  host-to-device copy, counted on every device;
* Python-level reads of tensor data: ``.item() .tolist() .cpu() .numpy()`` and ``bool/int/float/
  index`` conversions (``torch.Tensor`` methods patched while the context is open);
* on CUDA additionally every synchronising CUDA call torch itself reports
  (``torch.cuda.set_sync_debug_mode("warn")``), which also sees inside the C++/CUDA kernels.

Not seen on CPU: reads made inside C++ kernels (the dispatch mode sees a custom op as one call);
the C++ launchers are kept sync-free by construction (see the report in the notes).

Reads that ``ddfast._checks`` makes of CPU tensors under ``set_checks("full")`` (the CPU default)
are listed in ``exempt`` and not counted: on CPU they cost no sync, and on CUDA the default policy
("once") does not make them after the first call.

``target``: the device type the measured work runs on. "cpu" (the default): a CPU run standing in
for a GPU one, so every read counts (the tensor read may live on the GPU there), and on a GPU every
read of a CPU tensor counts too (strict). Any other, e.g. "cuda" (what ``ddfast bench`` passes on a
GPU): a read that touches CPU tensors only (an ``.item()`` of a CPU draw, ``torch.tensor`` data)
does not wait for the device; it is listed in ``host_reads`` and not counted.
``events + exempt + host_reads`` is everything seen.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose output shape or value depends on tensor data: the host must wait for the device
_DATA_DEPENDENT = {
    "_local_scalar_dense", "nonzero", "argwhere", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "bincount", "masked_select", "is_nonzero", "equal",
}
_COPY_OPS = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"}
_PY_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

_state = threading.local()


@dataclass
class SyncCount:
    """Result of ``count_syncs``: ``count`` host syncs, ``events`` their names (in order)."""

    events: List[str] = field(default_factory=list)
    exempt: List[str] = field(default_factory=list)
    host_reads: List[str] = field(default_factory=list)
    target: str = "cpu"

    @property
    def count(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        return (f"SyncCount(count={self.count}, events={self.events}, exempt={self.exempt}, "
                f"host_reads={self.host_reads}, target={self.target!r})")


_active: List[SyncCount] = []  # open counters (nested contexts all record)
_lock = threading.Lock()


def _record(name: str, host_only: bool = False) -> None:
    """One read seen; ``host_only``: it touched CPU tensors only (a sync only where they stand for
    device tensors, i.e. for a counter whose target is the CPU)."""
    exempt = getattr(_state, "exempt", 0) > 0
    with _lock:
        for counter in _active:
            if exempt:
                counter.exempt.append(name)
            elif host_only and counter.target != "cpu":
                counter.host_reads.append(name)
            else:
                counter.events.append(name)


@contextlib.contextmanager
def exempt_reads() -> Iterator[None]:
    """Reads inside are listed in ``SyncCount.exempt`` instead of counted (``_checks`` on CPU only)."""
    _state.exempt = getattr(_state, "exempt", 0) + 1
    try:
        yield
    finally:
        _state.exempt -= 1


def counting() -> bool:
    """True while a ``count_syncs`` context is open (lets callers skip bookkeeping otherwise)."""
    return bool(_active)


def _device_of(x):
    return x.device if isinstance(x, torch.Tensor) else None


def _touches_device(args, kwargs) -> bool:
    """Whether any tensor among the call's arguments (nested in lists too) lives off the CPU."""
    stack = list(args) + list(kwargs.values())
    while stack:
        a = stack.pop()
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                return True
        elif isinstance(a, (list, tuple)):
            stack.extend(a)
    return False


def _is_bool_mask(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bool, torch.uint8)


def _classify(func, args, kwargs):
    """The sync event name of one aten call, or None."""
    name = func._schema.name.split("::")[-1]
    if name in _DATA_DEPENDENT:
        return name
    if name == "where" and len(args) == 1 and not kwargs:
        return "where(cond)"
    if name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
            and kwargs.get("output_size") is None:  # tensor repeats: the output length is their sum
        return "repeat_interleave(no output_size)"
    if name in ("index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(_is_bool_mask(i) for i in (indices or ())):
            return f"{name}(bool mask)"
        return None
    if name in ("lift_fresh", "lift_fresh_copy"):
        return "tensor from Python data"
    if name in _COPY_OPS:
        return _copy_event(name, args, kwargs)
    return None


def _copy_event(name, args, kwargs):
    if name == "_to_copy":
        src, dst = args[0].device, kwargs.get("device")
        dst = src if dst is None else torch.device(dst)
        non_blocking = bool(kwargs.get("non_blocking", False))
    else:  # copy_(self=dst, src)
        dst, src = _device_of(args[0]), _device_of(args[1])
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    if src is None or dst is None or src.type == dst.type and src == dst:
        return None
    if src.type == "cpu" and dst.type != "cpu":
        source = args[1] if name != "_to_copy" else args[0]
        if non_blocking and source.is_pinned():
            return None  # asynchronous: the host does not wait
        return f"host->device copy ({name})"
    if dst.type == "cpu" and src.type != "cpu":
        return f"device->host copy ({name})"
    return None


class _SyncMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_state, "in_python_read", 0):  # a patched read already counted itself
            event = _classify(func, args, kwargs)
            if event is not None:  # a copy is between devices (an upload's only tensor is on the CPU)
                copy = func._schema.name.split("::")[-1] in _COPY_OPS
                _record(event, host_only=not copy and not _touches_device(args, kwargs))
        return func(*args, **kwargs)


def _patched(method_name: str, original):
    def read(self, *args, **kwargs):
        if not getattr(_state, "in_python_read", 0):
            _record(f"Tensor.{method_name.strip('_')}()", host_only=self.device.type == "cpu")
        _state.in_python_read = getattr(_state, "in_python_read", 0) + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _state.in_python_read -= 1
    read.__name__ = method_name
    return read


@contextlib.contextmanager
def _patch_tensor_reads() -> Iterator[None]:
    saved = {}
    for method in _PY_READS:
        original = getattr(torch.Tensor, method, None)
        if original is None:
            continue
        saved[method] = torch.Tensor.__dict__.get(method)
        setattr(torch.Tensor, method, _patched(method, original))
    try:
        yield
    finally:
        for method, own in saved.items():
            if own is None:
                delattr(torch.Tensor, method)
            else:
                setattr(torch.Tensor, method, own)


@contextlib.contextmanager
def _cuda_sync_warnings() -> Iterator[None]:
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            _record(f"cuda sync: {str(w.message)[:80]}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def count_syncs(target: str = "cpu") -> Iterator[SyncCount]:
    """Count host syncs (and would-be syncs on CPU) while the block runs; see the module doc.
    ``target``: the device type the work runs on; "cpu" counts reads of CPU tensors too."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a device type string like 'cpu' or 'cuda', got {type(target).__name__}")
    try:
        target = torch.device(target).type
    except RuntimeError as e:
        raise ValueError(f"target must be a device type like 'cpu' or 'cuda', got {target!r}") from e
    counter = SyncCount(target=target)
    first = not _active
    with _lock:
        _active.append(counter)
    try:
        if first:
            with _patch_tensor_reads(), _SyncMode(), _cuda_sync_warnings():
                yield counter
        else:  # nested: the outer context already watches
            yield counter
    finally:
        with _lock:
            _active.remove(counter)
