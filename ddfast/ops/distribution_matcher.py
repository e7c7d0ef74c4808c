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

import time
from typing import Callable, Optional, Sequence

import torch

from .._checks import (acc_dtype, check_choice, check_float_tensor, check_labels, check_num_classes, check_same_device,
                       infer_num_classes)
from .class_mean_loss import class_mean_loss
from .class_means import class_means
from .dsa import dsa_augment
from .mmd import mmd


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
    real_chunk_size: with loss "mean", embed the real images this many at a time and keep only
    their per-class feature sums, so activation memory no longer grows with the real batch (e.g.
    CIFAR-100 × 256 real images); the loss is unchanged up to fp rounding.
    """

    def __init__(self, embed: Callable, num_classes: Optional[int] = None, *, dsa_strategy: Optional[str] = None,
                 dsa_param=None, align_corners: bool = False, seed_fn: Optional[Callable[[int], Sequence[int]]] = None,
                 loss: str = "mean", mmd_kwargs: Optional[dict] = None, backend: str = "auto",
                 real_chunk_size: Optional[int] = None):
        if not callable(embed):
            raise TypeError(f"embed must be callable (an nn.Module or function), got {type(embed).__name__}")
        self.embed = embed
        self.num_classes = None if num_classes is None else check_num_classes(num_classes)
        self.dsa_strategy = dsa_strategy or None
        self.dsa_param = dsa_param
        self.align_corners = align_corners
        self.seed_fn = seed_fn or dm_clock_seeds
        self.loss = check_choice("loss", loss, ("mean", "mmd"))
        self.mmd_kwargs = dict(mmd_kwargs or {})
        self.backend = backend
        if real_chunk_size is not None and (isinstance(real_chunk_size, bool) or not isinstance(real_chunk_size, int)
                                            or real_chunk_size <= 0):
            raise ValueError(f"real_chunk_size must be a positive int or None, got {real_chunk_size!r}")
        if real_chunk_size is not None and self.loss != "mean":
            raise ValueError("real_chunk_size works with loss='mean' only (mmd needs every real feature)")
        self.real_chunk_size = real_chunk_size

    def _augment(self, x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return dsa_augment(x, y, self.dsa_strategy, seeds, align_corners=self.align_corners, param=self.dsa_param)

    def __call__(self, x_real: torch.Tensor, y_real: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor,
                 seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        check_float_tensor("x_real", x_real, min_dim=1)
        check_float_tensor("x_syn", x_syn, min_dim=1)
        check_same_device(x_real=x_real, y_real=y_real, x_syn=x_syn, y_syn=y_syn)
        check_labels("y_real", y_real, x_real.shape[0], self.num_classes)
        check_labels("y_syn", y_syn, x_syn.shape[0], self.num_classes)
        num_classes = self.num_classes or infer_num_classes(y_real, y_syn)
        if self.dsa_strategy is not None:
            seeds = list(self.seed_fn(num_classes) if seeds is None else seeds)
            if len(seeds) < num_classes:
                raise ValueError(f"seeds must give one seed per class ({num_classes}), got {len(seeds)}")
            with torch.no_grad():
                x_real = self._augment(x_real, y_real, seeds)
            x_syn = self._augment(x_syn, y_syn, seeds)
        with torch.no_grad():
            if self.real_chunk_size is not None and x_real.shape[0] > self.real_chunk_size:
                f_real, y_real = self._real_class_means(x_real, y_real, num_classes)
            else:
                f_real = self.embed(x_real)
        f_syn = self.embed(x_syn)
        if self.loss == "mmd":
            return mmd(f_real.reshape(f_real.shape[0], -1), f_syn.reshape(f_syn.shape[0], -1), x_labels=y_real,
                             y_labels=y_syn, num_classes=num_classes, backend=self.backend, **self.mmd_kwargs)
        return class_mean_loss(f_real, y_real, f_syn, y_syn, num_classes, backend=self.backend)

    def _real_class_means(self, x_real: torch.Tensor, y_real: torch.Tensor, num_classes: int):
        """Per-class mean real features (one row per present class) from chunked forwards: the
        mean of a one-sample class is that sample, so class_mean_loss on these rows is DM's loss."""
        sums, counts, shape = None, None, None
        for start in range(0, x_real.shape[0], self.real_chunk_size):
            f = self.embed(x_real[start:start + self.real_chunk_size])
            shape = f.shape[1:]
            f = f.reshape(f.shape[0], -1)
            acc = acc_dtype(f.dtype)
            means, n = class_means(f.to(acc), y_real[start:start + self.real_chunk_size], num_classes,
                                   backend=self.backend)
            part = means * n.to(acc).unsqueeze(1)
            sums = part if sums is None else sums + part
            counts = n if counts is None else counts + n
        present = (counts > 0).nonzero().flatten()
        means = sums[present] / counts[present].to(sums.dtype).unsqueeze(1)
        return means.reshape((len(present),) + tuple(shape)), present
