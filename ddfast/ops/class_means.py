"""class_means — per-class (segmented) means of a batch (SPEC 3.3).

    means[c] = mean(x[labels == c]),  counts[c] = #{i: labels[i] == c}

for any trailing shape (rows are flattened), unordered labels, empty classes (count 0, mean 0).
One pass over ``x`` forward (rows grouped by a stable sort of the labels, fp32/fp64 accumulation);
the backward is one gather pass ``grad_x[i] = grad_means[y_i] / counts[y_i]``.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _backend
from .._checks import (acc_dtype, check_float_tensor, check_labels, check_num_classes, check_result_finite,
                       check_same_device)

OP = "class_means"


def class_means_reference(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """index_add of the rows, divided by the class sizes (empty classes stay 0)."""
    flat = x.reshape(x.shape[0], -1)
    # counts by index_add with the known C (bincount would read max(labels) on the host: a sync)
    counts = labels.new_zeros(num_classes, dtype=torch.int64).index_add_(0, labels, torch.ones_like(labels,
                                                                                                 dtype=torch.int64))
    sums = flat.new_zeros((num_classes, flat.shape[1])).index_add(0, labels, flat)
    means = sums / counts.clamp(min=1).unsqueeze(1).to(flat.dtype)
    return means.reshape((num_classes,) + tuple(x.shape[1:])), counts



# --- autograd shared by the Triton and compiled ops (both return (means, counts)) ------------

def _setup_context(ctx, inputs, output):
    _x, labels, _num_classes = inputs
    ctx.save_for_backward(labels, output[1])


def _make_backward(bwd_op):
    def backward(ctx, grad_means, _grad_counts):
        labels, counts = ctx.saved_tensors
        return bwd_op(grad_means.contiguous(), labels, counts), None, None
    return backward


def _fake_fwd(x, labels, num_classes):
    return x.new_empty((num_classes, x.shape[1])), labels.new_empty((num_classes,))


def _fake_bwd(grad_means, labels, counts):
    return grad_means.new_empty((labels.shape[0], grad_means.shape[1]))


@torch.library.custom_op("ddfast::class_means_triton_fwd", mutates_args=())
def _triton_fwd(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.class_means import segment_means

    return segment_means(x, labels, num_classes)


@torch.library.custom_op("ddfast::class_means_triton_bwd", mutates_args=())
def _triton_bwd(grad_means: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    from ..kernels.class_means import gather_scale

    acc = acc_dtype(grad_means.dtype)
    coef = 1.0 / counts.clamp(min=1).to(acc)
    return gather_scale(grad_means.to(acc), coef, labels, grad_means.dtype)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_fwd.register_autograd(_make_backward(_triton_bwd), setup_context=_setup_context)


def _register_compiled():
    """Python side of the C++ ops (csrc/class_means.cpp), run once after the library loads."""
    torch.library.register_fake("ddfast::class_means_fwd")(_fake_fwd)
    torch.library.register_fake("ddfast::class_means_bwd")(_fake_bwd)
    torch.library.register_autograd("ddfast::class_means_fwd", _make_backward(torch.ops.ddfast.class_means_bwd),
                                    setup_context=_setup_context)
    torch.library.register_fake("ddfast::class_means_eager")(_fake_fwd)


# measured (ddfast bench, 2-core CPU): torch index_add wins on CPU, so auto keeps torch there
_backend.register_op(_backend.OpSpec(OP, cpu_compiled_is_faster=False, on_load=_register_compiled))


# --- eager fast path: the same ops in a plain autograd.Function (see _backend.eager_function) ---

def _eager_forward(ctx, static, x2d, labels):
    fwd, ctx.bwd, num_classes = static
    means, counts = fwd(x2d, labels, num_classes)
    ctx.save_for_backward(labels, counts)
    ctx.mark_non_differentiable(counts)
    return means, counts


def _eager_backward(ctx, grad_means, _grad_counts):
    labels, counts = ctx.saved_tensors
    return ctx.bwd(grad_means.contiguous(), labels, counts), None


_Eager = _backend.eager_function("ClassMeansEager", _eager_forward, _eager_backward)


def class_means_impl(x2d: torch.Tensor, labels: torch.Tensor, num_classes: int, which: str):
    """Dispatch on validated (N, D) contiguous features and int64 labels; returns (means (C, D), counts)."""
    if which == "torch":
        return class_means_reference(x2d, labels, num_classes)
    fwd, bwd = _backend.op_pair(OP, which)
    if not _backend.eager_path():  # torch.compile: the registered op and its traceable autograd
        return fwd(x2d, labels, num_classes)
    if x2d.requires_grad and torch.is_grad_enabled():
        if which == _backend.COMPILED:  # the C++ autograd op: one C++ node, no Python in the backward
            return torch.ops.ddfast.class_means_eager(x2d, labels, num_classes)
        return _Eager.apply((fwd, bwd, num_classes), x2d, labels)  # Triton: a plain autograd.Function
    with torch._C._AutoDispatchBelowAutograd():  # no graph wanted (e.g. class_mean_loss's real side)
        return fwd(x2d, labels, num_classes)


def class_means(x: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class means ``(C, *x.shape[1:])`` (input dtype) and counts ``(C,)`` (int64).

    ``labels``: integer (N,) in ``[0, num_classes)``, any order. Empty classes: mean 0, count 0.
    Gradient flows to ``x``.
    """
    check_float_tensor("x", x, min_dim=1)
    num_classes = check_num_classes(num_classes)
    check_labels("labels", labels, x.shape[0], num_classes)
    check_same_device(x=x, labels=labels)
    which = _backend.resolve(OP, backend, x.device)
    flat = x.dim() == 2 and x.is_contiguous()  # the common (N, D) case: no reshapes
    x2d = x if flat else x.reshape(x.shape[0], -1).contiguous()
    if labels.dtype != torch.int64 or not labels.is_contiguous():
        labels = labels.to(torch.int64).contiguous()
    means, counts = class_means_impl(x2d, labels, num_classes, which)
    check_result_finite(means, x=x)
    return (means if flat else means.reshape((num_classes,) + tuple(x.shape[1:]))), counts
