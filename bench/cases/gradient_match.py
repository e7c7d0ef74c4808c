"""gradient_match cases: DC's per-class distance over a model's parameter gradients, all classes
grouped (leading axis 10): ConvNet-3 width 128 on 3×32×32 (≈0.32M parameters per class) and a
CIFAR ResNet-18 (≈11.2M per class, its largest rows 512 × 4608).

The synthetic gradients are one flat leaf (so the runner can compare its .grad) viewed as the
per-tensor gradients; reference and fused calls see the same views.
"""
import math

import torch

import ddfast
from ddfast.ops.gradient_match import gradient_match_reference

from ..case import Case

CLASSES = 10


def convnet3_shapes(width=128, channels=3, im=32, classes=CLASSES):
    shapes, c = [], channels
    for _ in range(3):  # conv, conv bias, instancenorm weight and bias
        shapes += [(width, c, 3, 3), (width,), (width,), (width,)]
        c, im = width, im // 2
    return shapes + [(classes, width * im * im), (classes,)]


def resnet18_shapes(classes=CLASSES):
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    c = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            shapes += [(width, c, 3, 3), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            if first and (stride != 1 or c != width):
                shapes += [(width, c, 1, 1), (width,), (width,)]
            c = width
    return shapes + [(classes, 512), (classes,)]


def _split(flat, shapes):
    sizes = [CLASSES * math.prod(s) for s in shapes]
    return [t.view(CLASSES, *s) for t, s in zip(flat.split(sizes), shapes)]


def _inputs(shapes):
    def make(device):
        g = torch.Generator().manual_seed(0)
        n = CLASSES * sum(math.prod(s) for s in shapes)
        real = torch.randn(n, generator=g)
        syn = real + 0.5 * torch.randn(n, generator=g)
        return {"syn": syn.to(device).requires_grad_(True), "real": real.to(device), "shapes": shapes}
    return make


def _reference(syn, real, shapes):
    return gradient_match_reference(_split(syn, shapes), _split(real, shapes), grouped=True)


def _fused(backend, syn, real, shapes):
    return ddfast.gradient_match(_split(syn, shapes), _split(real, shapes), grouped=True, backend=backend)


def cases():
    out = []
    for label, shapes, default in (("convnet3-cifar10-c10", convnet3_shapes(), True),
                                   ("resnet18-c10", resnet18_shapes(), False)):
        numel = CLASSES * sum(math.prod(s) for s in shapes)
        out.append(Case(
            name=f"gradient_match/{label}",
            op="gradient_match",
            make_inputs=_inputs(shapes),
            reference=_reference,
            fused=_fused,
            grad_inputs=("syn",),
            default=default,
            # forward reads syn and real; backward reads both again and writes the syn gradient
            bytes_moved=lambda inp: 5 * inp["syn"].numel() * inp["syn"].element_size(),
            flops=lambda inp: 10 * inp["syn"].numel(),
            size=numel,
            notes="metric 'ours', grouped over 10 classes, reduction sum",
        ))
    return out
