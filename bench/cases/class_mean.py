"""class_mean cases: segmented per-class means (class_means) and DM's loss (class_mean_loss).

Sizes: CIFAR-100-like feature banks (D = 2048, ConvNet-3's embedding at 32×32) — ``n65536-d2048-c100``
is 512 MiB of fp32 features. GB/s counts the minimal fwd+bwd traffic, so it compares to copy bandwidth.
"""
import torch

import ddfast
from ddfast.ops.class_mean_loss import class_mean_loss_reference
from ddfast.ops.class_means import class_means_reference

from ..case import Case


def _means_inputs(n, d, c):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g).to(device).requires_grad_(True)
        labels = torch.randint(0, c, (n,), generator=g).to(device)
        return {"x": x, "labels": labels}
    return make


def _loss_inputs(n_real, n_syn, d, c):
    def make(device):
        g = torch.Generator().manual_seed(0)
        f_real = torch.randn(n_real, d, generator=g).to(device)
        y_real = torch.randint(0, c, (n_real,), generator=g).to(device)
        f_syn = torch.randn(n_syn, d, generator=g).to(device).requires_grad_(True)
        y_syn = torch.arange(c).repeat_interleave(n_syn // c).to(device)
        return {"f_real": f_real, "y_real": y_real, "f_syn": f_syn, "y_syn": y_syn}
    return make


def cases():
    out = []
    for n, d, c, default in ((4096, 512, 10, True), (65536, 2048, 100, False)):
        out.append(Case(
            name=f"class_mean/n{n}-d{d}-c{c}",
            op="class_means",
            make_inputs=_means_inputs(n, d, c),
            reference=lambda x, labels, c=c: class_means_reference(x, labels, c)[0],
            fused=lambda backend, x, labels, c=c: ddfast.class_means(x, labels, c, backend=backend)[0],
            grad_inputs=("x",),
            default=default,
            # forward reads x, writes the means; backward reads the mean grads, writes grad_x
            bytes_moved=lambda inp, c=c: (2 * inp["x"].numel() + 2 * c * inp["x"].shape[1]) * inp["x"].element_size(),
            size=n * d,
        ))
    for n_real, n_syn, d, c, default in ((2560, 100, 512, 10, True), (25600, 1000, 2048, 100, False),
                                         (65536, 5000, 2048, 100, False)):
        out.append(Case(
            name=f"class_mean/loss-real{n_real}-syn{n_syn}-d{d}-c{c}",
            op="class_mean_loss",
            make_inputs=_loss_inputs(n_real, n_syn, d, c),
            reference=lambda c=c, **kw: class_mean_loss_reference(**kw, num_classes=c),
            fused=lambda backend, c=c, **kw: ddfast.class_mean_loss(**kw, num_classes=c, backend=backend),
            grad_inputs=("f_syn",),
            default=default,
            # real features read once; syn features read forward, their gradient written backward
            bytes_moved=lambda inp: (inp["f_real"].numel() + 2 * inp["f_syn"].numel()) * inp["f_syn"].element_size(),
            size=(n_real + n_syn) * d,
        ))
    return out
