"""norm_relu_pool cases: DC ConvNet's instance norm → ReLU → 2×2 average pool after a convolution
(ConvNet-3 width 128 on CIFAR: the first block's input is (N, 128, 32, 32)), forward + input
gradient as the real side of DC's segmented step runs it, and forward only as DM's real side does;
the reference is the three modules (GroupNorm(C, C), ReLU, AvgPool2d(2))."""
import torch

import ddfast
from ddfast.ops.norm_relu_pool import norm_relu_pool_reference

from ..case import Case


def _inputs(n, c, size, grad):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, c, size, size, generator=g) * 3 + 1).to(device).requires_grad_(grad)
        return {"x": x, "weight": torch.randn(c, generator=g).to(device), "bias": torch.randn(c, generator=g).to(device)}
    return make


def _reference(x, weight, bias):
    with torch.set_grad_enabled(x.requires_grad):
        return norm_relu_pool_reference(x, weight, bias, 1e-5, True)


def _fused(backend, x, weight, bias):
    with torch.set_grad_enabled(x.requires_grad):
        return ddfast.norm_relu_pool(x, weight, bias, 1e-5, True, backend=backend)


def _bytes(grad):
    # forward: read x, write the pooled quarter; backward: read x and the pooled gradient, write dx
    return lambda inp: inp["x"].numel() * inp["x"].element_size() * (3.5 if grad else 1.25)


def cases():
    out = []
    for label, n, c, size, default, devices in (("real256-w32-16px", 256, 32, 16, True, ("cpu", "cuda")),
                                                ("cifar10-real2560-w128", 2560, 128, 32, False, ("cuda",)),
                                                ("cifar10-real2560-w128-layer2", 2560, 128, 16, False, ("cuda",))):
        for grad in (True, False):
            out.append(Case(name=f"norm_relu_pool/{label}" + ("" if grad else "-fwd"), op="norm_relu_pool",
                            make_inputs=_inputs(n, c, size, grad), reference=_reference, fused=_fused,
                            backends=("triton",), default=default and grad, devices=devices,
                            grad_inputs=("x",) if grad else (), bytes_moved=_bytes(grad), size=n * c * size * size,
                            notes=f"({n}, {c}, {size}, {size}) fp32, " + ("forward + input gradient" if grad
                                                                          else "forward only")))
    return out
