"""bn_stat_loss and BNStatMatcher — SRe2L's BatchNorm statistic matching (SPEC 3.3).

    loss = ‖μ − running_mean‖₂ + ‖σ²_biased − running_var‖₂

over the channels of an N×C×… input (L2 norms, not squared; SRe2L's ``BNFeatureHook``). One read
of ``x`` forward (per-channel mean and M2 merged with Chan's formula in fp32/fp64, or shifted fp64
sums on CPU), one elementwise pass backward. The running statistics are constants (SRe2L reads
``.data``). ``BNStatMatcher`` hooks the BatchNorm2d layers of a model as SRe2L does and sums these
losses, the first layer's scaled by ``first_layer_weight`` (SRe2L/INFER/DWA's
``first_bn_multiplier``); in a recover step its hooks only record the BatchNorm inputs (references,
no copies) and ``loss()`` is one ``bn_stat_loss_sum`` call over every layer: one C++ autograd node
with the compiled kernels, where a hook per layer cost a Python call, a node and two additions each
(``python -m bench.bn_matcher_host``: 134 → 53 µs of host time per BatchNorm on CPU; the bench case
``bn_stat/resnet18-224-b100`` times the whole step).
"""
from __future__ import annotations

import types
import weakref
from typing import List, Optional, Sequence

import torch
from torch import nn

from .. import _backend
from .._checks import acc_dtype, check_choice, check_float_tensor, check_result_finite, check_same_device

OP = "bn_stat"


def bn_stat_loss_reference(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """SRe2L's hook: per-channel mean and biased variance, then two L2 norms."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.mean(1)
    var = flat.var(1, unbiased=False)
    return torch.norm(running_mean - mean, 2) + torch.norm(running_var - var, 2)


# --- autograd shared by the Triton and compiled ops (both return (loss, mean, var)) ------------

def _setup_context(ctx, inputs, output):
    x, rm, rv = inputs
    ctx.save_for_backward(x, rm, rv, output[1], output[2])


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, _grad_mean, _grad_var):
        x, rm, rv, mean, var = ctx.saved_tensors
        return bwd_op(grad_loss, x, rm, rv, mean, var), None, None
    return backward


def _fake_fwd(x, running_mean, running_var):
    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    return x.new_empty((), dtype=acc), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _fake_bwd(grad, x, running_mean, running_var, mean, var):
    return torch.empty_like(x)


@torch.library.custom_op("ddfast::bn_stat_triton_fwd", mutates_args=())
def _triton_fwd(x: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.bn_stat import bn_stat_forward

    return bn_stat_forward(x, running_mean, running_var)


@torch.library.custom_op("ddfast::bn_stat_triton_bwd", mutates_args=())
def _triton_bwd(grad: torch.Tensor, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    from ..kernels.bn_stat import bn_stat_backward

    return bn_stat_backward(grad, x, running_mean, running_var, mean, var)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_fwd.register_autograd(_make_backward(_triton_bwd), setup_context=_setup_context)


def _register_compiled():
    """Python side of the C++ ops (csrc/bn_stat.cpp), run once after the library loads."""
    torch.library.register_fake("ddfast::bn_stat_fwd")(_fake_fwd)
    torch.library.register_fake("ddfast::bn_stat_bwd")(_fake_bwd)
    torch.library.register_autograd("ddfast::bn_stat_fwd", _make_backward(torch.ops.ddfast.bn_stat_bwd),
                                    setup_context=_setup_context)
    torch.library.register_fake("ddfast::bn_stat_eager")(lambda *a: _fake_fwd(*a)[0])


_backend.register_op(_backend.OpSpec(OP, cpu_compiled_is_faster=True, on_load=_register_compiled))


# --- eager fast path: the same ops in a plain autograd.Function (see _backend.eager_function) ---

def _eager_forward(ctx, ops, x, running_mean, running_var):
    fwd, ctx.bwd = ops
    loss, mean, var = fwd(x, running_mean, running_var)
    ctx.save_for_backward(x, running_mean, running_var, mean, var)
    return loss


def _eager_backward(ctx, grad_loss):
    x, rm, rv, mean, var = ctx.saved_tensors
    return ctx.bwd(grad_loss, x, rm, rv, mean, var), None, None


_Eager = _backend.eager_function("BNStatLossEager", _eager_forward, _eager_backward)


def _checked_layer(x, running_mean, running_var, names=("x", "running_mean", "running_var")) -> torch.dtype:
    """One layer's arguments checked (``names`` for the messages); returns the loss's dtype."""
    x_name, mean_name, var_name = names
    check_float_tensor(x_name, x, min_dim=2)
    check_float_tensor(mean_name, running_mean, min_dim=1)
    check_float_tensor(var_name, running_var, min_dim=1)
    for name, t in ((mean_name, running_mean), (var_name, running_var)):
        check_channel_vector(name, t, x, x_name)
    check_same_device(**{x_name: x, mean_name: running_mean, var_name: running_var})
    return torch.promote_types(x.dtype, torch.promote_types(running_mean.dtype, running_var.dtype))


def check_channel_vector(name: str, t: torch.Tensor, x: torch.Tensor, x_name: str = "x") -> None:
    """``t`` is 1-D with one entry per channel (dim 1) of ``x``."""
    c = x.shape[1]
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(f"{name} must be 1-D with one entry per channel of {x_name} ({c}), got shape "
                         f"{tuple(t.shape)}")


def _kernel_inputs(x, *per_channel) -> List[Optional[torch.Tensor]]:
    """What the kernels take: x as (N, C, S), it and the per-channel tensors contiguous (None kept)."""
    x3 = x if x.dim() == 3 else x.reshape(x.shape[0], x.shape[1], -1)
    return [t if t is None or t.is_contiguous() else t.contiguous() for t in (x3, *per_channel)]


def _weighted_sum(terms) -> torch.Tensor:
    """Σ w·loss over (loss, w) pairs in order, multiplying only where w ≠ 1."""
    total = None
    for loss, w in terms:
        term = loss if w == 1.0 else loss * w
        total = term if total is None else total + term
    return total


def bn_stat_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, *,
                 backend: str = "auto") -> torch.Tensor:
    """``‖mean(x) − running_mean‖₂ + ‖var_biased(x) − running_var‖₂`` over the channels (dim 1) of
    ``x`` (N, C, ...). Scalar in the promoted dtype of ``x`` and the running stats; gradient to ``x``."""
    out_dtype = _checked_layer(x, running_mean, running_var)
    which = _backend.resolve(OP, backend, x.device)
    if which == "torch":
        loss = bn_stat_loss_reference(x, running_mean.detach(), running_var.detach())
    else:  # the kernels give no gradient to the running statistics
        stats = _kernel_inputs(x, running_mean, running_var)
        fwd, bwd = _backend.op_pair(OP, which)
        # eager: the C++ autograd op (compiled kernels) or a plain autograd.Function (Triton);
        # under torch.compile / torch.func: the registered op (its autograd is traceable)
        if not _backend.eager_path():
            loss = fwd(*stats)[0]
        elif which == _backend.COMPILED:
            loss = torch.ops.ddfast.bn_stat_eager(*stats)
        else:
            loss = _Eager.apply((fwd, bwd), *stats)
    if loss.dtype != out_dtype:
        loss = loss.to(out_dtype)
    check_result_finite(loss, x=x, running_mean=running_mean, running_var=running_var)
    return loss


# --- many layers at once: BNStatMatcher's loss as one call ----------------------------------

def _sum_eager_forward(ctx, static, *tensors):
    fwd, ctx.bwd, weights = static
    k = len(weights)
    ctx.weights = weights
    losses, saved = [], []
    for x, rm, rv in zip(tensors[:k], tensors[k:2 * k], tensors[2 * k:]):
        loss, mean, var = fwd(x, rm, rv)
        losses.append(loss)
        saved += [x, rm, rv, mean, var]
    ctx.save_for_backward(*saved)
    return _weighted_sum(zip(losses, weights))


def _sum_eager_backward(ctx, grad):
    s = ctx.saved_tensors
    grads = [ctx.bwd(grad if w == 1.0 else grad * w, *s[5 * i:5 * i + 5]) for i, w in enumerate(ctx.weights)]
    return grads + [None] * (2 * len(grads))


_SumEager = _backend.eager_function("BNStatLossSumEager", _sum_eager_forward, _sum_eager_backward)


def _check_layers(xs, running_means, running_vars, weights) -> List[float]:
    for name, seq in (("xs", xs), ("running_means", running_means), ("running_vars", running_vars)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors (one per layer), got {type(seq).__name__}")
    if not xs:
        raise ValueError("xs is empty: expected one input tensor per BatchNorm layer")
    if weights is None:
        weights = [1.0] * len(xs)
    elif isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of floats (one per layer) or None, got {type(weights).__name__}")
    if not len(xs) == len(running_means) == len(running_vars) == len(weights):
        raise ValueError(f"xs, running_means, running_vars and weights need one entry per layer; got {len(xs)}, "
                         f"{len(running_means)}, {len(running_vars)} and {len(weights)}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"weights[{i}] must be a float, got {type(w).__name__}")
        out.append(float(w))
    return out


def bn_stat_loss_sum(xs: Sequence[torch.Tensor], running_means: Sequence[torch.Tensor],
                     running_vars: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None, *,
                     backend: str = "auto") -> torch.Tensor:
    """``Σ_l weights[l] · bn_stat_loss(xs[l], running_means[l], running_vars[l])``, summed in layer
    order: SRe2L's loss over a model's BatchNorms in one call (``BNStatMatcher.loss`` uses it).

    With the compiled kernels the layers run in a C++ loop under one autograd node, so L layers
    cost one Python call instead of L calls and 2L additions. ``weights`` default to 1. Each layer is
    checked as ``bn_stat_loss`` checks it; all on one device. Scalar in the promoted dtype of every
    input; gradients to ``xs``."""
    weights = _check_layers(xs, running_means, running_vars, weights)
    out_dtype = None
    for i, (x, rm, rv) in enumerate(zip(xs, running_means, running_vars)):
        dtype = _checked_layer(x, rm, rv, (f"xs[{i}]", f"running_means[{i}]", f"running_vars[{i}]"))
        out_dtype = dtype if out_dtype is None else torch.promote_types(out_dtype, dtype)
        if x.device != xs[0].device:
            raise ValueError(f"all layers must be on one device; layer {i} is on {x.device}, layer 0 on {xs[0].device}")
    which = _backend.resolve(OP, backend, xs[0].device)
    if which == "torch" or not _backend.eager_path():  # the reference, or per-layer registered ops (traceable)
        return _weighted_sum((bn_stat_loss(x, rm, rv, backend=backend).to(out_dtype), w)
                             for x, rm, rv, w in zip(xs, running_means, running_vars, weights))
    x3s, rms, rvs = (list(col) for col in zip(*map(_kernel_inputs, xs, running_means, running_vars)))
    if which == _backend.COMPILED:
        loss = torch.ops.ddfast.bn_stat_sum_eager(x3s, rms, rvs, weights)
    else:
        fwd, bwd = _backend.op_pair(OP, which)
        loss = _SumEager.apply((fwd, bwd, weights), *x3s, *rms, *rvs)
    if loss.dtype != out_dtype:
        loss = loss.to(out_dtype)
    check_result_finite(loss, xs=xs, running_means=running_means, running_vars=running_vars)
    return loss


LAYER_KINDS = ("bn2d", "all")
FIRST_LAYER_RULES = ("modules", "executed")
REPEAT_RULES = ("last", "sum")


class BNStatMatcher:
    """SRe2L's BatchNorm statistic loss over a model, by forward hooks.

        matcher = BNStatMatcher(teacher, first_layer_weight=args.first_bn_multiplier)
        out = teacher(x_syn)          # every forward of the model starts afresh
        loss = ce(out, y) + r_bn * matcher.loss()

    ``matcher(x)`` runs the model and returns ``(output, loss)``. ``remove()`` (or leaving a
    ``with`` block) detaches the hooks. Losses use the running statistics at hook time (SRe2L runs
    the teacher in eval mode, where they do not change).

    The defaults are SRe2L's ``BNFeatureHook`` semantics (recover/data_synthesis.py):
    ``layers="bn2d"`` hooks the ``nn.BatchNorm2d`` modules (with running statistics) only, "all"
    every BatchNorm (1d/2d/3d, SyncBatchNorm); ``first_layer="modules"`` gives
    ``first_layer_weight`` to the first hooked layer in ``model.modules()`` order, "executed" to the
    first one the forward runs; ``repeated_calls="last"`` keeps the loss of a layer's last call in
    the forward (each SRe2L hook overwrites its ``r_feature``), "sum" adds every call. The sum runs
    over the layers in ``model.modules()`` order ("executed": in call order); a layer the forward
    does not run adds nothing (SRe2L would reuse its value from an earlier forward).

    Where the hooked input requires grad (a recover step), a hook only records it and ``loss()``
    computes every layer in one ``bn_stat_loss_sum`` call (one autograd node, no Python per layer);
    modifying a recorded input in place before ``loss()`` raises there, as autograd would at
    backward. Otherwise (no_grad, or an input without grad) the hook computes its loss at once, so
    no activation is kept. ``losses`` computes the per-call losses when read.

    ``fuse_batchnorm=True`` runs each hooked ``nn.BatchNorm2d`` that is in eval mode (a frozen
    teacher, as SRe2L runs it) through ``ddfast.bn_eval_stat`` where it takes the fused kernels
    (Triton on CUDA, C++ on CPU): the layer's output and its loss in one read of the input, and one
    backward pass instead of three. Other layers and calls (train mode, a weight or bias that needs
    a gradient, backend "torch") run as without it. The layers' ``forward`` is replaced by an
    instance attribute until ``remove()``.
    """

    def __init__(self, model: nn.Module, first_layer_weight: float = 1.0, *, layers: str = "bn2d",
                 first_layer: str = "modules", repeated_calls: str = "last", backend: str = "auto",
                 fuse_batchnorm: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_choice("layers", layers, LAYER_KINDS)
        self.first_layer = check_choice("first_layer", first_layer, FIRST_LAYER_RULES)
        self.repeated_calls = check_choice("repeated_calls", repeated_calls, REPEAT_RULES)
        self.model = model
        self.first_layer_weight = float(first_layer_weight)
        self.backend = backend
        kind = nn.BatchNorm2d if layers == "bn2d" else nn.modules.batchnorm._BatchNorm
        self.layers = [m for m in model.modules() if isinstance(m, kind) and m.running_mean is not None]
        if not self.layers:
            raise ValueError(f"model has no {'BatchNorm2d' if layers == 'bn2d' else 'BatchNorm'} layer with running "
                             "statistics to match")
        # per hooked call of the last forward, in call order: (layer index, loss) or, deferred,
        # (layer index, _Recorded)
        if not isinstance(fuse_batchnorm, bool):
            raise TypeError(f"fuse_batchnorm must be a bool, got {type(fuse_batchnorm).__name__}")
        self.calls: List[tuple] = []
        self._handles = [model.register_forward_pre_hook(self._start)]
        self._handles += [m.register_forward_hook(self._hook_for(i)) for i, m in enumerate(self.layers)]
        self._fused_loss = None  # (layer, loss) of the fused forward that just ran, for that layer's hook
        self._fused_layers = self._fuse_layers() if fuse_batchnorm else []

    def _fuse_layers(self) -> List[nn.Module]:
        """Replace the forward of the hooked plain BatchNorm2d layers (see ``_fused_forward``)."""
        plain = nn.modules.batchnorm._BatchNorm.forward
        layers = [m for m in self.layers
                  if isinstance(m, nn.BatchNorm2d) and type(m).forward is plain and "forward" not in vars(m)]
        for m in layers:
            m.forward = self._fused_forward(m)
        return layers

    @property
    def losses(self) -> List[torch.Tensor]:
        """The losses of every hooked call of the last forward, in call order."""
        return [self._value(entry) for _, entry in self.calls]

    def _start(self, _module, _inputs) -> None:
        self.calls = []

    def _fused_forward(self, module: nn.Module):
        """``module.forward`` while fused: a method bound to the module, so a deep copy of the model
        binds it to the copy (and, like the hooks, reports to this matcher)."""
        from .bn_eval_stat import fused_layer

        def forward(layer, x):
            plan = _fusion_plan(layer, x, self.backend) if isinstance(x, torch.Tensor) else None
            if plan is None:
                return type(layer).forward(layer, x)
            y, loss = fused_layer(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps, *plan)
            self._fused_loss = (layer, loss)
            return y
        return types.MethodType(forward, module)

    def _hook_for(self, index: int):
        def hook(module, inputs, _output) -> None:
            pending, self._fused_loss = self._fused_loss, None
            if pending is not None and pending[0] is module:  # this layer's fused forward computed its loss
                self.calls.append((index, pending[1]))
                return
            # (a fused forward called without its hooks, layer.forward(x), is not counted: nor would
            # SRe2L's hooks count it)
            x = inputs[0]
            if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
                # train mode moves the running statistics at every call: keep this call's
                rm, rv = module.running_mean, module.running_var
                if module.training:
                    rm, rv = rm.detach().clone(), rv.detach().clone()
                self.calls.append((index, _Recorded(x, rm, rv, x._version)))
            else:
                self.calls.append((index, bn_stat_loss(x, module.running_mean, module.running_var,
                                                       backend=self.backend)))
        return hook

    def _value(self, entry) -> torch.Tensor:
        if isinstance(entry, _Recorded):
            entry.check_unmodified()
            return bn_stat_loss(entry.x, entry.running_mean, entry.running_var, backend=self.backend)
        return entry

    def _per_layer(self) -> List[tuple]:
        """(layer index, [entries]) of each called layer after the repeated-call rule, in summation order."""
        kept = {}
        for index, entry in self.calls:
            if index in kept and self.repeated_calls == "sum":
                kept[index].append(entry)
            else:
                kept[index] = [entry]
        if self.first_layer == "executed":  # call order of each layer's first call
            order = list(dict.fromkeys(index for index, _ in self.calls))
        else:
            order = sorted(kept)
        return [(index, kept[index]) for index in order]

    def loss(self) -> torch.Tensor:
        """Σ of the layers' losses of the last forward, the first layer's times ``first_layer_weight``."""
        if not self.calls:
            raise RuntimeError("BNStatMatcher.loss() needs a forward pass of the model (running a hooked layer) first")
        per_layer = self._per_layer()
        first = per_layer[0][0] if self.first_layer == "executed" else 0
        recorded, computed = [], []
        for index, entries in per_layer:
            weight = self.first_layer_weight if index == first else 1.0
            for entry in entries:
                (recorded if isinstance(entry, _Recorded) else computed).append((entry, weight))
        if recorded:
            for entry, _ in recorded:
                entry.check_unmodified()
            computed.insert(0, (bn_stat_loss_sum([e.x for e, _ in recorded], [e.running_mean for e, _ in recorded],
                                                 [e.running_var for e, _ in recorded], [w for _, w in recorded],
                                                 backend=self.backend), 1.0))
        return _weighted_sum(computed)

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        return out, self.loss()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self._fused_layers:
            vars(m).pop("forward", None)
        self._fused_layers = []

    def __enter__(self) -> "BNStatMatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# per BatchNorm module: {what decides its fusion: (backend, loss dtype) or None}; kept across
# matchers (a recover loop may build one per step) and dropped with the module
_FUSION_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _fusion_plan(module: nn.Module, x: torch.Tensor, backend: str):
    """How BNStatMatcher(fuse_batchnorm=True) runs this call of ``module``: (backend, loss dtype)
    for ``bn_eval_stat``'s fused kernels, or None for the layer's own forward (train mode, not 4-D,
    a weight or bias that needs a gradient, no fused kernel here)."""
    weight, bias, rm = module.weight, module.bias, module.running_mean
    key = (x.dtype, x.device, x.dim(), module.training, rm.dtype, _backend.requested(backend),
           weight is not None and weight.requires_grad, bias is not None and bias.requires_grad)
    plans = _FUSION_PLANS.setdefault(module, {})
    if key not in plans:
        from .bn_eval_stat import _check, fused_backend_for

        plan = None
        if not module.training and x.dim() == 4:
            which = fused_backend_for(x, rm, module.running_var, weight, bias, backend)
            if which is not None:
                plan = (which, _check(x, rm, module.running_var, weight, bias, module.eps))
        plans[key] = plan
    return plans[key]


class _Recorded:
    """A hooked BatchNorm input kept for BNStatMatcher.loss() (and the statistics it is matched to)."""

    __slots__ = ("x", "running_mean", "running_var", "version")

    def __init__(self, x, running_mean, running_var, version):
        self.x, self.running_mean, self.running_var, self.version = x, running_mean, running_var, version

    def check_unmodified(self) -> None:
        if self.x._version != self.version:
            raise RuntimeError("BNStatMatcher: a hooked BatchNorm input was modified in place after the forward "
                               "recorded it, so its statistics can no longer be computed (autograd would raise at "
                               "backward too); avoid in-place ops on BatchNorm inputs, or call loss() first")
