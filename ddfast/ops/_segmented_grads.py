"""Per-class parameter gradients of layer-sequence models in one dense pass (GradientMatcher "segmented").

For a model whose samples do not interact (convolutions, linears, per-sample norms, eval-mode
BatchNorm, pointwise activations, pooling), each class's CE-mean gradient is a class-segmented
sum of per-sample terms taken at the same weights. For a layer z = W·in:

    ∇W CE_mean(class c) = Σ_{n∈c} go_n ⊗ in_n,    go_n = ∂L/∂z_n,   L = Σ_c Σ_{n∈c} CE_n / n_c

and go_n is the same whether taken of class c's loss or of the total L, because sample n reaches
only its own term. So all classes take one dense forward, one data-only backward (``autograd.grad``
w.r.t. the layer outputs; ``create_graph`` on the synthetic side, so the result stays differentiable
w.r.t. the images) and one class-grouped reduction per parameter. Unlike ``vmap`` the forward and
the data backward keep dense, shared-weight convolutions; only the weight-gradient reductions are
grouped by class. Samples are laid out class-major (G classes x n slots, short classes padded with
zero images of loss weight 0, whose go is exactly 0).

A model qualifies when its ``torch.fx`` trace is a chain: supported layers (conv, linear, group /
instance / layer norm, eval BatchNorm, activations, pooling, dropout off), pointwise functions and
batch-keeping flattens, each applied to the previous result — ``nn.Sequential`` models and DC's
ConvNet (``features`` then ``view(n, -1)`` then ``classifier``) are the cases in point. A residual add,
a clamp, a constant scale, a buffer read or a layer subclass with its own forward rejects it (the
general path runs instead). The plan is cached per model and re-validated by its structure key on
every call (``plan_for``); a new plan is also compared once with ``model(x)`` on two samples.
"""
from __future__ import annotations

import copy
import math
import operator
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .norm_relu_pool import is_instance_norm

_POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus,
              nn.Hardtanh, nn.Mish, nn.Identity)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# Conv weight gradients: one dense kernel per class from this many samples per class up (each is
# big enough already), below it one class-grouped kernel instead of G tiny launches (and, on the
# synthetic side, instead of G double-backward convolutions per input). The same rule on every
# device, so the bench's CPU op counts are the CUDA launch structure. CPU, one thread: at 64 slots
# the grouped kernel measured slower at every ConvNet-3 layer (10 classes x 64 samples, 3->128
# @32px 175 vs 159 ms, 128->128 @16px 294 vs 272, @8px 76 vs 45); below it, a whole DC step
# measured 47 vs 52 ms (w32, 16 px, 1 synthetic + 8 real per class) and 2.4 vs 2.2 s (w64, 32 px,
# 10 + 32 per class, past the size where CPU "auto" leaves "segmented").
_LOOP_MIN_SLOTS = 64


def conv_weight_grad_per_class(n: int, device: torch.device) -> bool:
    """True: one dense weight-gradient kernel per class; False: one class-grouped kernel."""
    return n >= _LOOP_MIN_SLOTS


class NotSegmentable(Exception):
    """The model cannot take the segmented path; the message says why."""


# --- the steps of an interpreted model -------------------------------------------------------------

def _batched(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Convs and instance norms read an input one rank short as a single unbatched sample; the
    segmented path needs dim 0 to be the batch."""
    want = m._get_no_batch_dim() + 1 if hasattr(m, "_get_no_batch_dim") else m.weight.dim()
    if h.dim() != want:
        raise NotSegmentable(f"{type(m).__name__} on a {h.dim()}-D input (read as unbatched)")
    return h


class _Free:
    """A parameter-free, per-sample layer applied as is. ``kind``: "relu" or "pool2x2" (a 2×2
    disjoint-tile average pool) where the real side may fuse it into a norm block."""
    params: Dict[str, str] = {}

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], kind: Optional[str] = None):
        if getattr(fn, "inplace", False):  # an in-place ReLU would overwrite a recorded layer output
            fn = copy.copy(fn)
            fn.inplace = False
        self.fn, self.kind = fn, kind

    def forward(self, h, p):
        return self.fn(h), None


class _Conv:
    def __init__(self, m, prefix: str):
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise NotSegmentable(f"{prefix or 'conv'}: only groups=1, zero padding given as ints")
        self.m = m
        self.params = {"weight": prefix + "weight"}
        if m.bias is not None:
            self.params["bias"] = prefix + "bias"
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[m.weight.dim() - 2]

    def forward(self, h, p, bias=True):
        m = self.m
        b = p.get("bias") if bias else None
        return self.conv(_batched(m, h), p["weight"], b, m.stride, m.padding, m.dilation), h

    def class_grads(self, h, go, G, n, p, roles):
        m, spatial = self.m, h.dim() - 2
        args = (None, list(m.stride), list(m.padding), list(m.dilation), False, [0] * spatial)
        out = {}
        if "bias" in roles:
            out["bias"] = go.flatten(2).sum(2).unflatten(0, (G, n)).sum(1)
        if "weight" not in roles:
            return out
        if conv_weight_grad_per_class(n, h.device):
            # unbind: one view op per side instead of one slice per class (and one stack, not G
            # slice_backward + adds, in the double backward)
            per_class = zip(go.unflatten(0, (G, n)).unbind(0), h.unflatten(0, (G, n)).unbind(0))
            gw = torch.stack([torch.ops.aten.convolution_backward(go_g, h_g, p["weight"], *args, 1,
                                                                  [False, True, False])[1]
                              for go_g, h_g in per_class])
        else:  # few slots per class: one class-grouped weight gradient instead of G tiny ones; class g's
            # slots become input channels [g*C, (g+1)*C) and output channels [g*O, (g+1)*O)
            hg = h.unflatten(0, (G, n)).transpose(0, 1).flatten(1, 2)
            gg = go.unflatten(0, (G, n)).transpose(0, 1).flatten(1, 2)
            weight = p["weight"].repeat((G,) + (1,) * (spatial + 1))
            gw = torch.ops.aten.convolution_backward(gg, hg, weight, *args, G, [False, True, False])[1]
            gw = gw.unflatten(0, (G, -1))
        out["weight"] = gw
        return out


class _Linear:
    def __init__(self, m, prefix: str):
        self.m = m
        self.params = {"weight": prefix + "weight"}
        if m.bias is not None:
            self.params["bias"] = prefix + "bias"

    def forward(self, h, p):
        return F.linear(h, p["weight"], p.get("bias")), h

    def class_grads(self, h, go, G, n, p, roles):
        gg = go.reshape(G, -1, go.shape[-1])     # (G, n * leading, out)
        out = {}
        if "weight" in roles:
            hg = h.reshape(G, -1, h.shape[-1])   # (G, n * leading, in)
            out["weight"] = torch.bmm(gg.transpose(1, 2), hg)
        if "bias" in roles:
            out["bias"] = gg.sum(1)
        return out


class _AffineNorm:
    """A per-sample normalisation with its affine map z = x̂·γ + β, run fused; x̂ is recomputed from
    the saved input for the per-class γ gradient Σ go·x̂ (cheaper than an unfused affine)."""

    def __init__(self, m, prefix: str, normalize: Callable, trailing: int, groups: Optional[Callable] = None):
        # normalize(h, weight, bias): the fused layer; normalize(h, None, None) gives x̂.
        # groups(h): the statistics groups per sample of a group/instance norm (LayerNorm: its
        # trailing dims; BatchNorm: None, its eval map is pointwise already)
        self.m, self.normalize, self.trailing, self.groups = m, normalize, trailing, groups
        self.instance_norm = is_instance_norm(m)  # the real side may fuse it (norm_relu_pool)
        self.params = {}
        if getattr(m, "weight", None) is not None:
            self.params["weight"] = prefix + "weight"
        if getattr(m, "bias", None) is not None:
            self.params["bias"] = prefix + "bias"

    def forward(self, h, p):
        return self.normalize(h, p.get("weight"), p.get("bias")), h

    def forward_graph(self, h, p):
        """The same layer where the data backward keeps its graph (synthetic side): from var_mean
        and pointwise ops, whose backward and double backward dispatch fewer ops than the fused
        norm's differentiable backward (ConvNet-3 instance norm, fwd + both backwards: about 125
        vs 190 ops per layer)."""
        if self.groups is None and not self.trailing:
            return self.forward(h, p)
        if self.trailing:
            hv = h.reshape(tuple(h.shape[:h.dim() - self.trailing]) + (-1,))
            affine = lambda t: t  # noqa: E731  (γ/β have the normalized shape: they broadcast)
        else:
            hv = h.reshape(h.shape[0], self.groups(h), -1)
            affine = lambda t: t.reshape((-1,) + (1,) * (h.dim() - 2))  # noqa: E731  per channel (dim 1)
        var, mean = torch.var_mean(hv, dim=-1, correction=0, keepdim=True)
        z = ((hv - mean) * torch.rsqrt(var + self.m.eps)).reshape(h.shape)
        weight, bias = p.get("weight"), p.get("bias")
        if weight is not None and bias is not None:
            z = torch.addcmul(affine(bias), z, affine(weight))
        elif weight is not None:
            z = z * affine(weight)
        elif bias is not None:
            z = z + affine(bias)
        return z, h

    def _flat(self, t):
        """(N, P, K): P the parameter's elements, K the positions summed over."""
        if self.trailing:  # LayerNorm: γ/β cover the trailing normalized_shape
            return t.reshape(t.shape[0], -1, math.prod(t.shape[t.dim() - self.trailing:])).transpose(1, 2)
        return t.flatten(2) if t.dim() > 2 else t.unsqueeze(2)  # channel norms: γ/β per channel (dim 1)

    def class_grads(self, h, go, G, n, p, roles):
        out = {}
        if "weight" in roles:
            xhat = self.normalize(h, None, None)
            # Σ over positions of go·x̂ per sample and element, as a batched dot (no N x C x HW product)
            out["weight"] = torch.einsum("npk,npk->np", self._flat(go), self._flat(xhat)).unflatten(0, (G, n)).sum(1)
        if "bias" in roles:
            out["bias"] = self._flat(go).sum(2).unflatten(0, (G, n)).sum(1)
        return {role: g.reshape((G,) + tuple(p[role].shape)) for role, g in out.items()}


def _step_for(m: nn.Module, prefix: str):
    name = prefix.rstrip(".") or type(m).__name__
    if type(m) not in _SUPPORTED:  # exact types: a subclass may change forward (e.g. weight standardisation)
        raise NotSegmentable(f"{name}: unsupported layer {type(m).__name__}")
    if isinstance(m, _CONVS):
        return _Conv(m, prefix)
    if isinstance(m, nn.Linear):
        return _Linear(m, prefix)
    if isinstance(m, nn.GroupNorm):
        return _AffineNorm(m, prefix, lambda h, w, b, m=m: F.group_norm(h, m.num_groups, w, b, m.eps), 0,
                           lambda h, m=m: m.num_groups)
    if isinstance(m, nn.LayerNorm):
        shape = tuple(m.normalized_shape)
        return _AffineNorm(m, prefix, lambda h, w, b, m=m, s=shape: F.layer_norm(h, s, w, b, m.eps), len(shape))
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.training or m.running_mean is None:
            raise NotSegmentable(f"{name}: BatchNorm must be in eval mode with running statistics")
        return _AffineNorm(m, prefix, lambda h, w, b, m=m: F.batch_norm(h, m.running_mean, m.running_var, w, b,
                                                                        False, 0.0, m.eps), 0)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        if m.track_running_stats:
            raise NotSegmentable(f"{name}: InstanceNorm with running statistics")
        return _AffineNorm(m, prefix, lambda h, w, b, m=m: F.instance_norm(_batched(m, h), weight=w, bias=b,
                                                                           eps=m.eps), 0,
                           lambda h, m=m: _batched(m, h).shape[1])
    if isinstance(m, nn.Flatten):
        if m.start_dim < 1:  # 0 merges samples; negative dims depend on the input rank
            raise NotSegmentable(f"{name}: Flatten must start at a dim >= 1")
        return _Free(m)
    if isinstance(m, nn.modules.dropout._DropoutNd):
        if m.training and m.p > 0:
            raise NotSegmentable(f"{name}: active dropout (random per call)")
        return _Free(lambda h: h)
    if isinstance(m, nn.AvgPool2d) and tile_kernel(m) is not None:
        k = tile_kernel(m)
        return _Free(lambda h, m=m, k=k: tile_avg_pool2d(h, k) if tiles_fit(h, k) else m(h),
                     "pool2x2" if k == (2, 2) else None)
    return _Free(m, "relu" if type(m) is nn.ReLU else None)  # the pointwise layers and pools of _SUPPORTED


def tile_kernel(m: nn.AvgPool2d) -> Optional[Tuple[int, int]]:
    """(kh, kw) when ``m`` averages disjoint tiles (kernel = stride, no padding, floor mode, plain
    divisor) of a power-of-two area, else None. Only there is the broadcast division bit-equal to
    ATen's pooling backward: CUDA divides by a scalar as a multiply by its reciprocal, which for a
    tile of 6 is 1 ulp off x / 6 (H200, 2026-11-26); by 2^k the two are the same exact number."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    k, stride, pad = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size), pair(m.padding)
    if k != stride or pad != (0, 0) or m.ceil_mode or m.divisor_override is not None:
        return None
    area = k[0] * k[1]
    return k if area & (area - 1) == 0 else None


def tiles_fit(h: torch.Tensor, k: Tuple[int, int]) -> bool:
    return h.dim() == 4 and h.shape[2] % k[0] == 0 and h.shape[3] % k[1] == 0


class _TileAvgPool2d(torch.autograd.Function):
    """avg_pool2d over disjoint tiles (``tile_kernel``) whose input gradient is the output gradient
    broadcast over each tile ÷ its size (``_TileBroadcast``): one broadcasting elementwise kernel.
    ATen's avg_pool2d_backward (a general window search with integer divisions per element) took
    24.5 % of the segmented DC step's device time on an H200 (2026-11-26, ``bench.profile_case``).
    The two Functions are each other's backward, so the synthetic side's double backward is this
    pooling again, as ATen's is."""

    @staticmethod
    def forward(ctx, x, kernel):
        ctx.kernel = kernel
        return F.avg_pool2d(x, kernel)

    @staticmethod
    def backward(ctx, grad):
        return _TileBroadcast.apply(grad, ctx.kernel), None


class _TileBroadcast(torch.autograd.Function):
    """(N, C, h, w) → (N, C, h·kh, w·kw), each tile holding its value ÷ (kh·kw)."""

    @staticmethod
    def forward(ctx, grad, kernel):
        ctx.kernel = kernel
        (kh, kw), (n, c, h, w) = kernel, grad.shape
        tiles = grad.reshape(n, c, h, 1, w, 1).expand(n, c, h, kh, w, kw)  # views: no kernel
        return torch.div(tiles, kh * kw).reshape(n, c, h * kh, w * kw)

    @staticmethod
    def backward(ctx, grad):
        return _TileAvgPool2d.apply(grad, ctx.kernel), None


def tile_avg_pool2d(x: torch.Tensor, kernel: Tuple[int, int]) -> torch.Tensor:
    """``F.avg_pool2d(x, kernel)`` for an (N, C, H, W) ``x`` with H, W multiples of the kernel."""
    return _TileAvgPool2d.apply(x, tuple(kernel))


_SUPPORTED = frozenset(_POINTWISE + _POOLS + _CONVS + (
    nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d))


# functions and tensor methods a traced forward may apply between layers (pointwise, per sample)
_POINTWISE_CALLS = {
    F.relu: F.relu, torch.relu: F.relu, "relu": F.relu, F.gelu: F.gelu, F.silu: F.silu, F.elu: F.elu,
    torch.tanh: torch.tanh, "tanh": torch.tanh, F.tanh: torch.tanh,
    torch.sigmoid: torch.sigmoid, "sigmoid": torch.sigmoid, F.sigmoid: torch.sigmoid,
    F.leaky_relu: F.leaky_relu,
}


def _is_shape_of_chain(node, chain) -> bool:
    """``h.shape`` or ``h.size(...)`` of a tensor of the chain."""
    return isinstance(node, torch.fx.Node) and bool(node.args) and node.args[0] in chain and (
        (node.op == "call_function" and node.target is getattr and node.args[1] == "shape")
        or (node.op == "call_method" and node.target == "size"))


def _is_batch_size(node, chain) -> bool:
    """``h.size(0)``, ``h.shape[0]`` or ``h.size()[0]`` of a tensor of the chain: the batch size."""
    if not isinstance(node, torch.fx.Node):  # e.g. view(-1, 64): a constant, not the batch size
        return False
    if node.op == "call_method" and node.target == "size" and _is_shape_of_chain(node, chain):
        return tuple(node.args[1:]) == (0,) or node.kwargs == {"dim": 0}
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]  # h.shape or h.size() without a dim
        return _is_shape_of_chain(src, chain) and not (src.op == "call_method" and (len(src.args) > 1 or src.kwargs))
    return False


def _flatten_step(node, current, chain):
    """A flatten that keeps the batch dimension: ``h.flatten(1)``, ``torch.flatten(h, 1)``,
    ``h.view(h.size(0), -1)``, ``h.reshape(h.shape[0], -1)``; None if ``node`` is something else."""
    args, kwargs = node.args, node.kwargs
    if (node.op == "call_method" and node.target == "flatten") or (node.op == "call_function"
                                                                  and node.target is torch.flatten):
        src = args[0] if args else kwargs.get("input", kwargs.get("self"))
        start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
        if src is current and isinstance(start, int) and isinstance(end, int) and start >= 1 \
                and (end == -1 or end >= start):
            return _Free(lambda h, s=start, e=end: h.flatten(s, e))
        return None
    if node.op == "call_method" and node.target in ("view", "reshape") and not kwargs and len(args) == 3:
        if args[0] is current and _is_batch_size(args[1], chain) and args[2] == -1:
            return _Free(lambda h: h.flatten(1))
    return None


def _pointwise_step(node, current):
    fn = _POINTWISE_CALLS.get(node.target) if node.op in ("call_function", "call_method") else None
    if fn is None or not node.args or node.args[0] is not current:
        return None
    extra, kwargs = tuple(node.args[1:]), {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if any(isinstance(a, torch.fx.Node) for a in extra + tuple(kwargs.values())):
        return None
    if fn is F.leaky_relu and len(extra) > 1:  # (negative_slope, inplace)
        extra = extra[:1]
    elif fn is not F.leaky_relu and extra:
        return None
    return _Free(lambda h, fn=fn, a=extra, k=kwargs: fn(h, *a, **k))


class _Plan(list):
    """The steps, plus ``key``: what they were built from (module identities, functions, constants)."""

    def __init__(self):
        super().__init__()
        self.key: List[tuple] = []


def build_plan(model: nn.Module, names: Sequence[str]) -> List:
    """The model as a chain of steps read from its ``torch.fx`` trace, or ``NotSegmentable``.

    The trace makes the check structural: every operation of ``forward`` between the input and the
    logits must be a supported layer, a supported pointwise function or a batch-keeping flatten,
    each applied to the previous result. Anything else (a residual add, a clamp, a constant scale,
    a buffer read, a subclass with its own forward) rejects the model."""
    from torch.nn.modules import module as _module

    if any(getattr(_module, hooks, None) for hooks in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                        "_global_backward_hooks", "_global_backward_pre_hooks")):
        raise NotSegmentable("global module hooks are registered, which the interpreted forward would skip")
    for module_name, m in model.named_modules():
        if "forward" in vars(m):  # set on the instance: eager calls it, the trace and the steps would not
            raise NotSegmentable(f"{module_name or type(m).__name__}: forward replaced on the instance")
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            raise NotSegmentable(f"{module_name or type(m).__name__}: has hooks, which the interpreted forward "
                                 "would skip")
    try:
        graph = torch.fx.Tracer(autowrap_modules=(), autowrap_functions=()).trace(model)  # no math patching: faster
    except Exception as exc:  # data-dependent control flow, unsupported Python: the general path
        raise NotSegmentable(f"torch.fx cannot trace the forward ({type(exc).__name__}: {exc})") from None
    plan, chain, current, seen, placeholders = _Plan(), set(), None, set(), 0
    for node in graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                raise NotSegmentable("forward takes more than one input")
            current = node
            chain.add(node)
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise NotSegmentable("forward does not return the last layer's output")
            break
        if _is_shape_of_chain(node, chain) or _is_batch_size(node, chain):
            continue  # only usable as the batch size of a flatten (checked there)
        if node.op == "call_module" and node.args == (current,) and not node.kwargs:
            m = model.get_submodule(node.target)
            if id(m) in seen:  # its per-class gradient would need both uses summed
                raise NotSegmentable(f"{node.target}: a layer applied twice")
            seen.add(id(m))
            step = _step_for(m, node.target + ".")
            plan.key.append((node.target, id(m)))
        else:
            step = _flatten_step(node, current, chain) or _pointwise_step(node, current)
            if step is None:
                raise NotSegmentable(f"forward is not a chain of supported layers: {node.op} "
                                     f"{getattr(node.target, '__name__', node.target)!r} (custom forward)")
            constants = ([a for a in node.args if not isinstance(a, torch.fx.Node)],
                         {k: v for k, v in node.kwargs.items() if not isinstance(v, torch.fx.Node)})
            plan.key.append((node.op, str(node.target), repr(constants)))
        plan.append(step)
        current = node
        chain.add(node)
    if not any(step.params for step in plan):
        raise NotSegmentable(f"{type(model).__name__} has no layers with parameters")
    owners: Dict[int, str] = {}
    for step in plan:  # one tensor in two layers (tied weights) would need both uses summed
        for full in step.params.values():
            key = id(model.get_parameter(full))
            if key in owners:
                raise NotSegmentable(f"parameter {full} is shared with {owners[key]}")
            owners[key] = full
    covered = {full for step in plan for full in step.params.values()}
    missing = set(names) - covered
    if missing:
        raise NotSegmentable(f"parameters outside supported layers: {sorted(missing)[:3]}")
    return plan


def _params_of(step, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {role: state[full] for role, full in step.params.items()}


def _fused_block(plan, i: int, wanted, h: torch.Tensor) -> Optional[Tuple[int, bool]]:
    """(steps, pool) when plan[i:] starts an instance norm → ReLU (→ 2×2 pool) block that
    ``norm_relu_pool`` can run on ``h``: no parameter of the norm wanted (DC's "ours" skips γ/β)."""
    step = plan[i]
    if not getattr(step, "instance_norm", False) or h.dim() != 4:
        return None
    if wanted is None or any(full in wanted for full in step.params.values()):
        return None
    if i + 1 >= len(plan) or getattr(plan[i + 1], "kind", None) != "relu":
        return None
    from ..kernels.norm_relu_pool import fits

    pool = i + 2 < len(plan) and getattr(plan[i + 2], "kind", None) == "pool2x2"
    return (3, True) if pool and fits(h, True) else ((2, False) if fits(h, False) else None)


def _bias_cancels(plan, i: int, wanted) -> bool:
    """plan[i] is a 2-D conv whose bias nobody wants a gradient of, right before an instance norm:
    the norm subtracts each plane's mean, so the bias cancels (see norm_relu_pool._BiaslessConv)."""
    step = plan[i]
    return (isinstance(step, _Conv) and "bias" in step.params and step.m.weight.dim() == 4
            and wanted is not None and step.params["bias"] not in wanted
            and i + 1 < len(plan) and getattr(plan[i + 1], "instance_norm", False))


def _forward(plan, state, x, wanted=None, graph=False, fuse=False):
    """Interpreted forward; returns logits and, per step with a parameter in ``wanted`` (all steps
    with parameters when None), (step, z, saved, roles). ``graph``: the data backward will keep its
    graph (steps may then pick a form with a cheaper double backward). ``fuse`` (first-order data
    backward only): instance norm → ReLU → 2×2 pool blocks run as ``norm_relu_pool`` kernels, and
    the conv before such a block skips its bias add (``_bias_cancels``)."""
    from .norm_relu_pool import norm_relu_pool

    records = []
    h, i = x, 0
    while i < len(plan):
        step = plan[i]
        block = _fused_block(plan, i, wanted, h) if fuse and not graph else None
        if block is not None:
            p = _params_of(step, state)
            h = norm_relu_pool(h, p.get("weight"), p.get("bias"), step.m.eps, block[1], backend="triton")
            i += block[0]
            continue
        if fuse and not graph and _bias_cancels(plan, i, wanted):
            p = _params_of(step, state)
            h, saved = step.forward(h, p, bias=False)
            if _fused_block(plan, i + 1, wanted, h) is None:  # the norm runs unfused after all
                h = h + p["bias"].view(1, -1, 1, 1)
        else:
            forward = step.forward_graph if graph and hasattr(step, "forward_graph") else step.forward
            h, saved = forward(h, _params_of(step, state))
        roles = [role for role, full in step.params.items() if wanted is None or full in wanted]
        if roles:
            records.append((step, h, saved, roles))
        i += 1
    return h, records


def first_activation_numel(plan, state, x: torch.Tensor) -> int:
    """Elements per sample at the output of the first layer with parameters (one-sample probe,
    remembered on the plan per input shape)."""
    memo = plan.__dict__.setdefault("first_numel", {})
    key = tuple(x.shape[1:])
    if key not in memo:
        memo[key] = _first_activation_numel(plan, state, x)
    return memo[key]


def _first_activation_numel(plan, state, x: torch.Tensor) -> int:
    h = x[:1].detach()
    with torch.no_grad():
        for step in plan:
            h, _ = step.forward(h, _params_of(step, state))
            if step.params:
                break
    return h.numel()


# --- the plan, cached per model -------------------------------------------------------------------

# model -> (key, plan or None, reason): built (FX trace + one numerical check) when the key changes
_plans: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


_PLAIN = (bool, int, float, str, type(None))


def _attribute_key(value):
    if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
        return value
    return ("object", id(value))  # functions, modules, lists...: their identity


def _hook_counts(m: nn.Module) -> tuple:
    return tuple(len(getattr(m, hooks, None) or ()) for hooks in ("_forward_hooks", "_forward_pre_hooks",
                                                                  "_backward_hooks", "_backward_pre_hooks"))


def _global_hook_counts() -> tuple:
    from torch.nn.modules import module as _module

    return tuple(len(getattr(_module, hooks, None) or ()) for hooks in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _signature(model: nn.Module) -> tuple:
    """What the trace and the check depend on besides tensor values: which module objects sit where,
    their types, class forwards and modes, public attributes (plain values by value, anything else
    by identity: a swapped function or instance ``forward`` changes it), hooks, and which parameter
    and buffer tensors they hold."""
    return tuple((name, id(m), type(m), type(m).forward, m.training, _hook_counts(m),
                  tuple(sorted((k, _attribute_key(v)) for k, v in vars(m).items() if not k.startswith("_"))),
                  tuple(id(p) for p in m._parameters.values()), tuple(id(b) for b in m._buffers.values()))
                 for name, m in model.named_modules())


def plan_for(model: nn.Module, names: Sequence[str], state: Dict[str, torch.Tensor], probe: torch.Tensor):
    """The plan for ``model`` as it is now (``NotSegmentable`` when it has none).

    Built once per model and key — the module structure (``_signature``: module objects, types,
    class forwards, modes, public attributes, hooks, parameter tensors), the trainable names, the
    global module hooks and the per-sample input shape, dtype and device — and re-validated on
    each call by recomputing that key (no FX trace: about 1.5 ms saved per call on ConvNet-3).
    A new plan is also checked numerically once: the interpreted forward against ``model(x)`` on a
    copy of two probe samples, a guard against layer attributes the steps would not honour. Not
    seen after the first call: a change to a global function or to an object attribute's contents
    that the forward reads (build a new model, or call ``invalidate_plans()``), and a forward that
    detects tracing and behaves differently under it."""
    key = (_signature(model), tuple(names), _global_hook_counts(), tuple(probe.shape[1:]), probe.dtype, probe.device)
    cached = _plans.get(model)
    if cached is not None and cached[0] == key:
        if cached[1] is None:
            raise NotSegmentable(cached[2])
        return cached[1]
    try:
        plan = _build_and_verify(model, names, state, probe)
    except NotSegmentable as exc:
        _plans[model] = (key, None, str(exc))
        raise
    _plans[model] = (key, plan, None)
    return plan


def invalidate_plans() -> None:
    """Forget every cached plan (the next call traces and checks each model again)."""
    _plans.clear()


def _build_and_verify(model: nn.Module, names, state, probe):
    plan = build_plan(model, names)
    x = probe[:2].detach().clone()  # a copy: an in-place first layer must not write into the caller's tensor
    with torch.no_grad():
        try:
            got, _ = _forward(plan, state, x)
        except Exception as exc:  # e.g. a layer that reads the input as unbatched: the general path
            raise NotSegmentable(f"the interpreted forward fails ({type(exc).__name__}: {exc})") from None
        want = model(x)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        raise NotSegmentable("model(x) is not the layers applied in order")
    scale = want.abs().max().clamp_min(1e-30)
    tol = 1e-9 if want.dtype == torch.float64 else 1e-4
    if not bool(((got - want).abs().max() / scale) <= tol):
        raise NotSegmentable("model(x) differs from the layers applied in order (custom forward)")
    return plan


# --- per-class gradients ---------------------------------------------------------------------------

def class_grads(plan, state: Dict[str, torch.Tensor], names: Sequence[str], x: torch.Tensor, labels: torch.Tensor,
                weight: torch.Tensor, G: int, n: int, create_graph: bool, fuse: bool = False) -> List[torch.Tensor]:
    """Per-class gradients (G, *param.shape) for ``names``; ``x``/``labels``/``weight`` are class-major
    (G*n samples), ``weight`` 1/n_c for real slots and 0 for padding. Layers none of whose parameters
    is in ``names`` are not recorded: no layer-output gradient and no graph for them. ``fuse``
    (without ``create_graph``): norm → ReLU → pool blocks through the Triton ``norm_relu_pool``."""
    if not x.requires_grad:  # a root for the data backward; the engine stops at the layer outputs
        x = x.detach().requires_grad_(True)
    logits, records = _forward(plan, state, x, set(names), graph=create_graph, fuse=fuse)
    if logits.dim() != 2:
        raise ValueError(f"the model must return (batch, classes) logits, got shape {tuple(logits.shape)}")
    loss = (weight * F.cross_entropy(logits, labels, reduction="none")).sum()
    gos = torch.autograd.grad(loss, [z for _, z, _, _ in records], create_graph=create_graph)
    grads: Dict[str, torch.Tensor] = {}
    # without create_graph (the real side) the reductions record no graph: the saved layer inputs
    # require grad (x does), and a graph would keep every chunk's activations alive until the
    # caller detached the result (measured: +1.9 layer-1 activations per real image, 26.6 GB on
    # an H200 at CIFAR-100 ipc 10)
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        for (step, _, saved, roles), go in zip(records, gos):
            for role, g in step.class_grads(saved, go, G, n, _params_of(step, state), roles).items():
                grads[step.params[role]] = g
    return [grads[name] for name in names]


def segment_bounds(G: int, n: int, chunk_images: Optional[int]) -> List[Tuple[int, int]]:
    """Split G classes (n slots each) into consecutive runs of at most ``chunk_images`` slots
    (at least one class per run)."""
    if not chunk_images:
        return [(0, G)]
    per = max(1, chunk_images // max(n, 1))
    return [(i, min(G, i + per)) for i in range(0, G, per)]
