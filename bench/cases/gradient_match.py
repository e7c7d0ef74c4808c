"""gradient_match cases: DC's per-class distance over a model's parameter gradients, all classes
grouped (leading axis 10): ConvNet-3 width 128 on 3×32×32 (≈0.32M parameters per class) and a
CIFAR ResNet-18 (≈11.2M per class, its largest rows 512 × 4608).

The synthetic gradients are one leaf per tensor, as a model's parameter gradients are (the runner
compares their .grad flattened). They were one flat leaf viewed as the tensors: autograd then
concatenated the 62 view gradients of ResNet-18 into the flat .grad, two more passes over the
synthetic side that no user runs, counted in the kernel time (68 % of the copy peak on an H100,
d37bfa9, against the 5-pass bytes model; with the concatenation's 2 passes, 95 %).

Two baselines: ``reference`` is the grouped torch computation (all classes at once, per tensor);
``dc-loop`` is what DatasetCondensation users run: ``match_loss`` called once per class, each a
Python loop over the parameter tensors (``distance_wb``), accumulated into a tensor.
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
        return {"syn": [t.contiguous().requires_grad_(True) for t in _split(syn.to(device), shapes)],
                "real": [t.contiguous() for t in _split(real.to(device), shapes)]}
    return make


def _numel(tensors):
    return sum(t.numel() for t in tensors)


def _reference(syn, real):
    return gradient_match_reference(syn, real, grouped=True)


def dc_distance_wb(gwr, gws):
    """DC's per-tensor distance: per output row 1 − <r,s>/(‖r‖‖s‖ + 1e-6), summed; rank-3/4
    tensors flattened behind their first axis; rank-1 tensors give a new float32 zero tensor."""
    if gwr.dim() == 1:
        return torch.tensor(0, dtype=torch.float, device=gwr.device)
    r = gwr.reshape(gwr.shape[0], -1)
    s = gws.reshape(r.shape)
    return torch.sum(1 - torch.sum(r * s, dim=-1) / (torch.norm(r, dim=-1) * torch.norm(s, dim=-1) + 0.000001))


def dc_match_loss(gw_syn, gw_real, device):
    """DC's match_loss with dis_metric 'ours': a zero tensor moved to the device, += each tensor's distance."""
    dis = torch.tensor(0.0).to(device)
    for gwr, gws in zip(gw_real, gw_syn):
        dis += dc_distance_wb(gwr, gws)
    return dis


def _dc_loop(syn, real):
    """DC main.py's class loop around match_loss (the real gradients are detached, as DC clones them)."""
    device = syn[0].device
    loss = torch.tensor(0.0).to(device)
    for c in range(CLASSES):
        loss += dc_match_loss([s[c] for s in syn], [r[c].detach() for r in real], device)
    return loss


def _fused(backend, syn, real):
    return ddfast.gradient_match(syn, real, grouped=True, backend=backend)


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
            baselines={"dc-loop": _dc_loop},
            grad_inputs=("syn",),
            default=default,
            # forward reads syn and real; backward reads both again and writes the syn gradient
            bytes_moved=lambda inp: 5 * _numel(inp["syn"]) * inp["syn"][0].element_size(),
            flops=lambda inp: 10 * _numel(inp["syn"]),
            size=numel,
            notes="metric 'ours', grouped over 10 classes, reduction sum; reference = grouped torch computation, "
                  "dc-loop = DC's match_loss called per class (a loop over classes and tensors)",
        ))
    return out
