"""Evaluate a synthetic set the way the DD papers do: train M fresh networks on it, report the mean
± std of their test accuracy (SPEC 7).

Training of each network follows DatasetCondensation's ``evaluate_synset``: SGD (lr 0.01, momentum
0.9, weight decay 5e-4), minibatches of 256 reshuffled every epoch, the learning rate ×0.1 (fresh
optimiser) at half the epochs, optional DSA on every minibatch (an independent draw per image).

Network m is fully determined by ``(seed, m)``: its initialisation, its data order and its DSA
draws come from generators derived from them. ``batched=True`` trains all M networks at once —
``torch.func.stack_module_state`` + ``vmap(functional_call)`` (convolutions of M networks become
one grouped convolution), one optimiser over the stacked parameters — and gives the same per-network
trajectories as ``batched=False`` (one network after the other): the same draws, the same
element-wise updates, only the floating-point order inside the batched kernels differs (float64
trajectories agree to ~1e-12; see tests/test_evaluate.py). Networks with BatchNorm (running statistics
updated in place) cannot be vmapped; they are trained sequentially.

Labels: (N,) class ids (cross-entropy) or a float (N, C) tensor of target probabilities (soft
cross-entropy ``−Σ p log softmax``). ``soft_label_fn(batch) -> probabilities``: called on every
(augmented) minibatch to produce its targets (knowledge-distillation-style relabelling by a teacher,
as SRe2L's evaluation does); the labels are then ignored.

``mixup=α > 0``: every minibatch (after DSA) is mixed with a permutation of itself,
``λ·x + (1−λ)·x[π]``, λ ~ Beta(α, α) and π drawn from the network's own generator. Stored labels are
mixed the same way, ``λ·t + (1−λ)·t[π]`` (class ids become one-hot first; INFER's ``val_static.py``);
a ``soft_label_fn`` labels the mixed images instead (the teacher sees what the student sees, as in
SRe2L's relabelling and INFER's ``val_dyn.py``).

``label_temperature=T``: the float labels (and ``soft_label_fn``'s outputs) are *logits*; the loss is
Hinton's ``T² · CE(softmax(t / T), softmax(student / T))`` and mixup interpolates the logits (INFER's
``val_static.py``: the teachers' mean logits, mixed, at T = 30). ``optimizer="adamw"``: AdamW at ``lr``
and ``weight_decay`` with a per-epoch cosine rate (INFER's and SRe2L's students) instead of DC's SGD.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import get_network, has_batchnorm
from .methods._common import DSA_STRATEGY, augment_per_image, cosine_lr, derive_seed, generator, seeded_network

__all__ = ["evaluate", "EvalResult", "random_subset"]

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class EvalResult:
    accuracies: List[float]  # percent, one per network
    seconds: float
    batched: bool
    train_losses: List[float] = field(default_factory=list)  # last epoch's mean loss, one per network

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.accuracies, dtype=torch.float64).mean())

    @property
    def std(self) -> float:
        t = torch.tensor(self.accuracies, dtype=torch.float64)
        return float(t.std(unbiased=False)) if len(t) > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f} % ({len(self.accuracies)} networks, {self.seconds:.1f} s)"


def _soft_ce(logits: torch.Tensor, target: torch.Tensor, temperature: Optional[float] = None) -> torch.Tensor:
    """Cross-entropy with class ids or probabilities; with ``temperature`` T the targets are logits and
    the loss is T² · CE(softmax(target / T), softmax(logits / T)): Hinton's distillation loss, which
    differs from T² · KL by a constant (the targets' entropy), so its gradient is T² · KL's (INFER's
    static-label loss; the T² keeps SGD's step size independent of T)."""
    if target.dtype == torch.long:
        return F.cross_entropy(logits, target)
    if temperature is None:
        return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    p = F.softmax(target / temperature, dim=-1)
    return -(temperature ** 2) * (p * F.log_softmax(logits / temperature, dim=-1)).sum(-1).mean()


def _check_inputs(images, labels, x_test, y_test, num_classes):
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise TypeError(f"images must be a float (N, C, H, W) tensor, got "
                        f"{type(images).__name__ if not isinstance(images, torch.Tensor) else tuple(images.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be a tensor with one row per image ({images.shape[0]})")
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[1] != num_classes:
            raise ValueError(f"soft labels must be (N, {num_classes}), got {tuple(labels.shape)}")
    elif labels.dim() != 1 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be (N,) class ids in [0, {num_classes}), got shape {tuple(labels.shape)}")
    if x_test.shape[1:] != images.shape[1:]:
        raise ValueError(f"test images are {tuple(x_test.shape[1:])}, synthetic images {tuple(images.shape[1:])}")


def _test_split(test_set, labels):
    """(x_test, y_test, num_classes) from a Dataset or an (x, y) pair (classes: test and train labels)."""
    if hasattr(test_set, "x_test"):
        return test_set.x_test, test_set.y_test, test_set.num_classes
    if isinstance(test_set, (tuple, list)) and len(test_set) == 2:
        x, y = test_set
        if isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.dim() == 2:
            if int(y.max()) >= labels.shape[1]:
                raise ValueError(f"soft labels have {labels.shape[1]} classes but the test labels reach {int(y.max())}")
            return x, y, labels.shape[1]
        train_max = int(labels.max()) if isinstance(labels, torch.Tensor) and labels.numel() else 0
        return x, y, max(int(y.max()), train_max) + 1
    raise TypeError("test_set must be a ddfast.data.Dataset or an (x_test, y_test) pair")


class _Trainer:
    """The training recipe shared by the sequential and the batched paths."""

    def __init__(self, x, targets, *, epochs, lr, batch_size, momentum, weight_decay, dsa_strategy, align_corners,
                 soft_label_fn, mixup=0.0, num_classes=None, label_temperature=None, optimizer="sgd"):
        self.x, self.targets = x, targets
        self.optim, self.label_temperature = optimizer, label_temperature
        self.mixup, self.num_classes = mixup, num_classes
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.momentum, self.weight_decay = momentum, weight_decay
        self.dsa_strategy, self.align_corners, self.soft_label_fn = dsa_strategy, align_corners, soft_label_fn

    def optimizer(self, params, epoch):
        if self.optim == "adamw":  # INFER's / SRe2L's students: AdamW with a cosine rate (set_epoch_lr)
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        lr = self.lr * (0.1 if epoch >= self.epochs // 2 else 1.0)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _soft_ce(logits, targets, self.label_temperature)

    def decay_at(self, epoch) -> bool:
        return self.optim == "sgd" and epoch == self.epochs // 2 and epoch > 0

    def set_epoch_lr(self, opt, epoch) -> None:
        """AdamW: ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch; SGD: nothing (decay_at)."""
        if self.optim == "adamw":
            for group in opt.param_groups:
                group["lr"] = cosine_lr(self.lr, epoch, self.epochs)

    def batches(self, gen: torch.Generator):
        """(images, targets) minibatches of one epoch for the network drawing from ``gen``."""
        order = torch.randperm(self.x.shape[0], generator=gen).to(self.x.device)
        for start in range(0, self.x.shape[0], self.batch_size):
            idx = order[start:start + self.batch_size]
            xb = self.x[idx]
            if self.dsa_strategy:
                xb = augment_per_image(xb, self.dsa_strategy, gen, align_corners=self.align_corners)
            if self.soft_label_fn is not None:
                if self.mixup > 0:  # the labeller sees the mixed images (SRe2L's FKD, INFER's val_dyn.py)
                    xb = mix_images(xb, self.mixup, gen)[0]
                with torch.no_grad():
                    tb = self.soft_label_fn(xb)
            else:
                tb = self.targets[idx]
                if self.mixup > 0:
                    xb, tb = mix_batch(xb, tb, self.mixup, gen, self.num_classes)
            yield xb, tb


def mix_images(x: torch.Tensor, alpha: float, gen: torch.Generator):
    """(λ·x + (1 − λ)·x[π], λ, π): mixup of a minibatch with a permutation of itself; λ ~ Beta(α, α)
    and π come from ``gen`` alone (no global RNG)."""
    import numpy as np

    lam = float(np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam, perm


def mix_batch(x: torch.Tensor, targets: torch.Tensor, alpha: float, gen: torch.Generator, num_classes: int):
    """Mixup of a minibatch with a permutation of itself (``mix_images``); the targets are
    interpolated like the images (class ids as one-hot)."""
    mixed, lam, perm = mix_images(x, alpha, gen)
    if not targets.is_floating_point():
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes (the one-hot width of class-id targets) must be a positive int, "
                             f"got {num_classes!r}")
        targets = F.one_hot(targets.long(), num_classes).to(x.dtype)
    return mixed, lam * targets + (1 - lam) * targets[perm]


def _train_sequential(nets, gens, trainer: _Trainer, progress) -> List[float]:
    last = []
    for net, gen in zip(nets, gens):
        net.train()
        opt = trainer.optimizer(net.parameters(), 0)
        for e in range(trainer.epochs):
            if trainer.decay_at(e):
                opt = trainer.optimizer(net.parameters(), e)
            trainer.set_epoch_lr(opt, e)
            total, n = 0.0, 0
            for xb, tb in trainer.batches(gen):
                loss = trainer.loss(net(xb), tb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, n = total + float(loss.detach()), n + 1
            if progress is not None:
                progress.update(1)
        last.append(total / max(n, 1))
    return last


def _train_batched(nets, gens, trainer: _Trainer, progress):
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")

    def forward(p, b, x):
        return functional_call(base, (p, b), (x,))

    batched_forward = vmap(forward)
    leaves = list(params.values())
    opt = trainer.optimizer(leaves, 0)
    last = []
    for e in range(trainer.epochs):
        if trainer.decay_at(e):
            opt = trainer.optimizer(leaves, e)
        trainer.set_epoch_lr(opt, e)
        total, n = torch.zeros(len(nets), dtype=torch.float64), 0
        for parts in zip(*(trainer.batches(g) for g in gens)):
            xb = torch.stack([p[0] for p in parts])
            tb = torch.stack([p[1] for p in parts])
            out = batched_forward(params, buffers, xb)
            losses = torch.stack([trainer.loss(out[m], tb[m]) for m in range(len(nets))])
            opt.zero_grad()
            losses.sum().backward()
            opt.step()
            total, n = total + losses.detach().double().cpu(), n + 1
        if progress is not None:
            progress.update(len(nets))
    last = (total / max(n, 1)).tolist()
    with torch.no_grad():
        for m, net in enumerate(nets):  # write the trained weights back into the modules
            for name, p in net.named_parameters():
                p.copy_(params[name][m])
            for name, b in net.named_buffers():
                b.copy_(buffers[name][m])
    return last


@torch.no_grad()
def _output_classes(net: nn.Module, images: torch.Tensor) -> int:
    """The network's number of outputs (the one-hot width of mixed class ids); one image, eval mode."""
    was_training = net.training
    try:
        return int(net.eval()(images[:1]).shape[-1])
    finally:
        net.train(was_training)


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    net.eval()
    correct = 0
    for start in range(0, x.shape[0], chunk):
        correct += int((net(x[start:start + chunk]).argmax(1) == y[start:start + chunk]).sum())
    return 100.0 * correct / max(x.shape[0], 1)


def evaluate(images: torch.Tensor, labels: torch.Tensor, test_set, *, model: Union[str, Callable[[], nn.Module]] = "convnet",
             net_width: Optional[int] = None, net_depth: Optional[int] = None, num_models: int = 5,
             epochs: int = 300, lr: float = 0.01, batch_size: int = 256, momentum: float = 0.9,
             weight_decay: float = 5e-4, dsa: bool = False, dsa_strategy: str = DSA_STRATEGY,
             align_corners: bool = False, batched: bool = True, seed: int = 0,
             soft_label_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, progress: bool = False,
             desc: str = "evaluating", return_networks: bool = False, mixup: float = 0.0,
             label_temperature: Optional[float] = None, optimizer: str = "sgd"):
    """Train ``num_models`` fresh networks on (images, labels), test on ``test_set``; an ``EvalResult``.

    test_set: a ``ddfast.data.Dataset`` (its test split) or an ``(x_test, y_test)`` pair.
    model: a ``ddfast.models.get_network`` name (with ``net_width``/``net_depth``) or a zero-argument
    callable building the network. dsa: augment every minibatch with ``dsa_strategy``.
    batched: train all networks at once (module doc). mixup: Beta(α, α) mixup of every minibatch
    with interpolated targets (0: off; module doc). label_temperature: the labels are logits, distilled
    at this temperature (module doc). optimizer: "sgd" (DC's) or "adamw" (cosine rate; pass its ``lr``
    and ``weight_decay``). Everything else as DC's ``evaluate_synset``.
    """
    x_test, y_test, num_classes = _test_split(test_set, labels)
    _check_inputs(images, labels, x_test, y_test, num_classes)
    for name, v in (("num_models", num_models), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(mixup, bool) or not isinstance(mixup, (int, float)) or not 0 <= mixup < math.inf:
        raise ValueError(f"mixup must be a non-negative Beta concentration α (0: off), got {mixup!r}")
    if label_temperature is not None:
        if isinstance(label_temperature, bool) or not isinstance(label_temperature, (int, float)) \
                or not 0 < label_temperature < math.inf:
            raise ValueError(f"label_temperature must be a positive number (None: labels are probabilities), "
                             f"got {label_temperature!r}")
        if not labels.is_floating_point() and soft_label_fn is None:
            raise ValueError("label_temperature needs logits as labels (a float (N, C) tensor), not class ids")
        label_temperature = float(label_temperature)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    device, dtype = images.device, images.dtype
    if isinstance(model, str):
        channel, im_size = images.shape[1], tuple(images.shape[2:])
        build = lambda: get_network(model, channel, num_classes, im_size, width=net_width, depth=net_depth)  # noqa
    elif callable(model):
        build = model
    else:
        raise TypeError(f"model must be a network name or a callable, got {type(model).__name__}")
    nets = [seeded_network(build, derive_seed(seed, "eval-init", m), device).to(dtype) for m in range(num_models)]
    gens = [generator(seed, "eval-order", m) for m in range(num_models)]
    trainer = _Trainer(images.detach(), labels.detach().to(dtype) if labels.is_floating_point() else labels,
                       epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, weight_decay=weight_decay,
                       dsa_strategy=dsa_strategy if dsa else None, align_corners=align_corners,
                       soft_label_fn=soft_label_fn, mixup=float(mixup), label_temperature=label_temperature,
                       optimizer=optimizer,
                       num_classes=_output_classes(nets[0], images) if mixup and not labels.is_floating_point() else None)
    if batched and has_batchnorm(nets[0]):
        warnings.warn("BatchNorm networks cannot be trained under vmap; evaluating them sequentially")
        batched = False
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_models * epochs, desc=desc, unit="net-epoch", leave=False)
    start = time.perf_counter()
    try:
        train = _train_batched if batched and num_models > 1 else _train_sequential
        last = train(nets, gens, trainer, bar)
    finally:
        if bar is not None:
            bar.close()
    accs = [_accuracy(net, x_test.to(device, dtype), y_test.to(device)) for net in nets]
    result = EvalResult(accs, time.perf_counter() - start, batched and num_models > 1, last)
    return (result, nets) if return_networks else result


def random_subset(x: torch.Tensor, y: torch.Tensor, ipc: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random real images per class (class c drawn from ``generator(seed, "random-subset", c)``)."""
    xs, ys = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten().cpu()
        pick = idx[torch.randperm(len(idx), generator=generator(seed, "random-subset", c))[:ipc]].to(x.device)
        xs.append(x[pick])
        ys.append(y[pick])
    return torch.cat(xs), torch.cat(ys)


def cached_evaluate(tag: str, images: torch.Tensor, labels: torch.Tensor, dataset, *, use_cache: bool = True,
                    **kwargs) -> EvalResult:
    """``evaluate`` remembered on disk (JSON under the ddfast cache dir), keyed by the data and settings."""
    import json

    from .methods._common import cache_dir, data_fingerprint

    # mixup off is left out of the key: results cached before the option existed stay valid
    settings = sorted((k, str(v)) for k, v in kwargs.items()
                      if k not in ("progress", "desc") and not (k == "mixup" and not v))
    key = derive_seed(0, tag, dataset.name, data_fingerprint(images, labels, dataset.x_test), *settings)
    path = cache_dir("baselines") / f"{tag}-{key:016x}.json"
    if use_cache and path.exists():
        d = json.loads(path.read_text())
        return EvalResult(d["accuracies"], d["seconds"], d["batched"], d.get("train_losses", []))
    res = evaluate(images, labels, dataset, **kwargs)
    if use_cache:
        path.write_text(json.dumps({"accuracies": res.accuracies, "seconds": res.seconds, "batched": res.batched,
                                    "train_losses": res.train_losses}))
    return res


def full_train_accuracy(dataset, *, model="convnet", net_width=None, net_depth=None, num_models: int = 2,
                        epochs: int = 30, seed: int = 0, batched: bool = True, progress: bool = False,
                        use_cache: bool = True) -> EvalResult:
    """The whole-training-set baseline, cached (JSON under the ddfast cache dir) per setting."""
    return cached_evaluate("full", dataset.x_train, dataset.y_train, dataset, use_cache=use_cache, model=model,
                           net_width=net_width, net_depth=net_depth, num_models=num_models, epochs=epochs, seed=seed,
                           batched=batched, progress=progress, desc="full training set")


class _CallableModule(type(copy)):
    """``ddfast.evaluate`` is both this module and the function (see ddfast.distill)."""

    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
