"""dm_step cases: DM's synthetic-image step (main_DM.py, ConvNet branch) — the per-class loop of
DiffAugment + embed + mean loss vs ``ddfast.DistributionMatcher`` (grouped DSA, two batched forwards,
fused class-mean loss), with DSA; the seeds are fixed per class."""
import torch
from torch import nn

import ddfast
from ddfast.compat.dc import DiffAugment, ParamDiffAug
from ddfast.ops.distribution_matcher import dm_reference_loop
from ddfast.ops.gradient_matcher import ConvNet

from ..case import Case, persistent
from .dsa import STRATEGY, class_seeds


def convnet_embed(channel=3, width=128, depth=3, size=32):
    """DC's ConvNet-D feature extractor (instance norm) as DM uses it: ``features`` then flatten."""
    return nn.Sequential(*ConvNet(channel, 1, width=width, depth=depth, im_size=size).features, nn.Flatten())


def _inputs(num_classes, n_real, ipc, size, width, depth):
    def make(device):
        torch.manual_seed(0)
        embed = convnet_embed(3, width, depth, size).to(device)
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


def _reference(embed, x_real, y_real, x_syn, y_syn, num_classes):
    param = ParamDiffAug()

    def augment(images, seed):
        return DiffAugment(images, STRATEGY, seed=seed, param=param)
    return dm_reference_loop(embed, x_real, y_real, x_syn, y_syn, num_classes, augment, class_seeds(num_classes))


def _fused(backend, embed, x_real, y_real, x_syn, y_syn, num_classes):
    if backend == "graph":  # the embeddings and the loss replayed from a CUDA graph; DSA eager
        matcher = persistent(embed, lambda: ddfast.DistributionMatcher(
            embed, num_classes, dsa_strategy=STRATEGY, dsa_rng="reference", cuda_graph=True))
    else:
        matcher = ddfast.DistributionMatcher(embed, num_classes, dsa_strategy=STRATEGY, backend=backend,
                                             dsa_rng="reference")
    return matcher(x_real, y_real, x_syn, y_syn, seeds=class_seeds(num_classes))


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
            cuda_variants=("graph",),
            grad_inputs=("x_syn",),
            default=default,
            tol=1e-3,
            size=c * (n_real + ipc),
            notes=f"{c} classes x ({n_real} real + {ipc} syn), ConvNet-{depth} width {width}, "
                  f"{size}x{size}, DSA on",
        ))
    return out
