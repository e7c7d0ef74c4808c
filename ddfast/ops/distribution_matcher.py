"""DistributionMatcher — DM's whole synthetic-data step as a few batched calls (SPEC 3.3).

DatasetCondensation ``main_DM.py`` loops over classes: augment the class's real and synthetic
images with one DSA seed, embed them, add ``Σ (mean(out_real) − mean(out_syn))²``. Here:

1. DSA (optional): one grouped ``ddfast.dsa_augment`` call per side, group = class, the class's
   seed shared by its real and synthetic images (as the reference's per-class calls).
2. one forward of all real images (under ``no_grad``) and one of all synthetic images.
3. ``ddfast.class_mean_loss`` (or ``ddfast.mmd`` per class when ``loss="mmd"``).

For embeddings that treat samples independently (instance/group norm ConvNets, DM's default;
no BatchNorm in train mode) batching is exact, so loss and image gradients equal the loop's.
"""
from __future__ import annotations

import importlib
import time
from typing import Callable, Optional, Sequence

import torch

from .._checks import check_choice, check_float_tensor, check_labels, check_same_device
from .class_mean_loss import class_mean_loss
from .class_means import validate_num_classes


def dm_clock_seeds(num_classes: int) -> list:
    """DM's seeds: ``int(time.time() * 1000) % 100000`` taken once per class."""
    return [int(time.time() * 1000) % 100000 for _ in range(num_classes)]


def dm_reference_loop(embed: Callable, x_real: torch.Tensor, y_real: torch.Tensor, x_syn: torch.Tensor,
                      y_syn: torch.Tensor, num_classes: int, augment: Optional[Callable] = None,
                      seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
    """DM's class loop (main_DM.py, ConvNet branch); ``augment(images, seed)`` stands for DiffAugment."""
    loss = torch.zeros((), dtype=x_syn.dtype, device=x_syn.device)
    for c in range(num_classes):
        img_real, img_syn = x_real[y_real == c], x_syn[y_syn == c]
        if not len(img_real) or not len(img_syn):
            continue
        if augment is not None:
            img_real = augment(img_real, seeds[c])
            img_syn = augment(img_syn, seeds[c])
        output_real = embed(img_real).detach()
        output_syn = embed(img_syn)
        loss = loss + torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
    return loss


class DistributionMatcher:
    """``matcher(x_real, y_real, x_syn, y_syn, seeds=None)`` → DM's loss, differentiable w.r.t. x_syn.

    embed: the embedding network (e.g. ``net.embed`` of DC's ConvNet); its parameters are used as
    they are (DM freezes them). num_classes: default ``max label + 1`` per call.
    dsa_strategy: DSA strategy string (e.g. ``'color_crop_cutout_flip_scale_rotate'``); None or ""
    turns DSA off. dsa_param: a ``ParamDiffAug``; align_corners as ``dsa_augment``.
    seed_fn: ``seed_fn(num_classes)`` → one seed per class when a call gives no ``seeds`` (default:
    DM's clock-based seeds; pass your own for reproducible runs).
    loss: "mean" (DM/CAFE's class-mean loss) or "mmd" (``ddfast.mmd`` per class, ``mmd_kwargs``).
    """

    def __init__(self, embed: Callable, num_classes: Optional[int] = None, *, dsa_strategy: Optional[str] = None,
                 dsa_param=None, align_corners: bool = False, seed_fn: Optional[Callable[[int], Sequence[int]]] = None,
                 loss: str = "mean", mmd_kwargs: Optional[dict] = None, backend: str = "auto"):
        if not callable(embed):
            raise TypeError(f"embed must be callable (an nn.Module or function), got {type(embed).__name__}")
        self.embed = embed
        self.num_classes = None if num_classes is None else validate_num_classes(num_classes)
        self.dsa_strategy = dsa_strategy or None
        self.dsa_param = dsa_param
        self.align_corners = align_corners
        self.seed_fn = seed_fn or dm_clock_seeds
        self.loss = check_choice("loss", loss, ("mean", "mmd"))
        self.mmd_kwargs = dict(mmd_kwargs or {})
        self.backend = backend
        if self.loss == "mmd":
            self._mmd = _optional("ddfast.ops.mmd", "mmd", "loss='mmd'")
        if self.dsa_strategy is not None:
            self._dsa = _optional("ddfast.ops.dsa", "dsa_augment", "dsa_strategy")

    def _augment(self, x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return self._dsa(x, y, self.dsa_strategy, seeds, align_corners=self.align_corners, param=self.dsa_param)

    def __call__(self, x_real: torch.Tensor, y_real: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor,
                 seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        check_float_tensor("x_real", x_real, min_dim=1)
        check_float_tensor("x_syn", x_syn, min_dim=1)
        check_same_device(x_real=x_real, y_real=y_real, x_syn=x_syn, y_syn=y_syn)
        check_labels("y_real", y_real, x_real.shape[0], self.num_classes)
        check_labels("y_syn", y_syn, x_syn.shape[0], self.num_classes)
        num_classes = self.num_classes or int(max(int(y_real.max()), int(y_syn.max()))) + 1
        if self.dsa_strategy is not None:
            seeds = list(self.seed_fn(num_classes) if seeds is None else seeds)
            if len(seeds) < num_classes:
                raise ValueError(f"seeds must give one seed per class ({num_classes}), got {len(seeds)}")
            with torch.no_grad():
                x_real = self._augment(x_real, y_real, seeds)
            x_syn = self._augment(x_syn, y_syn, seeds)
        with torch.no_grad():
            f_real = self.embed(x_real)
        f_syn = self.embed(x_syn)
        if self.loss == "mmd":
            return self._mmd(f_real.reshape(f_real.shape[0], -1), f_syn.reshape(f_syn.shape[0], -1), x_labels=y_real,
                             y_labels=y_syn, num_classes=num_classes, backend=self.backend, **self.mmd_kwargs)
        return class_mean_loss(f_real, y_real, f_syn, y_syn, num_classes, backend=self.backend)


def _optional(module: str, name: str, what: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ValueError(f"{what} needs ddfast.{name}, which this installation lacks ({exc})") from exc
