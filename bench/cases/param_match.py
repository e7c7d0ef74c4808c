"""param_match cases: MTT's loss over a flat parameter vector (ConvNet-3 ≈ 0.32M, ResNet-18 ≈ 11M)."""
import torch

import ddfast
from ddfast.ops.param_match import param_match_reference

from ..case import Case


def _inputs(n):
    def make(device):
        g = torch.Generator().manual_seed(0)
        target = torch.randn(n, generator=g)
        start = target + 0.1 * torch.randn(n, generator=g)
        student = (target + 0.05 * torch.randn(n, generator=g)).to(device).requires_grad_(True)
        return {"student": student, "start": start.to(device), "target": target.to(device)}
    return make


def cases():
    out = []
    for label, n, default in (("convnet3-320k", 320_010, True), ("resnet18-11M", 11_181_642, False),
                              ("flat-64M", 64 * 2**20, False)):
        out.append(Case(
            name=f"param_match/{label}",
            op="param_match",
            make_inputs=_inputs(n),
            reference=param_match_reference,
            fused=lambda backend, **kw: ddfast.param_match(**kw, backend=backend),
            grad_inputs=("student",),
            default=default,
            # forward reads s, a, t; backward reads s, t and writes grad: 6 vectors
            bytes_moved=lambda inp: 6 * inp["student"].numel() * inp["student"].element_size(),
            size=n,
        ))
    return out
