"""TrajectoryMatcher — mtt-distillation's inner loop with the exact gradient at constant memory (SPEC 3.2).

One call is one ``distill.py`` iteration: the student starts at θ_0 (``start_params``) and takes
``syn_steps`` SGD steps on minibatches of the synthetic set,

    θ_{i+1} = θ_i − α·g_i,   g_i = ∇θ CE_mean(model_θi(DSA(X[idx_i])), y[idx_i]),

and the loss is ``param_match(θ_N, θ_0, θ*) = ‖θ_N − θ*‖² / ‖θ_0 − θ*‖²``. Gradients flow to the
images X, the learning rate α and, when they are float (N, C) soft labels (DATM), the labels.

Modes (same forward values; they differ in how the gradient is obtained):
- ``"unrolled"``: distill.py as written — ``create_graph=True`` through every step; the reference;
  memory grows linearly with the steps.
- ``"exact"``: the same gradient from a reverse sweep. The forward keeps only θ_0..θ_{N−1} (flat
  vectors; every k-th with ``checkpoint_every=k``), each step's minibatch indices and the DSA
  parameters it drew. With λ_N = ∂L/∂θ_N, for i = N−1 … 0 one double-backward of s = λ_{i+1}ᵀ g_i,
  recomputed at θ_i on the replayed minibatch, gives
      ∂L/∂X_i += −α ∂s/∂X_i,   ∂L/∂α += −s,   λ_i = λ_{i+1} − α ∂s/∂θ_i  (= λ_{i+1} − α H_i λ_{i+1}).
  θ_0 is a point of the expert trajectory (a constant), so L's denominator adds nothing.
  Memory: the stored vectors plus one step's graph.
- ``"tesla"``: TESLA's approximation (justincui03/tesla distill.py): the student's steps are taken
  with a detached α, θ_N = θ_0 − α Σ g_i, and every step's image gradient uses λ_N in place of
  λ_{i+1} (the Hessian terms that carry the gradient across steps are dropped). It is NOT the
  exact gradient. This implementation recomputes θ_i forward in the reverse pass instead of
  storing them (memory O(P)). Soft labels get the same approximation (TESLA learns none).

Randomness (``generator``): the minibatch schedule is distill.py's — ``torch.randperm(N)`` split
into ``batch_syn`` chunks, the *last* chunk used first (``list.pop()``), a new permutation when
the list is empty — and DSA runs per step with seed −1 (independent per-image draws). With
``generator=None`` every draw comes from torch's global generators exactly as distill.py consumes
them (per-image DSA draws on the images' device, as mtt's ``DiffAugment`` does; on CUDA that
costs one device sync per step to bring the drawn parameters to the host). With a CPU
``torch.Generator`` every draw comes from it instead, on the CPU, and the whole schedule goes to
the device in one transfer. All draws are made before the first step (the model draws nothing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _backend
from .._checks import acc_dtype, check_choice, check_float_tensor
from .dsa import OP as DSA_OP
from .dsa import HostReads, ParamDiffAug, SeedStream, apply_stages, draw_stages, draw_stream, parse_strategy
from .param_match import param_match

__all__ = ["TrajectoryMatcher", "flat_model", "tesla_reference"]

MODES = ("exact", "unrolled", "tesla")
Params = Union[torch.Tensor, Sequence[torch.Tensor]]


# --- the model, run on a flat parameter vector ---------------------------------------------------

class _FlatModel:
    """Calls ``model`` with its parameters taken from one flat vector θ (``model.parameters()``
    order, mtt's ReparamModule order). A module that already owns a flat vector — mtt's
    ``ReparamModule`` (a ``flat_param`` parameter and ``forward(x, flat_param=...)``) — is called
    with θ directly."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.reparam = hasattr(model, "flat_param") and hasattr(model, "_param_infos")
        named = [("flat_param", model.flat_param)] if self.reparam else list(model.named_parameters())
        if not named:
            raise ValueError("model has no parameters to train")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.numel = sum(self.numels)

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.reparam:
            return self.model(x, flat_param=theta)
        views = {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.numels), self.shapes)}
        return torch.func.functional_call(self.model, views, (x,))


def flat_model(model: nn.Module) -> _FlatModel:
    """``f(θ, x)``: ``model`` run on the flat parameter vector θ (see ``TrajectoryMatcher``)."""
    return _FlatModel(model)


def _cross_sample_layers(model: nn.Module) -> List[str]:
    """Modules whose output for one sample depends on the others in the batch."""
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)]


def _random_layers(model: nn.Module) -> List[str]:
    """Modules that draw random numbers in their forward (their draws cannot be replayed)."""
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]


# --- the schedule: minibatch indices and DSA parameters of every step ---------------------------

@dataclass
class _Step:
    indices: torch.Tensor      # (b,) int64 on the images' device
    stages: list               # DSA stages [(iparams, fparams)] ready for apply_stages


class _Schedule:
    """distill.py's draws for one iteration, made up front in its order and kept for replay."""

    def __init__(self, steps: List[_Step], dsa_backend: str, align_corners: bool):
        self.steps = steps
        self.dsa_backend = dsa_backend
        self.align_corners = align_corners

    def augment(self, x: torch.Tensor, step: _Step, rows: Optional[slice] = None) -> torch.Tensor:
        if not step.stages:
            return x
        stages = step.stages if rows is None else [(ip[rows], fp[rows]) for ip, fp in step.stages]
        return apply_stages(x, stages, self.align_corners, self.dsa_backend)


def _draw_schedule(n_images: int, batch_syn: int, syn_steps: int, families, dsa_param, image: torch.Tensor,
                   generator: Optional[torch.Generator], align_corners: bool) -> _Schedule:
    device = image.device
    draw_device = device if generator is None else torch.device("cpu")
    dsa_backend = _backend.resolve(DSA_OP, "auto", device) if families else "torch"
    chunks: List[torch.Tensor] = []
    picked, drawn, reads = [], [], HostReads()
    with draw_stream(draw_device):  # global-generator draws on the GPU: one host read for all steps
        for _ in range(syn_steps):
            if not chunks:
                chunks = list(torch.split(torch.randperm(n_images, generator=generator), batch_syn))
            idx = chunks.pop()
            picked.append(idx)
            if families:  # seed −1: per-image draws from the generator, as DiffAugment(x, strategy, param=...)
                drawn.append(draw_stages(families, SeedStream(-1, generator), idx.numel(), image.shape[2],
                                         image.shape[3], dsa_param, image.dtype, draw_device, siamese=False,
                                         reads=reads))
            else:
                drawn.append([])
        reads.flush()
    sizes = [idx.numel() for idx in picked]
    # one host-to-device transfer for the whole schedule (indices, and the DSA tables the fused
    # kernels read); the torch DSA backend reads its tables on the host
    all_idx = _to_device(torch.cat(picked), device).split(sizes)
    tables = [list(zip(*d)) for d in zip(*drawn)] if families else []  # per stage: (ips, fps) over steps
    if families and dsa_backend != "torch":
        acc = acc_dtype(image.dtype)
        tables = [(_to_device(torch.cat(ips).to(torch.int32), device).split(sizes),
                   _to_device(torch.cat(fps).to(acc), device).split(sizes)) for ips, fps in tables]
    steps = []
    for i in range(syn_steps):
        stages = [(ips[i], fps[i]) for ips, fps in tables]
        if stages and dsa_backend != "torch":
            stages = [(ip.contiguous(), fp.contiguous()) for ip, fp in stages]
        steps.append(_Step(all_idx[i], stages))
    return _Schedule(steps, dsa_backend, align_corners)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


# --- one SGD step's gradient ---------------------------------------------------------------------

class _Stepper:
    """g_i = ∇θ CE_mean(f(θ_i, DSA(X[idx_i])), y[idx_i]), optionally as a sum over micro-batches
    (CE_sum(chunk) / b each; valid only without cross-sample layers)."""

    def __init__(self, fmodel: _FlatModel, schedule: _Schedule, micro_batch: Optional[int], check_labels):
        self.f = fmodel
        self.schedule = schedule
        self.micro_batch = micro_batch
        self.check_labels = check_labels  # called with the logits' class count on the first forward

    def chunks(self, b: int) -> List[slice]:
        m = self.micro_batch or b
        return [slice(s, min(s + m, b)) for s in range(0, b, m)]

    def chunk_loss(self, theta, x, y, step: _Step, rows: Optional[slice], b: int) -> torch.Tensor:
        logits = self.f(theta, self.schedule.augment(x, step, rows))
        if self.check_labels is not None:
            self.check_labels(logits.shape[-1])
            self.check_labels = None
        if rows is None:
            return F.cross_entropy(logits, y)  # distill.py's criterion (mean; soft targets when float)
        return F.cross_entropy(logits, y, reduction="sum") / b

    def grad(self, theta, images, labels, step: _Step, create_graph: bool) -> torch.Tensor:
        """The step's gradient at ``theta`` (which requires grad) on ``images``/``labels`` (full set)."""
        idx = step.indices
        b = idx.numel()
        if self.micro_batch is None or self.micro_batch >= b:
            loss = self.chunk_loss(theta, images[idx], labels[idx], step, None, b)
            return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]
        g = None
        for rows in self.chunks(b):
            loss = self.chunk_loss(theta, images[idx[rows]], labels[idx[rows]], step, rows, b)
            gc = torch.autograd.grad(loss, theta, create_graph=create_graph)[0]
            g = gc if g is None else g + gc
        return g

    def detached_grad(self, theta, images, labels, step: _Step) -> torch.Tensor:
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            return self.grad(th, images, labels, step, create_graph=False)

    def vjp(self, theta, images, labels, lam, step: _Step, need_x: bool, need_y: bool):
        """One double-backward of s = λᵀ g at θ on the step's replayed minibatch.

        Returns (s, ∂s/∂θ = H λ, [(rows of X, ∂s/∂X_rows)], [(rows of y, ∂s/∂y_rows)], g)."""
        idx = step.indices
        b = idx.numel()
        rows_list = [None] if (self.micro_batch is None or self.micro_batch >= b) else self.chunks(b)
        s_total, hv_total, g_total, gx, gy = None, None, None, [], []
        for rows in rows_list:
            sel = idx if rows is None else idx[rows]
            with torch.enable_grad():
                th = theta.detach().requires_grad_(True)
                x = images[sel].detach().requires_grad_(need_x)
                y = labels[sel].detach().requires_grad_(need_y)
                loss = self.chunk_loss(th, x, y, step, rows, b)
                g = torch.autograd.grad(loss, th, create_graph=True)[0]
                s = torch.dot(g, lam)
                wrt = [th] + ([x] if need_x else []) + ([y] if need_y else [])
                grads = torch.autograd.grad(s, wrt, allow_unused=True)
            hv = grads[0] if grads[0] is not None else torch.zeros_like(theta)
            if need_x:
                gx.append((sel, grads[1] if grads[1] is not None else torch.zeros_like(x)))
            if need_y:
                gy.append((sel, grads[-1] if grads[-1] is not None else torch.zeros_like(y)))
            s, g = s.detach(), g.detach()
            s_total = s if s_total is None else s_total + s
            hv_total = hv if hv_total is None else hv_total + hv
            g_total = g if g_total is None else g_total + g
        return s_total, hv_total, gx, gy, g_total


# --- exact and TESLA reverse passes as autograd Functions -----------------------------------------

def _accumulate_inputs(grad_images, grad_labels, gx, gy, lr):
    for sel, g in gx:
        grad_images.index_add_(0, sel, g * (-lr))
    for sel, g in gy:
        grad_labels.index_add_(0, sel, g * (-lr))


class _ExactTrajectory(torch.autograd.Function):
    """(images, labels, lr, θ_0) → θ_N, with the reverse sweep over stored θ_i as its backward."""

    @staticmethod
    def forward(ctx, images, labels, lr, theta0, stepper: _Stepper, checkpoint_every: int):
        steps = stepper.schedule.steps
        images, labels = images.detach(), labels.detach()  # the forward's step graphs need no path to them
        stored = []
        theta = theta0
        for i, step in enumerate(steps):
            if i % checkpoint_every == 0:
                stored.append(theta)
            theta = theta - lr * stepper.detached_grad(theta, images, labels, step)
        ctx.save_for_backward(images, labels, lr, *stored)
        ctx.stepper, ctx.k = stepper, checkpoint_every
        return theta

    @staticmethod
    def backward(ctx, lam):
        images, labels, lr, *stored = ctx.saved_tensors
        stepper, k = ctx.stepper, ctx.k
        steps = stepper.schedule.steps
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_images = torch.zeros_like(images) if need_x else None
        grad_labels = torch.zeros_like(labels) if need_y else None
        grad_lr = torch.zeros_like(lr)
        lam = lam.detach()
        for c in reversed(range(0, len(steps), k)):
            end = min(c + k, len(steps))
            segment = [stored[c // k]]  # θ_c, then recompute θ_{c+1} … θ_{end−1}
            for i in range(c, end - 1):
                segment.append(segment[-1] - lr * stepper.detached_grad(segment[-1], images, labels, steps[i]))
            for i in reversed(range(c, end)):
                s, hv, gx, gy, _ = stepper.vjp(segment[i - c], images, labels, lam, steps[i], need_x, need_y)
                _accumulate_inputs(grad_images, grad_labels, gx, gy, lr)
                grad_lr = grad_lr - s
                lam = lam - lr * hv
            del segment
        return grad_images, grad_labels, grad_lr, None, None, None


class _TeslaTrajectory(torch.autograd.Function):
    """TESLA: θ_N = θ_0 − α Σ g_i (steps with α detached); every step's input gradient uses λ_N."""

    @staticmethod
    def forward(ctx, images, labels, lr, theta0, stepper: _Stepper):
        theta, g_sum = theta0, torch.zeros_like(theta0)
        images, labels = images.detach(), labels.detach()
        for step in stepper.schedule.steps:
            g = stepper.detached_grad(theta, images, labels, step)
            theta = theta - lr * g
            g_sum = g_sum + g
        ctx.save_for_backward(images, labels, lr, theta0)
        ctx.stepper = stepper
        return theta0 - lr * g_sum  # TESLA's grand_loss uses starting_params − syn_lr · gradient_sum

    @staticmethod
    def backward(ctx, lam):
        images, labels, lr, theta = ctx.saved_tensors
        stepper = ctx.stepper
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_images = torch.zeros_like(images) if need_x else None
        grad_labels = torch.zeros_like(labels) if need_y else None
        grad_lr = torch.zeros_like(lr)
        lam = lam.detach()
        for step in stepper.schedule.steps:  # forward order: θ_i recomputed, nothing stored
            s, _hv, gx, gy, g = stepper.vjp(theta, images, labels, lam, step, need_x, need_y)
            _accumulate_inputs(grad_images, grad_labels, gx, gy, lr)
            grad_lr = grad_lr - s  # ∂/∂α of ‖θ_0 − α Σg − θ*‖²/D with the g_i held fixed
            theta = theta - lr * g
        return grad_images, grad_labels, grad_lr, None, None


def _unrolled(images, labels, lr, theta0, stepper: _Stepper) -> torch.Tensor:
    """distill.py's loop: every step's gradient with create_graph=True (the reference)."""
    theta = theta0.detach().requires_grad_(True)
    for step in stepper.schedule.steps:
        theta = theta - lr * stepper.grad(theta, images, labels, step, create_graph=True)
    return theta


# --- TESLA's loop as its code runs it (the reference of mode="tesla") ---------------------------

def tesla_reference(model: nn.Module, image_syn: torch.Tensor, label_syn: torch.Tensor, syn_lr: torch.Tensor,
                    start_params: torch.Tensor, target_params: torch.Tensor, *, syn_steps: int,
                    batch_syn: Optional[int] = None, dsa_strategy: Optional[str] = None, dsa_param=None,
                    align_corners: bool = True) -> torch.Tensor:
    """justincui03/tesla distill.py's iteration (torch's global RNG, as it runs): forward steps with
    detached gradients and ``syn_lr.item()``, then per step the image gradient
    2·∂/∂X_i[(α(θ* − θ_0) + α² Σg) · g_i / ‖θ_0 − θ*‖²] and the loss ‖θ_0 − α Σg − θ*‖² / ‖θ_0 − θ*‖².

    Returns a scalar whose value is that loss and whose gradients w.r.t. ``image_syn`` and ``syn_lr``
    are TESLA's (it sets them with ``.grad =``; here they are carried by a surrogate term)."""
    from .dsa import diff_augment

    f = _FlatModel(model)
    start, target = start_params.detach(), target_params.detach()
    n = image_syn.shape[0]
    batch_syn = batch_syn or n
    param = ParamDiffAug() if dsa_param is None else dsa_param
    thetas = [start.clone()]
    param_dist = ((start - target) ** 2).sum()
    x_list, original_x_list, y_list, chunks, used = [], [], [], [], []
    gradient_sum = torch.zeros_like(start)
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(n), batch_syn))
        idx = chunks.pop()
        used.append(idx)
        x = image_syn[idx]
        original_x_list.append(x)
        if dsa_strategy:
            x = diff_augment(x, dsa_strategy, -1, param, align_corners=align_corners)
        x_list.append(x)
        y_list.append(label_syn[idx])
        theta = thetas[-1].detach().requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(f(theta, x), label_syn[idx]), theta)[0]
        thetas.append(thetas[-1] - syn_lr.item() * grad)
        gradient_sum += grad
    image_grad = torch.zeros_like(image_syn)
    for i in range(syn_steps):
        w_i = thetas[i].detach().requires_grad_(True)
        grad_i = torch.autograd.grad(F.cross_entropy(f(w_i, x_list[i]), y_list[i]), w_i, create_graph=True)[0]
        coefficient = syn_lr.item() * (target - start) + syn_lr.item() ** 2 * gradient_sum
        image_grad[used[i]] += 2 * torch.autograd.grad(coefficient @ grad_i / param_dist, original_x_list[i])[0]
    residual = start - syn_lr * gradient_sum - target
    loss = residual.dot(residual) / param_dist
    # value: TESLA's loss; gradients: TESLA's image gradient (set by hand) and ∂loss/∂α
    surrogate = (image_syn * image_grad).sum()
    return loss + surrogate - surrogate.detach()


# --- the public module -----------------------------------------------------------------------------

def _positive_int(name: str, value, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _flat_params(name: str, params: Params, numel: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(params, torch.Tensor):
        flat = params.reshape(-1)
    elif isinstance(params, (list, tuple)) and params and all(isinstance(p, torch.Tensor) for p in params):
        flat = torch.cat([p.detach().to(like.device).reshape(-1) for p in params])
    else:
        raise TypeError(f"{name} must be a flat tensor or a non-empty list of tensors")
    check_float_tensor(name, flat)
    if flat.numel() != numel:
        raise ValueError(f"{name} has {flat.numel()} parameters but the model has {numel}")
    return flat.detach().to(device=like.device, dtype=like.dtype)


class TrajectoryMatcher:
    """mtt-distillation's ``distill.py`` iteration as one differentiable call (see the module doc).

    ``tm = TrajectoryMatcher(model, syn_steps=20, batch_syn=None, mode="exact")``;
    ``loss = tm(image_syn, label_syn, syn_lr, start_params, target_params, generator=None)``;
    ``loss.backward()`` fills ``image_syn.grad``, ``syn_lr.grad`` and, for float (N, C) soft labels
    that require grad, ``label_syn.grad``.

    model: any ``nn.Module`` (or mtt's ``ReparamModule``), run in its current train/eval mode on a
    flat parameter vector in ``model.parameters()`` order; its own parameter values are not used.
    batch_syn: minibatch size (None: the whole set, distill.py's default). dsa_strategy /
    dsa_param: DSA per step (None: none; ``dsa_param`` defaults to ``ParamDiffAug()``).
    align_corners: True as mtt-distillation. checkpoint_every (exact): store every k-th θ and
    recompute the rest in the reverse pass. micro_batch (exact, tesla, unrolled): compute each step's
    gradient as a sum over chunks of this many images (models without cross-sample layers only).
    """

    def __init__(self, model: nn.Module, *, syn_steps: int, batch_syn: Optional[int] = None, mode: str = "exact",
                 dsa_strategy: Optional[str] = None, dsa_param=None, align_corners: bool = True,
                 checkpoint_every: Optional[int] = None, micro_batch: Optional[int] = None):
        self.fmodel = _FlatModel(model)
        self.model = model
        self.syn_steps = _positive_int("syn_steps", syn_steps)
        self.batch_syn = _positive_int("batch_syn", batch_syn, allow_none=True)
        self.mode = check_choice("mode", mode, MODES)
        self.dsa_param = ParamDiffAug() if dsa_param is None else dsa_param
        self.families = parse_strategy("" if dsa_strategy is None else dsa_strategy, self.dsa_param)
        self.dsa_strategy = dsa_strategy
        if not isinstance(align_corners, bool):
            raise TypeError(f"align_corners must be a bool, got {type(align_corners).__name__}")
        self.align_corners = align_corners
        self.checkpoint_every = _positive_int("checkpoint_every", checkpoint_every, allow_none=True)
        if self.checkpoint_every is not None and mode == "unrolled":
            raise ValueError("checkpoint_every applies to mode='exact' (unrolled keeps the whole graph)")
        self.micro_batch = _positive_int("micro_batch", micro_batch, allow_none=True)
        self._checked_labels = None
        self._check_model()

    @property
    def num_params(self) -> int:
        return self.fmodel.numel

    def _check_model(self):
        if self.micro_batch is not None:
            bad = _cross_sample_layers(self.model)
            if bad:
                raise ValueError(f"micro_batch needs a model without cross-sample layers; {bad} normalise over the "
                                 "batch (train-mode BatchNorm): put them in eval mode or leave micro_batch=None")
        if self.mode != "unrolled":
            bad = _random_layers(self.model)
            if bad:
                raise ValueError(f"mode={self.mode!r} replays each step in its reverse pass, which the random draws of "
                                 f"{bad} (train-mode dropout) would not repeat: use mode='unrolled' or eval mode")

    # --- input checks -------------------------------------------------------------------------

    def _check_inputs(self, image_syn, label_syn, syn_lr, generator):
        check_float_tensor("image_syn", image_syn, min_dim=1)
        if self.families and image_syn.dim() != 4:
            raise ValueError(f"image_syn must be (N, C, H, W) for DSA, got shape {tuple(image_syn.shape)}")
        n = image_syn.shape[0]
        if not isinstance(label_syn, torch.Tensor):
            raise TypeError(f"label_syn must be a torch.Tensor, got {type(label_syn).__name__}")
        if label_syn.dtype.is_floating_point:
            if label_syn.dim() != 2 or label_syn.shape[0] != n:
                raise ValueError(f"label_syn (soft labels) must be (N, num_classes) with N = {n}, "
                                 f"got shape {tuple(label_syn.shape)}")
        elif label_syn.dtype in (torch.bool,) or label_syn.dtype.is_complex:
            raise TypeError(f"label_syn must hold integer class labels or float soft labels, got {label_syn.dtype}")
        elif label_syn.dim() != 1 or label_syn.shape[0] != n:
            raise ValueError(f"label_syn must be 1-D of length {n} (one label per image), got shape "
                             f"{tuple(label_syn.shape)}")
        if label_syn.device != image_syn.device:
            raise ValueError(f"label_syn is on {label_syn.device} but image_syn on {image_syn.device}")
        if isinstance(syn_lr, (int, float)) and not isinstance(syn_lr, bool):
            syn_lr = torch.tensor(float(syn_lr), dtype=image_syn.dtype, device=image_syn.device)
        if not isinstance(syn_lr, torch.Tensor):
            raise TypeError(f"syn_lr must be a scalar tensor or a float, got {type(syn_lr).__name__}")
        if not syn_lr.dtype.is_floating_point:
            raise TypeError(f"syn_lr must be a floating-point tensor, got {syn_lr.dtype}")
        if syn_lr.numel() != 1:
            raise ValueError(f"syn_lr must be a scalar (one learning rate), got shape {tuple(syn_lr.shape)}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if generator.device.type != "cpu":
                raise ValueError(f"generator must be a CPU generator (the draws are made on the CPU), got one on "
                                 f"{generator.device}")
        return syn_lr.reshape(()).to(dtype=image_syn.dtype, device=image_syn.device)

    def _label_checker(self, label_syn):
        """Checks labels against the logits' class count on the first forward; a labels tensor that
        has not changed since its last check (same storage, shape and version) is not read again,
        so a training loop pays the range check's device sync once."""
        key = (label_syn.data_ptr(), tuple(label_syn.shape), label_syn._version, label_syn.dtype)

        def check(num_classes: int):
            if self._checked_labels == key + (num_classes,):
                return
            if label_syn.dtype.is_floating_point:
                if label_syn.shape[1] != num_classes:
                    raise ValueError(f"label_syn has {label_syn.shape[1]} classes but the model outputs {num_classes}")
            elif label_syn.numel():
                lo, hi = torch.stack(torch.aminmax(label_syn)).tolist()
                if lo < 0 or hi >= num_classes:
                    raise ValueError(f"label_syn must lie in [0, {num_classes}) (the model's outputs); found values "
                                     f"in [{lo}, {hi}]")
            self._checked_labels = key + (num_classes,)
        return check

    # --- the call ---------------------------------------------------------------------------------

    def schedule(self, image_syn: torch.Tensor, generator: Optional[torch.Generator] = None) -> _Schedule:
        """Draw one iteration's minibatches and DSA parameters (consumes the generator like distill.py)."""
        n = image_syn.shape[0]
        return _draw_schedule(n, self.batch_syn or n, self.syn_steps, self.families, self.dsa_param, image_syn,
                              generator, self.align_corners)

    def student_params(self, image_syn, label_syn, syn_lr, start_params, generator=None) -> torch.Tensor:
        """θ_N after ``syn_steps`` steps from ``start_params``, differentiable per ``mode``."""
        syn_lr = self._check_inputs(image_syn, label_syn, syn_lr, generator)
        self._check_model()
        theta0 = _flat_params("start_params", start_params, self.fmodel.numel, image_syn)
        check = self._label_checker(label_syn)
        if not label_syn.dtype.is_floating_point and label_syn.dtype != torch.int64:
            label_syn = label_syn.long()  # cross_entropy's class indices are int64
        stepper = _Stepper(self.fmodel, self.schedule(image_syn, generator), self.micro_batch, check)
        if self.mode == "unrolled":
            return _unrolled(image_syn, label_syn, syn_lr, theta0, stepper)
        if self.mode == "tesla":
            return _TeslaTrajectory.apply(image_syn, label_syn, syn_lr, theta0, stepper)
        return _ExactTrajectory.apply(image_syn, label_syn, syn_lr, theta0, stepper, self.checkpoint_every or 1)

    def __call__(self, image_syn, label_syn, syn_lr, start_params: Params, target_params: Params,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_float_tensor("image_syn", image_syn, min_dim=1)
        target = _flat_params("target_params", target_params, self.fmodel.numel, image_syn)
        start = _flat_params("start_params", start_params, self.fmodel.numel, image_syn)
        student = self.student_params(image_syn, label_syn, syn_lr, start, generator)
        return param_match(student, start, target)

    def __repr__(self):
        return (f"TrajectoryMatcher(mode={self.mode!r}, syn_steps={self.syn_steps}, batch_syn={self.batch_syn}, "
                f"dsa_strategy={self.dsa_strategy!r}, params={self.fmodel.numel})")
