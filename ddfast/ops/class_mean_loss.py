"""class_mean_loss — DM's distribution-matching loss, CAFE's layer-wise variant (SPEC 3.3).

    loss = Σ_l w_l Σ_c ‖mean(f_real_l[y_real = c]) − mean(f_syn_l[y_syn = c])‖²

over the classes present on both sides (features flattened per sample). This is DM's
``torch.sum((torch.mean(output_real, 0) − torch.mean(output_syn, 0))**2)`` summed over its class
loop. The real side is a constant: its means come from ``class_means`` without a graph. The syn
side is one fused pass (segmented means, difference, squared norm); the backward writes
``2·g_c·(mean_s − mean_r)/n_s`` per synthetic row and keeps only the (C, D) difference.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _backend
from .._checks import (acc_dtype, check_choice, check_float_tensor, check_labels, check_num_classes,
                       check_result_finite, check_same_device, infer_num_classes)
from .class_means import OP as MEANS_OP
from .class_means import class_means_impl

OP = "class_mean_loss"
Features = Union[torch.Tensor, Sequence[torch.Tensor]]


def class_mean_loss_reference(f_real: Features, y_real: torch.Tensor, f_syn: Features, y_syn: torch.Tensor,
                              num_classes: Optional[int] = None, reduction: str = "sum",
                              layer_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """DM's class loop, layer by layer."""
    reals = list(f_real) if isinstance(f_real, (list, tuple)) else [f_real]
    syns = list(f_syn) if isinstance(f_syn, (list, tuple)) else [f_syn]
    weights = [1.0] * len(reals) if layer_weights is None else list(layer_weights)
    if num_classes is None:
        num_classes = infer_num_classes(y_real, y_syn)
    per_class = [torch.zeros((), dtype=syns[0].dtype, device=syns[0].device) for _ in range(num_classes)]
    for fr, fs, w in zip(reals, syns, weights):
        fr = fr.detach().reshape(fr.shape[0], -1)
        fs = fs.reshape(fs.shape[0], -1)
        for c in range(num_classes):
            real_c, syn_c = fr[y_real == c], fs[y_syn == c]
            if len(real_c) and len(syn_c):
                per_class[c] = per_class[c] + w * torch.sum((torch.mean(real_c, dim=0) - torch.mean(syn_c, dim=0)) ** 2)
    out = torch.stack(per_class)
    return out.sum() if reduction == "sum" else out


# --- autograd shared by the Triton and compiled ops (both return (loss_c, diff, count_syn)) -----

def _setup_context(ctx, inputs, output):
    f_syn, y_syn = inputs[0], inputs[1]
    ctx.dtype = f_syn.dtype
    ctx.save_for_backward(y_syn, output[1], output[2])


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, _grad_diff, _grad_count):
        y_syn, diff, count_syn = ctx.saved_tensors
        return bwd_op(grad_loss.contiguous(), y_syn, diff, count_syn, ctx.dtype), None, None, None, None
    return backward


def _fake_fwd(f_syn, y_syn, mean_real, count_real, num_classes):
    acc = acc_dtype(f_syn.dtype)
    return (f_syn.new_empty((num_classes,), dtype=acc), f_syn.new_empty((num_classes, f_syn.shape[1]), dtype=acc),
            y_syn.new_empty((num_classes,)))


def _fake_bwd(grad_loss, y_syn, diff, count_syn, dtype):
    return diff.new_empty((y_syn.shape[0], diff.shape[1]), dtype=dtype)


@torch.library.custom_op("ddfast::class_mean_loss_triton_fwd", mutates_args=())
def _triton_fwd(f_syn: torch.Tensor, y_syn: torch.Tensor, mean_real: torch.Tensor, count_real: torch.Tensor,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.class_mean_loss import class_mean_loss_forward

    return class_mean_loss_forward(f_syn, y_syn, mean_real, count_real, num_classes)


@torch.library.custom_op("ddfast::class_mean_loss_triton_bwd", mutates_args=())
def _triton_bwd(grad_loss: torch.Tensor, y_syn: torch.Tensor, diff: torch.Tensor, count_syn: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    from ..kernels.class_mean_loss import class_mean_loss_backward

    return class_mean_loss_backward(grad_loss, y_syn, diff, count_syn, dtype)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_fwd.register_autograd(_make_backward(_triton_bwd), setup_context=_setup_context)


def _register_compiled():
    """Python side of the C++ ops (csrc/class_mean_loss.cpp), run once after the library loads."""
    torch.library.register_fake("ddfast::class_mean_loss_fwd")(_fake_fwd)
    torch.library.register_fake("ddfast::class_mean_loss_bwd")(_fake_bwd)
    torch.library.register_autograd("ddfast::class_mean_loss_fwd",
                                    _make_backward(torch.ops.ddfast.class_mean_loss_bwd), setup_context=_setup_context)
    torch.library.register_fake("ddfast::class_mean_loss_eager")(lambda *a: _fake_fwd(*a)[0])


_backend.register_op(_backend.OpSpec(OP, cpu_compiled_is_faster=True, on_load=_register_compiled))


# --- eager fast path: the same ops in a plain autograd.Function (see _backend.eager_function) ---

def _eager_forward(ctx, static, f_syn, y_syn, mean_real, count_real):
    fwd, ctx.bwd, num_classes = static
    loss_c, diff, count_syn = fwd(f_syn, y_syn, mean_real, count_real, num_classes)
    ctx.dtype = f_syn.dtype
    ctx.save_for_backward(y_syn, diff, count_syn)
    return loss_c


def _eager_backward(ctx, grad_loss):
    y_syn, diff, count_syn = ctx.saved_tensors
    return ctx.bwd(grad_loss.contiguous(), y_syn, diff, count_syn, ctx.dtype), None, None, None


_Eager = _backend.eager_function("ClassMeanLossEager", _eager_forward, _eager_backward)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, D) contiguous view of per-sample features (no dispatch when it already is one)."""
    if t.dim() != 2:
        t = t.reshape(t.shape[0], -1)
    return t if t.is_contiguous() else t.contiguous()


_MEANS_BACKEND: dict = {}  # (backend, device) -> backend of the real-side class means


def _means_backend(which: str, device: torch.device) -> str:
    key = (which, device)
    got = _MEANS_BACKEND.get(key)
    if got is None:
        got = _MEANS_BACKEND[key] = which if _backend.available(MEANS_OP, which, device) else "torch"
    return got


def _as_layers(name: str, f) -> list:
    if isinstance(f, torch.Tensor):
        return [f]
    if isinstance(f, (list, tuple)) and f:
        return list(f)
    raise TypeError(f"{name} must be a tensor or a non-empty list of per-layer tensors, got {type(f).__name__}")


def class_mean_loss(f_real: Features, y_real: torch.Tensor, f_syn: Features, y_syn: torch.Tensor,
                    num_classes: Optional[int] = None, reduction: str = "sum",
                    layer_weights: Optional[Sequence[float]] = None, *, backend: str = "auto") -> torch.Tensor:
    """``Σ_c ‖mean f_real[c] − mean f_syn[c]‖²`` over classes present on both sides.

    ``f_real``/``f_syn``: (N, ...) features (flattened per row), or equal-length lists of per-layer
    features with optional ``layer_weights``. ``num_classes`` defaults to ``max label + 1``.
    ``reduction="sum"`` → scalar, ``"none"`` → (C,). Gradient flows to ``f_syn`` only.
    """
    reals, syns = _as_layers("f_real", f_real), _as_layers("f_syn", f_syn)
    if len(reals) != len(syns):
        raise ValueError(f"f_real and f_syn must list the same number of layers; got {len(reals)} and {len(syns)}")
    if layer_weights is None:
        weights = [1.0] * len(reals)
    else:
        weights = [float(w) for w in layer_weights]
        if len(weights) != len(reals):
            raise ValueError(f"layer_weights must have one weight per layer ({len(reals)}), got {len(weights)}")
    check_choice("reduction", reduction, ("sum", "none"))
    for i, (fr, fs) in enumerate(zip(reals, syns)):
        check_float_tensor(f"f_real[{i}]" if len(reals) > 1 else "f_real", fr, min_dim=1)
        check_float_tensor(f"f_syn[{i}]" if len(syns) > 1 else "f_syn", fs, min_dim=1)
        if fr.shape[1:] != fs.shape[1:]:
            raise ValueError(f"f_real and f_syn features must match per sample; got {tuple(fr.shape[1:])} "
                             f"and {tuple(fs.shape[1:])} (layer {i})")
        if fr.shape[0] != reals[0].shape[0] or fs.shape[0] != syns[0].shape[0]:
            raise ValueError(f"every layer must hold the same samples; layer {i} has {fr.shape[0]} real and "
                             f"{fs.shape[0]} syn rows")
        check_same_device(f_real=fr, f_syn=fs, y_real=y_real, y_syn=y_syn)
    if num_classes is not None:
        num_classes = check_num_classes(num_classes)
    check_labels("y_real", y_real, reals[0].shape[0], num_classes)
    check_labels("y_syn", y_syn, syns[0].shape[0], num_classes)
    if num_classes is None:
        num_classes = infer_num_classes(y_real, y_syn)
    device = syns[0].device
    which = _backend.resolve(OP, backend, device)
    if which == "torch":
        out = class_mean_loss_reference(reals, y_real, syns, y_syn, num_classes, reduction, weights)
    else:
        means_backend = _means_backend(which, device)
        y_r = y_real if y_real.dtype == torch.int64 and y_real.is_contiguous() else y_real.to(torch.int64).contiguous()
        y_s = y_syn if y_syn.dtype == torch.int64 and y_syn.is_contiguous() else y_syn.to(torch.int64).contiguous()
        fwd, bwd = _backend.op_pair(OP, which)
        eager = _backend.eager_path()  # a plain autograd.Function; torch.compile takes the registered op
        out = None
        for fr, fs, w in zip(reals, syns, weights):
            # the real means are the constant target (detached: no graph); half inputs are averaged in fp32
            fr2 = _rows(fr.detach())
            fr2 = fr2 if fr2.dtype in (torch.float32, torch.float64) else fr2.float()
            mean_r, count_r = class_means_impl(fr2, y_r, num_classes, means_backend)
            fs2 = _rows(fs)
            if eager and which == _backend.COMPILED:  # the C++ autograd op: no Python in the backward
                loss_c = torch.ops.ddfast.class_mean_loss_eager(fs2, y_s, mean_r, count_r, num_classes)
            elif eager:  # Triton: a plain autograd.Function
                loss_c = _Eager.apply((fwd, bwd, num_classes), fs2, y_s, mean_r, count_r)
            else:
                loss_c = fwd(fs2, y_s, mean_r, count_r, num_classes)[0]
            loss_c = loss_c if w == 1.0 else loss_c * w
            out = loss_c if out is None else out + loss_c
        out = out if out.dtype == syns[0].dtype else out.to(syns[0].dtype)
        out = out.sum() if reduction == "sum" else out
    single = len(reals) == 1
    check_result_finite(out, f_real=reals[0] if single else reals, f_syn=syns[0] if single else syns)
    return out
