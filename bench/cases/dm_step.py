"""dm_step cases: DM's synthetic-image step (main_DM.py, ConvNet branch) — the per-class loop of
DiffAugment + embed + mean loss vs ``ddfast.DistributionMatcher`` (grouped DSA, two batched forwards,
fused class-mean loss). DSA is on when ``ddfast.dsa_augment`` exists; the seeds are fixed per class."""
import importlib.util

import torch
from torch import nn

import ddfast
from ddfast.ops.distribution_matcher import dm_reference_loop

from ..case import Case

STRATEGY = "color_crop_cutout_flip_scale_rotate"
HAS_DSA = importlib.util.find_spec("ddfast.ops.dsa") is not None and \
    importlib.util.find_spec("ddfast.compat._dc_dsa") is not None


def convnet_embed(channel=3, width=128, depth=3):
    """DC's ConvNet-D feature extractor with instance norm: (conv3x3 → GroupNorm(w, w) → ReLU → AvgPool2) × D."""
    layers, c = [], channel
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                   nn.AvgPool2d(2)]
        c = width
    return nn.Sequential(*layers, nn.Flatten())


def _inputs(num_classes, n_real, ipc, size, width, depth):
    def make(device):
        torch.manual_seed(0)
        embed = convnet_embed(3, width, depth).to(device)
        for p in embed.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        x_real = torch.randn(num_classes * n_real, 3, size, size, generator=g).to(device)
        y_real = torch.arange(num_classes).repeat_interleave(n_real).to(device)
        x_syn = torch.randn(num_classes * ipc, 3, size, size, generator=g).to(device).requires_grad_(True)
        y_syn = torch.arange(num_classes).repeat_interleave(ipc).to(device)
        return {"embed": embed, "x_real": x_real, "y_real": y_real, "x_syn": x_syn, "y_syn": y_syn,
                "num_classes": num_classes}
    return make


def _seeds(num_classes):
    return [1000 + 7 * c for c in range(num_classes)]


def _reference(embed, x_real, y_real, x_syn, y_syn, num_classes):
    augment = None
    if HAS_DSA:
        from ddfast.compat.dc import DiffAugment, ParamDiffAug

        param = ParamDiffAug()

        def augment(images, seed):
            return DiffAugment(images, STRATEGY, seed=seed, param=param)
    return dm_reference_loop(embed, x_real, y_real, x_syn, y_syn, num_classes, augment, _seeds(num_classes))


def _fused(backend, embed, x_real, y_real, x_syn, y_syn, num_classes):
    matcher = ddfast.DistributionMatcher(embed, num_classes, dsa_strategy=STRATEGY if HAS_DSA else None,
                                         backend=backend)
    return matcher(x_real, y_real, x_syn, y_syn, seeds=_seeds(num_classes))


def cases():
    out = []
    for label, c, n_real, ipc, size, width, depth, default in (
            ("convnet2-tiny-c3-ipc2", 3, 8, 2, 16, 8, 2, True),
            ("convnet3-cifar10-ipc50", 10, 256, 50, 32, 128, 3, False),
            ("convnet3-cifar100-ipc10", 100, 256, 10, 32, 128, 3, False)):
        out.append(Case(
            name=f"dm_step/{label}",
            make_inputs=_inputs(c, n_real, ipc, size, width, depth),
            reference=_reference,
            fused=_fused,
            backends=("auto",),
            grad_inputs=("x_syn",),
            default=default,
            tol=1e-3,
            size=c * (n_real + ipc),
            notes=f"{c} classes x ({n_real} real + {ipc} syn), ConvNet-{depth} width {width}, "
                  f"{size}x{size}, DSA {'on' if HAS_DSA else 'off (dsa_augment missing)'}",
        ))
    return out
