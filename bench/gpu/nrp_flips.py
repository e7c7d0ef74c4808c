"""Why norm_relu_pool/cifar10-real2560-w128 [triton] misses the float64 check: counts the input-gradient
elements that differ from float64 by more than 1e-3 of the max, for the fp32 reference and Triton,
and how many of those sit where the pre-activation is within 1e-5 of zero (a ReLU mask flip)."""
import torch
import ddfast
from ddfast.ops.norm_relu_pool import norm_relu_pool_reference

g = torch.Generator().manual_seed(0)
x = (torch.randn(2560, 128, 32, 32, generator=g) * 3 + 1).cuda()
w, b = torch.randn(128, generator=g).cuda(), torch.randn(128, generator=g).cuda()


def grad(fn, dtype):
    xi = x.detach().clone().to(dtype).requires_grad_(True)  # a fresh leaf: no gradient accumulates across calls
    out = fn(xi, w.to(dtype), b.to(dtype))
    out.backward(torch.ones_like(out))
    return out.detach().double(), xi.grad.double()


o64, g64 = grad(lambda a, c, d: norm_relu_pool_reference(a, c, d, 1e-5, True), torch.float64)
xd = x.double()
mu = xd.mean((2, 3), keepdim=True); var = xd.var((2, 3), unbiased=False, keepdim=True)
pre = (xd - mu) / (var + 1e-5).sqrt() * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
near = pre.abs() < 1e-5
print("elements near the ReLU boundary:", int(near.sum()))
for name, fn in (("reference", lambda a, c, d: norm_relu_pool_reference(a, c, d, 1e-5, True)),
                 ("triton", lambda a, c, d: ddfast.norm_relu_pool(a, c, d, 1e-5, True, backend="triton"))):
    o, gx = grad(fn, torch.float32)
    err = (gx - g64).abs() / g64.abs().max()
    bad = err > 1e-3
    print(f"{name}: out err {((o - o64).abs().max() / o64.abs().max()).item():.3e}  grad max err {err.max().item():.3e}"
          f"  bad {int(bad.sum())}  bad & near-boundary {int((bad & near).sum())}"
          f"  max err off the boundary {err[~near].max().item():.3e}")
