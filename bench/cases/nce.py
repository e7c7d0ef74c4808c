"""supcon_nce cases: MIM4DD's contrastive score, n_syn synthetic anchors against n_real real samples.

Sizes: 1000 synthetic images (CIFAR-100, 10 per class) against a 65536-sample real batch, with a
128-d projection (MIM4DD's head) or raw 2048-d features (ResNet-50 penultimate layer).
"""
import torch

import ddfast
from ddfast.ops.supcon_nce import supcon_nce_reference

from ..case import Case

NUM_CLASSES = 100


def _inputs(n_syn, n_real, dim):
    def make(device):
        g = torch.Generator().manual_seed(0)
        f_syn = torch.randn(n_syn, dim, generator=g).to(device).requires_grad_(True)
        f_real = torch.randn(n_real, dim, generator=g).to(device).requires_grad_(True)
        y_syn = (torch.arange(n_syn) % NUM_CLASSES).to(device)
        y_real = torch.randint(0, NUM_CLASSES, (n_real,), generator=g).to(device)
        return {"f_syn": f_syn, "y_syn": y_syn, "f_real": f_real, "y_real": y_real}
    return make


def _pairs_times_dim(inp):
    return inp["f_syn"].shape[0] * inp["f_real"].shape[0] * inp["f_syn"].shape[1]


def cases():
    out = []
    for n_syn, n_real, dim, default in ((128, 2048, 64, True), (1000, 65536, 128, False), (1000, 65536, 2048, False)):
        out.append(Case(
            name=f"nce/infonce-ns{n_syn}-nr{n_real}-d{dim}",
            op="supcon_nce",
            make_inputs=_inputs(n_syn, n_real, dim),
            reference=supcon_nce_reference,
            fused=lambda backend, **kw: ddfast.supcon_nce(**kw, backend=backend),
            grad_inputs=("f_syn", "f_real"),
            default=default,
            # useful work: logits z_syn z_realᵀ, then dL/ds z_real and dL/dsᵀ z_syn (2 flops per MAC);
            # the fused backward also recomputes the logits, which is not counted
            flops=lambda inp: 6.0 * _pairs_times_dim(inp),
            # features read by forward and backward, gradients written
            bytes_moved=lambda inp: 4 * (inp["f_syn"].numel() + inp["f_real"].numel()) * inp["f_syn"].element_size(),
            size=n_syn * n_real,
            notes="infonce, T=0.1, L2-normalised, 100 classes",
        ))
    return out
