"""dm_step cases: DM's synthetic-image step (main_DM.py, ConvNet branch) — the per-class loop of
DiffAugment + embed + mean loss vs ``ddfast.DistributionMatcher`` (grouped DSA, two batched forwards,
fused class-mean loss), with DSA; the seeds are fixed per class."""
import torch
from torch import nn

import ddfast
from ddfast.compat.dc import ParamDiffAug
from ddfast.ops.distribution_matcher import dm_reference_loop
from ddfast.ops.gradient_matcher import ConvNet

from ..case import Case, persistent
from ..dc_diffaugment import dc_diff_augment
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
        return dc_diff_augment(images, STRATEGY, seed, param)  # DC's own, manual_seed per draw
    return dm_reference_loop(embed, x_real, y_real, x_syn, y_syn, num_classes, augment, class_seeds(num_classes))


def _fused(backend, embed, x_real, y_real, x_syn, y_syn, num_classes):
    if backend == "graph":  # the embeddings and the loss replayed from a CUDA graph; DSA eager
        matcher = persistent(embed, lambda: ddfast.DistributionMatcher(
            embed, num_classes, dsa_strategy=STRATEGY, dsa_rng="reference", cuda_graph=True))
    else:  # "bf16-real": the opt-in lossy mode, the real embeddings in bf16
        real_precision = "bf16" if backend == "bf16-real" else None
        matcher = ddfast.DistributionMatcher(embed, num_classes, dsa_strategy=STRATEGY, dsa_rng="reference",
                                             backend="auto" if real_precision else backend,
                                             real_precision=real_precision)
    return matcher(x_real, y_real, x_syn, y_syn, seeds=class_seeds(num_classes))


def _reference_device_rng(embed, x_real, y_real, x_syn, y_syn, num_classes):
    """DM's class loop with ddfast's device-drawn DSA, one call per class and side (torch ops): the
    draws depend on (seed, class, image), not on how the images are split into calls, so this is
    the oracle of the grouped device-RNG step."""
    seeds = class_seeds(num_classes)

    def augment(images, seed):
        groups = torch.full((images.shape[0],), seeds.index(seed), device=images.device)
        return ddfast.dsa_augment(images, groups, STRATEGY, seeds, rng="device", backend="torch")
    return dm_reference_loop(embed, x_real, y_real, x_syn, y_syn, num_classes, augment, seeds)


def _fused_device_rng(backend, embed, x_real, y_real, x_syn, y_syn, num_classes):
    if backend == "graph":
        matcher = persistent(embed, lambda: ddfast.DistributionMatcher(embed, num_classes, dsa_strategy=STRATEGY,
                                                                       cuda_graph=True))
    else:  # ddfast's default: DSA drawn on the device (no host sync); "modules": no norm_relu_pool
        matcher = ddfast.DistributionMatcher(embed, num_classes, dsa_strategy=STRATEGY,
                                             backend="auto" if backend == "modules" else backend,
                                             fuse_real=backend != "modules")
    return matcher(x_real, y_real, x_syn, y_syn, seeds=class_seeds(num_classes))


SIZES = (  # label, classes, real per class, ipc, image size, width, depth, default, device-RNG case too
    ("convnet2-tiny-c3-ipc2", 3, 8, 2, 16, 8, 2, True, True),
    ("convnet3-cifar10-ipc50", 10, 256, 50, 32, 128, 3, False, True),
    ("convnet3-cifar100-ipc10", 100, 256, 10, 32, 128, 3, False, False))


def cases():
    out = []
    for label, c, n_real, ipc, size, width, depth, default, device_rng in SIZES:
        shape = f"{c} classes x ({n_real} real + {ipc} syn), ConvNet-{depth} width {width}, {size}x{size}, DSA on"
        common = dict(make_inputs=_inputs(c, n_real, ipc, size, width, depth), backends=("auto",),
                      cuda_variants=("graph",), grad_inputs=("x_syn",), tol=1e-3, size=c * (n_real + ipc))
        out.append(Case(name=f"dm_step/{label}", reference=_reference, fused=_fused, default=default,
                        notes=shape, **dict(common, cuda_variants=("graph", "bf16-real"),
                                            approximate=("bf16-real",))))
        if device_rng:
            out.append(Case(name=f"dm_step/{label}-device-rng", reference=_reference_device_rng,
                            fused=_fused_device_rng, baselines={"dm-loop": _reference}, unchecked=("dm-loop",),
                            **dict(common, cuda_variants=("graph", "modules")),
                            notes=f"{shape}; ddfast's default DSA (drawn on the device); reference = DM's loop "
                                  f"with the same draws per class; dm-loop = DM's loop as users run it "
                                  f"(DiffAugment's host RNG: other draws, timed only); modules: the real side "
                                  f"without norm_relu_pool"))
    return out
