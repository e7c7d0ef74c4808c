"""DM (Zhao & Bilen, WACV 2023) on ``ddfast.DistributionMatcher``.

One iteration, as DatasetCondensation's ``main_DM.py``: a fresh randomly initialised network with
frozen weights; real and synthetic images of every class augmented with one DSA seed per class;
``Σ_c ‖mean embed(real_c) − mean embed(syn_c)‖²`` (``ddfast.class_mean_loss``); one SGD step on the
images.

Reference hyper-parameters (CIFAR-10): lr_img 1.0 (SGD, momentum 0.5), batch_real 256 per class,
real init, DSA 'color_crop_cutout_flip_scale_rotate', 20000 iterations. Scaled to digits: the same
rate, batch and DSA, ConvNet width 32 depth 2, 200 iterations (CPU budget).
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import Dataset, RealData
from ..models import embed
from ..ops.distribution_matcher import DistributionMatcher
from ._common import DSA_STRATEGY, IterativeMethod, SyntheticSet
from .dc import scaled_common


class DM(IterativeMethod):
    name = "dm"

    @classmethod
    def default_hparams(cls, dataset: Dataset, ipc: int = 10) -> dict:
        return dict(scaled_common(dataset, ipc), lr_img=1.0, dsa_strategy=DSA_STRATEGY, dsa_rng="fast",
                    iterations=200, real_precision=None)

    def step(self, iteration: int, real: RealData, syn: SyntheticSet) -> torch.Tensor:
        net = self.new_network(iteration)
        for p in net.parameters():
            p.requires_grad_(False)
        net.train()
        # modules, not a closure: the matcher sees the layers (its "auto" real-side chunking, and
        # the fused norm → ReLU → pool blocks of a Sequential); the same modules, not copies
        embed_fn = net.embed if callable(getattr(net, "embed", None)) else (
            nn.Sequential(net.features, nn.Flatten()) if isinstance(getattr(net, "features", None), nn.Module)
            else (lambda x: embed(net, x)))
        matcher = DistributionMatcher(embed_fn, self.num_classes,
                                      real_precision=self.hp.get("real_precision"))
        x_real, y_real = self.real_batch(real, self.hp["batch_real"], iteration)
        x_syn, y_syn = syn.images(), syn.labels
        x_real, x_syn = self.augment_pair(x_real, y_real, x_syn, y_syn, iteration)  # DM's per-class seeds
        loss = matcher(x_real, y_real, x_syn, y_syn)
        return self.update(loss, syn, net, x_syn, y_syn, x_real, y_real)
