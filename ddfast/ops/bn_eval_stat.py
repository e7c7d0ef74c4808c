"""bn_eval_stat — an eval-mode BatchNorm and SRe2L's statistic loss of its input, in one pass each way.

    y    = (x − running_mean) / sqrt(running_var + eps) · weight + bias      (F.batch_norm, eval mode)
    loss = ‖μ(x) − running_mean‖₂ + ‖σ²_biased(x) − running_var‖₂             (bn_stat_loss)

SRe2L's recover step runs a frozen teacher in eval mode and hooks every BatchNorm2d for the loss,
so each layer reads x once for the BatchNorm and once for the statistics, and backward runs the
BatchNorm's pass, the loss's pass and autograd's sum of the two input gradients (three tensors).
The fused kernels (Triton on CUDA, C++ on CPU) read x once forward (writing y) and x and grad_y
once backward (writing grad_x). ``BNStatMatcher(fuse_batchnorm=True)`` runs the hooked layers
through this op.

Backends: "triton" (the fused kernels; auto on CUDA), the compiled C++ kernels on CPU (auto there),
"torch" the composition (``F.batch_norm`` + ``bn_stat_loss``). The composition also runs every call
the kernels do not take (a weight or bias that needs a gradient, running statistics in another dtype
than the kernels read) and an explicit cuda/cpp backend on CUDA tensors, where no fused CUDA kernel
exists (bn_stat_loss's CUDA kernels then). Gradient to x.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _backend
from .._checks import acc_dtype, check_float_tensor, check_result_finite, check_same_device
from .bn_stat import _checked_layer, _kernel_inputs, bn_stat_loss, bn_stat_loss_reference, check_channel_vector

OP = "bn_eval_stat"


def bn_eval_stat_reference(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                           weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                           eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """The BatchNorm in eval mode, and SRe2L's hook loss of its input."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
    return y, bn_stat_loss_reference(x, running_mean, running_var)


# --- the Triton ops (registered: traceable by torch.compile) ---------------------------------

def _fake_fwd(x, running_mean, running_var, weight, bias, eps):
    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty((), dtype=acc), x.new_empty((c,), dtype=acc),
            x.new_empty((c,), dtype=acc))


def _fake_bwd(grad_y, grad_loss, x, running_mean, running_var, weight, mean, var, eps):
    return torch.empty_like(x)


@torch.library.custom_op("ddfast::bn_eval_stat_triton_fwd", mutates_args=())
def _triton_fwd(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.bn_stat import bn_stat_forward

    y = torch.empty_like(x)
    loss, mean, var = bn_stat_forward(x, running_mean, running_var, y=y, weight=weight, bias=bias, eps=eps)
    return y, loss, mean, var


@torch.library.custom_op("ddfast::bn_eval_stat_triton_bwd", mutates_args=())
def _triton_bwd(grad_y: torch.Tensor, grad_loss: torch.Tensor, x: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                eps: float) -> torch.Tensor:
    from ..kernels.bn_stat import bn_stat_backward

    return bn_stat_backward(grad_loss, x, running_mean, running_var, mean, var, grad_y=grad_y.contiguous(),
                            weight=weight, eps=eps)


def _setup_context(ctx, inputs, output):
    x, rm, rv, w, _b, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, rm, rv, w, output[2], output[3])


def _make_backward(bwd_op):
    def backward(ctx, grad_y, grad_loss, _grad_mean, _grad_var):
        x, rm, rv, w, mean, var = ctx.saved_tensors
        if grad_y is None:  # an output the graph did not use (autograd may pass None)
            grad_y = torch.zeros_like(x)
        if grad_loss is None:
            grad_loss = mean.new_zeros(())
        return bwd_op(grad_y, grad_loss, x, rm, rv, w, mean, var, ctx.eps), None, None, None, None, None
    return backward


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_fwd.register_autograd(_make_backward(_triton_bwd), setup_context=_setup_context)


def _register_compiled():
    """Python side of the C++ CPU ops (csrc/bn_eval_stat.cpp), run once after the library loads."""
    torch.library.register_fake("ddfast::bn_eval_stat_fwd")(_fake_fwd)
    torch.library.register_fake("ddfast::bn_eval_stat_bwd")(_fake_bwd)
    torch.library.register_autograd("ddfast::bn_eval_stat_fwd", _make_backward(torch.ops.ddfast.bn_eval_stat_bwd),
                                    setup_context=_setup_context)
    torch.library.register_fake("ddfast::bn_eval_stat_eager")(lambda *a: _fake_fwd(*a)[:2])


# CPU: the C++ kernels; CUDA: the Triton kernels (the compiled library has no CUDA kernel for this op)
_backend.register_op(_backend.OpSpec(OP, cpu_compiled_is_faster=True, cuda_prefers_triton=True, compiled_cuda=False,
                                     on_load=_register_compiled))


def _fused_backend(backend: str, device: torch.device) -> str:
    """"triton" or "compiled" where the fused kernels run these arguments' device; else "torch"
    (the composition). An explicit cuda/cpp on a CUDA tensor is the composition with bn_stat_loss's
    CUDA kernels: there is no fused CUDA kernel."""
    if _backend.requested(backend) in ("cuda", "cpp") and device.type == "cuda":
        return "torch"
    return _backend.resolve(OP, backend, device)


def _fused_ok(x, running_mean, running_var, weight, bias) -> bool:
    """What the kernels take: float x (N, C, ...) with C > 0; statistics and affine parameters in
    x's dtype (fp32 for half x), none of them needing a gradient."""
    stat_dtype = acc_dtype(x.dtype)
    if x.shape[1] == 0:
        return False
    for t in (running_mean, running_var, weight, bias):
        if t is not None and (t.dtype not in (x.dtype, stat_dtype) or t.requires_grad):
            return False
    return True


def fused_backend_for(x: torch.Tensor, running_mean, running_var, weight, bias,
                      backend: str = "auto") -> Optional[str]:
    """The backend ("triton" or "compiled") whose fused kernels ``bn_eval_stat`` runs for these
    arguments, or None where it runs the composition (which costs what the layer and
    ``bn_stat_loss`` cost apart)."""
    which = _fused_backend(backend, x.device)
    if which == "torch" or x.dim() < 2 or not _fused_ok(x, running_mean, running_var, weight, bias):
        return None
    return which


def _check(x, running_mean, running_var, weight, bias, eps) -> torch.dtype:
    out_dtype = _checked_layer(x, running_mean, running_var)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float_tensor(name, t, min_dim=1)
            check_channel_vector(name, t, x)
            check_same_device(x=x, **{name: t})
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return out_dtype


def bn_eval_stat(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                 weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *,
                 backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps),
    bn_stat_loss(x, running_mean, running_var))``: a BatchNorm layer of a frozen teacher and SRe2L's
    loss of its input, with one read of ``x`` forward and one of ``x`` and ``grad_y`` backward
    (Triton on CUDA, C++ on CPU). ``y`` has x's shape and dtype (contiguous); the loss is a scalar in the promoted dtype
    of ``x`` and the running statistics. Gradients to ``x`` (and, through the composition, to a
    weight or bias that requires one)."""
    out_dtype = _check(x, running_mean, running_var, weight, bias, eps)
    which = _fused_backend(backend, x.device)
    if which == "torch" or not _fused_ok(x, running_mean, running_var, weight, bias):
        sub = backend if which == "torch" else "auto"  # the loss's own choice of kernels
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
        return y, bn_stat_loss(x, running_mean, running_var, backend=sub)
    return fused_layer(x, running_mean, running_var, weight, bias, float(eps), which, out_dtype)


_FUSED_OPS: dict = {}  # backend -> (forward op, its backward): built once


def fused_layer(x, running_mean, running_var, weight, bias, eps: float, which: str, out_dtype: torch.dtype):
    """The fused kernels of ``which`` (from ``fused_backend_for``) on arguments ``bn_eval_stat``
    has checked: BNStatMatcher calls this per layer with its checks done once per layer."""
    ops = _FUSED_OPS.get(which)
    if ops is None:
        if which == "triton":
            fwd, bwd = torch.ops.ddfast.bn_eval_stat_triton_fwd, _triton_bwd
        else:
            fwd, bwd = torch.ops.ddfast.bn_eval_stat_fwd, torch.ops.ddfast.bn_eval_stat_bwd
        ops = _FUSED_OPS[which] = (fwd, _make_backward(bwd))
    x3, rm, rv, w, b = _kernel_inputs(x, running_mean, running_var, weight, bias)
    if which != "triton" and _backend.eager_path():  # one C++ autograd node (csrc/bn_eval_stat.cpp)
        y, loss = torch.ops.ddfast.bn_eval_stat_eager(x3, rm, rv, w, b, eps)
    else:
        y, loss = _backend.call_registered(ops[0], _setup_context, ops[1], x3, rm, rv, w, b, eps)[:2]
    if loss.dtype != out_dtype:
        loss = loss.to(out_dtype)
    check_result_finite(loss, x=x, running_mean=running_mean, running_var=running_var)
    return y.view(x.shape), loss
