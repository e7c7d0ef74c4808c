"""norm_relu_pool — DC ConvNet's block after the convolution (DM's real side, the real side of
DC's segmented step).

    y = avg_pool2d(relu(instance_norm(x) · γ + β), 2)        (pool optional)

``instance_norm`` normalises each (sample, channel) plane by its mean and biased variance, as
``nn.GroupNorm(C, C)`` and ``nn.InstanceNorm2d`` without running statistics do. The Triton kernels
(kernels/norm_relu_pool.py) read the input once and write the pooled output, and the backward
reads the input and the output gradient once and writes ``dx``; ATen's modules make about five
full-size passes each way. The fused path gives a gradient to ``x`` (first order); a ``weight``/
``bias`` that requires grad, or a second derivative, takes the reference (module) path.

``embed_plan(embed)`` finds these blocks in an embedding given as an ``nn.Sequential`` (nested
``Sequential`` containers are flattened; any other module is called as it is); ``run_plan`` then
runs the embedding with each block fused where the input fits one kernel program.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch import nn

from .. import _backend
from .._checks import check_float_tensor

OP = "norm_relu_pool"


def norm_relu_pool_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                             eps: float, pool: bool) -> torch.Tensor:
    """The modules' formula: GroupNorm with one group per channel, ReLU, 2×2 average pool."""
    y = F.relu(F.group_norm(x, x.shape[1], weight, bias, eps))
    return F.avg_pool2d(y, 2) if pool else y


_backend.register_op(_backend.OpSpec(OP, compiled=False))


# why the Triton kernels stopped being used in this process (a failed compile or launch), or None
triton_failure: Optional[str] = None


def _kernel_failed(exc: Exception) -> None:
    """Remember the first failure of the Triton kernels and warn once; the reference runs from then
    on (the matchers' default steps use this op, so a kernel that does not build must not stop them)."""
    global triton_failure
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        raise exc
    if triton_failure is None:
        triton_failure = f"{type(exc).__name__}: {exc}"[:300]
        warnings.warn(f"ddfast.norm_relu_pool: the Triton kernel failed ({triton_failure}); using the reference "
                      "from now on", RuntimeWarning, stacklevel=3)


class _NormReluPool(torch.autograd.Function):
    """The Triton forward and its first-order input gradient (γ/β are constants here)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, pool):
        from ..kernels.norm_relu_pool import norm_relu_pool as launch

        ctx.save_for_backward(x, weight, bias)
        ctx.eps, ctx.pool = eps, pool
        return launch(x, weight, bias, eps, pool)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        from ..kernels.norm_relu_pool import norm_relu_pool_backward

        x, weight, bias = ctx.saved_tensors
        if triton_failure is None:
            try:
                return norm_relu_pool_backward(x, weight, bias, ctx.eps, ctx.pool, grad), None, None, None, None
            except Exception as exc:  # noqa: BLE001 - a kernel that does not build: the reference's gradient
                _kernel_failed(exc)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            dx, = torch.autograd.grad(norm_relu_pool_reference(xr, weight, bias, ctx.eps, ctx.pool), xr, grad)
        return dx, None, None, None, None


def norm_relu_pool(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5, pool: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """Instance norm (affine with ``weight``/``bias`` (C,)) → ReLU → 2×2 average pool of an
    (N, C, H, W) ``x``. The Triton path (CUDA, or the interpreter) takes planes of at most 64×64
    (even sides with ``pool``) and differentiates once w.r.t. ``x``; otherwise the reference runs."""
    check_float_tensor("x", x, min_dim=4, allow_empty=True)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together (an affine norm) or both be None")
    if weight is not None and (weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],)):
        raise ValueError(f"weight and bias must be ({x.shape[1]},), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    which = _backend.resolve(OP, backend, x.device)
    affine_grad = torch.is_grad_enabled() and weight is not None and (weight.requires_grad or bias.requires_grad)
    if which == "triton" and not affine_grad and triton_failure is None:
        from ..kernels.norm_relu_pool import fits

        if fits(x, pool):
            w = None if weight is None else weight.detach().contiguous()
            b = None if bias is None else bias.detach().contiguous()
            try:
                return _NormReluPool.apply(x.contiguous(), w, b, float(eps), pool)
            except Exception as exc:  # noqa: BLE001 - a kernel that does not build: warn once, the reference
                _kernel_failed(exc)
    return norm_relu_pool_reference(x, weight, bias, eps, pool)


# --- the embedding plan ------------------------------------------------------------------------

class _FusedBlock:
    """One norm → ReLU (→ 2×2 tile pool) block of the embedding."""

    def __init__(self, norm: nn.Module, modules: Sequence[nn.Module], pool: bool):
        self.norm, self.modules, self.pool = norm, list(modules), pool

    def __call__(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        if x.dim() != 4:  # e.g. an unbatched sample: the modules as they are
            for m in self.modules:
                x = m(x)
            return x
        # maps one program cannot hold (or odd ones before the pool) take the reference: the same math
        return norm_relu_pool(x, self.norm.weight, self.norm.bias, self.norm.eps, self.pool, backend=backend)


class _BiaslessConv:
    """A Conv2d right before a fused instance norm, run without its bias: the norm subtracts each
    (sample, channel) plane's mean, so a per-channel constant added before it cancels exactly, and
    its gradient to x is zero; the bias add was a full pass over the conv output (26 % of the fused
    DM step's kernel time, H100 profile of 2026-11-26). A bias that needs a gradient is kept."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        bias = c.bias if torch.is_grad_enabled() and c.bias.requires_grad else None
        return F.conv2d(x, c.weight, bias, c.stride, c.padding, c.dilation, c.groups)


def _conv_bias_droppable(m) -> bool:
    """A plain zero-padded Conv2d with a bias and no hooks (its output goes to an instance norm)."""
    return (type(m) is nn.Conv2d and m.bias is not None and m.padding_mode == "zeros" and not _hooked(m))


def fusion_available(fuse: bool, backend: str, device: torch.device) -> bool:
    """Whether a matcher with ``fuse_real=fuse`` and ``backend`` runs its norm blocks as
    norm_relu_pool kernels on ``device``: Triton there, and the requested backend (a global
    ``set_backend`` included) "auto" or "triton" (a compiled one keeps the modules, no warning)."""
    return (fuse and _backend.requested(backend) in ("auto", "triton")
            and _backend.resolve(OP, backend, device) == "triton")


def is_instance_norm(m: nn.Module) -> bool:
    """One statistics group per (sample, channel): what norm_relu_pool normalises by."""
    if type(m) is nn.GroupNorm:
        return m.num_groups == m.num_channels
    if type(m) is nn.InstanceNorm2d:
        return not m.track_running_stats
    return False


def _tile_pool_2x2(m: nn.Module) -> bool:
    from ._segmented_grads import tile_kernel

    return type(m) is nn.AvgPool2d and tile_kernel(m) == (2, 2)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None))


def _flat_layers(seq: nn.Sequential) -> Optional[List[nn.Module]]:
    out = []
    for m in seq:
        if type(m) is nn.Sequential:
            if _hooked(m):
                return None
            inner = _flat_layers(m)
            if inner is None:
                return None
            out += inner
        else:
            out.append(m)
    return out


def embed_plan(embed) -> Optional[List[Union[nn.Module, _BiaslessConv, _FusedBlock]]]:
    """The embedding's layers with each instance norm → ReLU (→ 2×2 average pool) block fused (and
    the Conv2d before it run without its bias, ``_BiaslessConv``), or None when ``embed`` is not an
    ``nn.Sequential`` or has nothing to fuse. Blocks with hooks keep their modules (a hook must see
    them run)."""
    if type(embed) is not nn.Sequential or _hooked(embed):
        return None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    layers = _flat_layers(embed)
    if layers is None:
        return None
    plan, i, fused = [], 0, False
    while i < len(layers):
        norm = layers[i]
        act = layers[i + 1] if i + 1 < len(layers) else None
        if is_instance_norm(norm) and type(act) is nn.ReLU and not (_hooked(norm) or _hooked(act)):
            pool = i + 2 < len(layers) and _tile_pool_2x2(layers[i + 2]) and not _hooked(layers[i + 2])
            block = layers[i:i + (3 if pool else 2)]
            if plan and _conv_bias_droppable(plan[-1]):
                plan[-1] = _BiaslessConv(plan[-1])
            plan.append(_FusedBlock(norm, block, pool))
            i += len(block)
            fused = True
        else:
            plan.append(norm)
            i += 1
    return plan if fused else None


def run_plan(plan: Sequence[Union[nn.Module, _BiaslessConv, _FusedBlock]], x: torch.Tensor,
             backend: str = "auto") -> torch.Tensor:
    """The embedding's forward through ``plan`` (the fused blocks differentiate once w.r.t. x)."""
    for step in plan:
        x = step(x, backend) if isinstance(step, _FusedBlock) else step(x)
    return x


def plan_key(embed) -> Tuple:
    """Changes when the embedding's layer structure (or a hook) does: the plan is rebuilt then."""
    mods = list(embed.modules()) if isinstance(embed, nn.Module) else []
    return (id(embed), tuple((id(m), type(m), _hooked(m)) for m in mods))
