"""param_match — MTT's trajectory-matching loss (SPEC 3.2).

    loss = ||student − target||² / ||start − target||²

on flat parameter vectors (mtt-distillation ``distill.py`` divides both sums by the parameter
count first, which cancels). One fused pass forward; the backward writes
``2·g·(student − target) / ||start − target||²``. Gradient flows to ``student`` only: ``start``
and ``target`` are points of the expert trajectory (constants) in every backend.
"""
from __future__ import annotations

import torch

from .. import _backend
from .._checks import (acc_dtype, check_float_tensor, check_result_finite, check_same_device, check_same_dtype,
                       check_same_shape)

OP = "param_match"


def param_match_reference(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The formula as MTT computes it (sum of squares, then the ratio)."""
    return ((student - target) ** 2).sum() / ((start - target) ** 2).sum()


# --- autograd shared by the Triton and compiled ops (both return (loss, den)) -----------------

def _setup_context(ctx, inputs, output):
    student, _start, target = inputs
    ctx.save_for_backward(student, target, output[1])


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, _grad_den):
        student, target, den = ctx.saved_tensors
        return bwd_op(grad_loss, student, target, den), None, None
    return backward


def _fake_fwd(student, start, target):
    acc = acc_dtype(student.dtype)
    return student.new_empty(()), student.new_empty((), dtype=acc)


def _fake_bwd(grad, student, target, den):
    return torch.empty_like(student)


# Triton backend, as custom ops so torch.compile traces them without graph breaks.
@torch.library.custom_op("ddfast::param_match_triton_fwd", mutates_args=())
def _triton_fwd(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.param_match import param_match_forward

    return param_match_forward(student, start, target)


@torch.library.custom_op("ddfast::param_match_triton_bwd", mutates_args=())
def _triton_bwd(grad: torch.Tensor, student: torch.Tensor, target: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    from ..kernels.param_match import param_match_backward

    return param_match_backward(grad, student, target, den)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_fwd.register_autograd(_make_backward(_triton_bwd), setup_context=_setup_context)


def _register_compiled():
    """Python side of the C++ ops (csrc/param_match.cpp), run once after the library loads."""
    torch.library.register_fake("ddfast::param_match_fwd")(_fake_fwd)
    torch.library.register_fake("ddfast::param_match_bwd")(_fake_bwd)
    torch.library.register_autograd("ddfast::param_match_fwd", _make_backward(torch.ops.ddfast.param_match_bwd),
                                    setup_context=_setup_context)
    torch.library.register_fake("ddfast::param_match_eager")(lambda s, a, t: _fake_fwd(s, a, t)[0])


_backend.register_op(_backend.OpSpec(OP, cpu_compiled_is_faster=True, on_load=_register_compiled))


# --- eager fast path: the same ops in a plain autograd.Function (see _backend.eager_function) ---

def _eager_forward(ctx, ops, student, start, target):
    fwd, ctx.bwd = ops
    loss, den = fwd(student, start, target)
    ctx.save_for_backward(student, target, den)
    return loss


def _eager_backward(ctx, grad_loss):
    student, target, den = ctx.saved_tensors
    return ctx.bwd(grad_loss, student, target, den), None, None


_Eager = _backend.eager_function("ParamMatchEager", _eager_forward, _eager_backward)


def param_match(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """MTT trajectory loss ``‖student − target‖² / ‖start − target‖²`` (scalar, input dtype).

    Tensors of one shape (flattened), one dtype, one device. Gradient to ``student`` only.
    """
    for name, t in (("student", student), ("start", start), ("target", target)):
        check_float_tensor(name, t)
    check_same_shape("student", student, "start", start)
    check_same_shape("student", student, "target", target)
    check_same_device(student=student, start=start, target=target)
    check_same_dtype(student=student, start=start, target=target)
    which = _backend.resolve(OP, backend, student.device)
    if which == "torch":
        loss = param_match_reference(student, start.detach(), target.detach())
    else:  # the kernels give no gradient to start/target
        flat = [t if t.dim() == 1 and t.is_contiguous() else t.reshape(-1).contiguous()
                for t in (student, start, target)]
        fwd, bwd = _backend.op_pair(OP, which)
        # eager: the C++ autograd op (compiled kernels) or a plain autograd.Function (Triton);
        # under torch.compile / torch.func: the registered op (its autograd is traceable)
        if not _backend.eager_path():
            loss = fwd(*flat)[0]
        elif which == _backend.COMPILED:
            loss = torch.ops.ddfast.param_match_eager(*flat)
        else:
            loss = _Eager.apply((fwd, bwd), *flat)
    check_result_finite(loss, student=student, start=start, target=target)
    return loss
