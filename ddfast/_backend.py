"""Backend selection, shared by every op.

Backends: ``torch`` (the reference, always there), ``triton`` (Triton kernels; CUDA, or the
CPU interpreter when TRITON_INTERPRET=1), ``cuda``/``cpp`` (the compiled extension: its CUDA
kernel for CUDA tensors, its C++ kernel for CPU tensors; the two names are aliases).

On CUDA, auto takes the compiled kernel, then Triton, then torch — except ops whose Triton
kernel reaches tensor cores through ``tl.dot`` while their CUDA kernel is SIMT (mmd,
supcon_nce: ``cuda_prefers_triton``).

Selection, strongest first: the op's ``backend=`` argument (anything but "auto"),
``ddfast.set_backend()``, the ``DDFAST_BACKEND`` environment variable, then ``auto`` — the
fastest available for the tensor's device. The choice is made in Python before any
autograd.Function/custom op runs, so every backend keeps its gradients.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _extension

BACKENDS = ("auto", "cuda", "cpp", "triton", "torch")
COMPILED = "compiled"  # canonical internal name of the cuda/cpp backend
_default: Optional[str] = None
_warned: set = set()


@dataclass(frozen=True)
class OpSpec:
    """What one op offers: which backends exist and where the C++ CPU kernel is worth using."""

    name: str
    triton: bool = True
    compiled: bool = True
    cpu_compiled_is_faster: bool = False  # measured: auto on CPU uses the C++ kernel only if True
    cuda_prefers_triton: bool = False     # auto on CUDA tries Triton before the compiled kernel
    compiled_cuda: bool = True            # the compiled library has a CUDA kernel (else: CPU only)
    on_load: Optional[Callable[[], None]] = field(default=None, compare=False, hash=False)


_OPS: Dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    _OPS[spec.name] = spec
    _auto_memo.clear()
    _available_memo.clear()
    return spec


def registered_ops() -> Dict[str, OpSpec]:
    return dict(_OPS)


def set_backend(name: Optional[str]) -> None:
    """Default backend for every op (None or "auto" restores automatic choice)."""
    global _default
    if name is not None:
        _canonical(name)
    _default = None if name in (None, "auto") else name


def get_backend() -> str:
    return _default or os.environ.get("DDFAST_BACKEND", "auto") or "auto"


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {BACKENDS}; got {type(name).__name__}")
    key = name.lower()
    if key == COMPILED:
        return COMPILED
    if key not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return COMPILED if key in ("cuda", "cpp") else key


def triton_status(device: torch.device) -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"triton is not importable ({exc})"
    if device.type == "cuda":
        return True, "CUDA"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "interpreter (TRITON_INTERPRET=1)"
        return False, "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter; slow, for tests)"
    return False, f"no Triton support for device type {device.type}"


def compiled_status(op: str, device: torch.device) -> Tuple[bool, str]:
    spec = _OPS.get(op)
    if spec is None or not spec.compiled:
        return False, f"'{op}' has no compiled kernel"
    if device.type not in ("cpu", "cuda"):
        return False, f"no compiled kernel for device type {device.type}"
    if not _extension.load(op, spec.on_load):
        return False, _extension.status().get(op, "unavailable")
    if device.type == "cuda" and not spec.compiled_cuda:
        return False, f"'{op}' has no CUDA kernel (its compiled kernel is CPU-only; Triton runs it on CUDA)"
    if device.type == "cuda" and not _extension.has_cuda_kernel(f"ddfast::{op}_fwd"):
        return False, "the extension was built without CUDA (CPU torch or no nvcc at build time)"
    return True, "CUDA kernel" if device.type == "cuda" else "C++ kernel"


def available(op: str, backend: str, device) -> bool:
    device = torch.device(device)
    key = (op, backend, device.type, device.index, os.environ.get("TRITON_INTERPRET"))
    ok = _available_memo.get(key)
    if ok is None:
        ok = _available_memo[key] = _available_uncached(op, backend, device)
    return ok


_available_memo: Dict[tuple, bool] = {}  # like _auto_memo: availability is fixed once probed


def _available_uncached(op: str, backend: str, device: torch.device) -> bool:
    b = _canonical(backend)
    if b == "torch":
        return True
    if b == "triton":
        return _OPS[op].triton and triton_status(device)[0]
    if b == COMPILED:
        return compiled_status(op, device)[0]
    return True


_auto_memo: Dict[tuple, str] = {}  # (op, device type, index, TRITON_INTERPRET) -> auto's choice


def _auto(op: str, device: torch.device) -> str:
    """The auto choice, memoised: availability does not change within a process once the
    extension is loaded (a failed load stays failed), and this runs on every op call."""
    key = (op, device.type, device.index, os.environ.get("TRITON_INTERPRET"))
    choice = _auto_memo.get(key)
    if choice is None:
        choice = _auto_memo[key] = _auto_uncached(op, device)
    return choice


def _auto_uncached(op: str, device: torch.device) -> str:
    spec = _OPS[op]
    if device.type == "cuda":
        if spec.cuda_prefers_triton and spec.triton and triton_status(device)[0]:
            return "triton"
        if spec.compiled and compiled_status(op, device)[0]:
            return COMPILED
        if spec.triton and triton_status(device)[0]:
            return "triton"
        return "torch"
    if device.type == "cpu" and spec.compiled and spec.cpu_compiled_is_faster and compiled_status(op, device)[0]:
        return COMPILED
    return "torch"


def requested(backend: Optional[str]) -> str:
    """The backend a call asks for: its ``backend=`` argument unless "auto"/None, then the default
    (``set_backend``, ``DDFAST_BACKEND``), "auto" when none is set."""
    return backend if backend not in (None, "auto") else get_backend()


def resolve(op: str, backend: Optional[str], device) -> str:
    """Canonical backend ("torch" | "triton" | "compiled") that runs ``op`` on ``device``.

    An explicitly requested backend that cannot run here warns once and falls back (compiled →
    triton → torch), so a missing compiler never breaks a training script.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    asked = requested(backend)
    if asked == "auto":  # the default, on every op call: straight to the memoised choice
        return _auto(op, device)
    b = _canonical(asked)
    if b == "auto":
        return _auto(op, device)
    spec = _OPS[op]
    if b == "torch":
        return b
    if b == COMPILED:  # the common explicit choice: no Triton probe when the kernel is there
        ok, why = compiled_status(op, device)
        if ok:
            return b
    triton_ok, triton_why = triton_status(device) if spec.triton else (False, f"'{op}' has no Triton kernel")
    if b != COMPILED:
        ok, why = triton_ok, triton_why
    if ok:
        return b
    fallback = "triton" if b == COMPILED and triton_ok else "torch"
    key = (op, b, device.type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"ddfast.{op}: backend '{asked}' is unavailable on {device.type} ({why}); "
                      f"using '{fallback}'", RuntimeWarning, stacklevel=3)
    return fallback


def provider_name(backend: str, device) -> str:
    """Display name of a canonical backend on a device ("cuda" or "cpp" for the compiled one)."""
    if backend == COMPILED:
        return "cuda" if torch.device(device).type == "cuda" else "cpp"
    return backend


def ops_backends(device) -> Dict[str, Dict[str, str]]:
    """op -> backend -> "yes (...)" / "no: reason", for ``ddfast info``."""
    import ddfast

    ddfast.op_modules()
    device = torch.device(device)
    table: Dict[str, Dict[str, str]] = {}
    for name, spec in sorted(_OPS.items()):
        row = {"torch": "yes (reference)"}
        ok, why = triton_status(device) if spec.triton else (False, "no Triton kernel for this op")
        row["triton"] = f"yes ({why})" if ok else f"no: {why}"
        ok, why = compiled_status(name, device)
        row[provider_name(COMPILED, device)] = f"yes ({why})" if ok else f"no: {why}"
        row["auto"] = provider_name(_auto(name, device), device)
        table[name] = row
    return table



# --- lean eager host path ------------------------------------------------------------------------
# ``torch.library.register_autograd`` (kept for torch.compile) flattens every argument with pytree
# and runs Python around the kernel on each eager call: gradient_match with 14 tensor pairs measured
# 367 µs forward+backward on CPU against 135 µs for the same kernel inside a plain
# autograd.Function. Eager calls therefore go through ``eager_function`` classes: a plain
# autograd.Function whose forward/backward call the ops below the Autograd dispatch key (the
# registered autograd is never entered); compiled code keeps calling the registered ops.

def eager_path() -> bool:
    """True outside torch.compile tracing and torch.func transforms (a plain autograd.Function
    without ``setup_context`` cannot run under them): ops may take their ``eager_function`` path."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def eager_function(name: str, forward: Callable, backward: Callable) -> type:
    """A ``torch.autograd.Function`` subclass named ``name`` for the eager path of an op.

    ``forward(ctx, static, *tensors)`` runs the kernels and returns the outputs (it may call
    ``ctx.save_for_backward``, ``ctx.mark_non_differentiable`` and set ctx attributes); ``static`` is
    one non-tensor argument (a tuple of options) passed through. ``backward(ctx, *grads)`` returns
    one gradient (or None) per tensor of ``tensors``. Both run below the Autograd key, so the ops'
    registered autograd is skipped; the backward is once-differentiable (double backward raises).
    Call as ``Cls.apply(static, *tensors)``."""
    from torch.autograd.function import once_differentiable

    def fwd(ctx, static, *tensors):
        with torch._C._AutoDispatchBelowAutograd():
            return forward(ctx, static, *tensors)

    def plain_bwd(ctx, *grads):
        with torch._C._AutoDispatchBelowAutograd():
            return (None,) + tuple(backward(ctx, *grads))

    guarded_bwd = once_differentiable(plain_bwd)

    def bwd(ctx, *grads):
        # create_graph=True: once_differentiable makes a later double backward raise; otherwise
        # (the common case) skip its wrapping
        return guarded_bwd(ctx, *grads) if torch.is_grad_enabled() else plain_bwd(ctx, *grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd),
                                                   "__module__": __name__})


_OP_PAIRS: Dict[Tuple[str, str], tuple] = {}  # (op, backend) -> (fwd, bwd): torch.ops lookups once


def op_pair(op: str, which: str) -> tuple:
    """The registered ``(forward, backward)`` ops of ``op`` for a resolved backend: Triton's
    ``ddfast::<op>_triton_fwd/_bwd`` or the compiled ``ddfast::<op>_fwd/_bwd``."""
    pair = _OP_PAIRS.get((op, which))
    if pair is None:
        infix = "_triton" if which == "triton" else ""
        ns = torch.ops.ddfast
        pair = _OP_PAIRS[(op, which)] = (getattr(ns, f"{op}{infix}_fwd"), getattr(ns, f"{op}{infix}_bwd"))
    return pair


def _registered_forward(ctx, static, *inputs):
    fwd, setup_context, backward = static
    out = fwd(*inputs)
    setup_context(ctx, inputs, out)
    ctx.registered_backward = backward
    return out


def _registered_backward(ctx, *grads):
    return ctx.registered_backward(ctx, *grads)


_RegisteredEager = eager_function("RegisteredOpEager", _registered_forward, _registered_backward)


def call_registered(fwd, setup_context: Callable, backward: Callable, *inputs):
    """``fwd(*inputs)`` for a custom op whose autograd is registered as ``(setup_context, backward)``:
    in eager mode the same two functions run inside a plain autograd.Function (no pytree
    flattening by torch.library per call); under torch.compile the registered op is called."""
    if eager_path():
        return _RegisteredEager.apply((fwd, setup_context, backward), *inputs)
    return fwd(*inputs)
