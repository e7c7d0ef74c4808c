"""mmd cases: Gaussian MMD² with 5 default bandwidths, forward + backward to both feature sets.

The reference materialises the kernel matrices (torch.cdist → exp per bandwidth); the fused
kernels recompute distance tiles and keep memory O(N + M).
"""
import torch

import ddfast
from ddfast.ops.mmd import mmd_reference

from ..case import Case


def _inputs(n, m, dim, classes):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, dim, generator=g)
        y = torch.randn(m, dim, generator=g) * 1.1 + 0.1
        inputs = {"x": x.to(device).requires_grad_(True), "y": y.to(device).requires_grad_(True)}
        if classes > 1:
            inputs["x_labels"] = torch.randint(0, classes, (n,), generator=g).to(device)
            inputs["y_labels"] = torch.randint(0, classes, (m,), generator=g).to(device)
            inputs["num_classes"] = classes
        return inputs
    return make


def _pair_count(inp):
    """Same-class (x, x'), (y, y') and (x, y) pairs: what the estimator needs."""
    if "x_labels" not in inp:
        n, m = inp["x"].shape[0], inp["y"].shape[0]
        return n * n + m * m + n * m
    c = inp["num_classes"]
    n_c = torch.bincount(inp["x_labels"], minlength=c).double()
    m_c = torch.bincount(inp["y_labels"], minlength=c).double()
    return float((n_c * n_c + m_c * m_c + n_c * m_c).sum())


def _flops(inp):
    # per pair a D-long dot product (2D) forward and two D-long products backward (4D): 6D
    return 6 * inp["x"].shape[1] * _pair_count(inp)


def _bytes(inp):
    # read x and y forward and backward (twice there: distance tiles and P·Z), write both gradients
    x, y = inp["x"], inp["y"]
    return 4 * (x.numel() + y.numel()) * x.element_size()


def cases():
    out = []
    for label, n, dim, classes, default in (("gaussian5-n256-d64", 256, 64, 1, True),
                                            ("gaussian5-n8192-d2048", 8192, 2048, 1, False),
                                            ("gaussian5-c10-n5000-d2048", 5000, 2048, 10, False)):
        out.append(Case(
            name=f"mmd/{label}",
            op="mmd",
            make_inputs=_inputs(n, n, dim, classes),
            reference=mmd_reference,
            fused=lambda backend, **kw: ddfast.mmd(**kw, backend=backend),
            grad_inputs=("x", "y"),
            default=default,
            flops=_flops,
            bytes_moved=_bytes,
            size=2 * n * dim,
            devices=("cpu", "cuda") if default else ("cuda",),  # GPU sizes: hours on a small CPU
            notes="per-set N = M; 5 bandwidths around the median distance; fwd + bwd to x and y",
        ))
    return out
