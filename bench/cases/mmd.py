"""mmd cases: Gaussian MMD² with 5 default bandwidths, forward + backward to both feature sets.

The reference materialises the kernel matrices (torch.cdist → exp per bandwidth); the fused
kernels recompute distance tiles and keep memory O(N + M).

Precision variants run the reference and ddfast at the same precision: ``-tf32`` sets torch's
fp32 matmul precision to TF32 for the reference and passes ``precision="tf32"`` to ddfast;
``-bf16`` feeds bf16 features to both (fp32 accumulation). ``gaussian5-n65536-d128`` is beyond the
eager reference (see its notes); its reference is the same formula evaluated in row blocks under
activation checkpointing (memory O(block · N)), so the check still compares against torch.

Work model (``work_flops``): the reference executes 2D flops per ordered pair forward (cdist via
matmul) and 4D backward, over N² + M² + NM pairs; the Triton kernels execute the upper-triangle
forward tiles, every tile once more in the backward, and the P·Z product, tile padding included
(``ddfast.kernels.mmd.Tiling.executed_flops``).
"""
import contextlib

import torch
import torch.utils.checkpoint

import ddfast
from ddfast.ops.mmd import median_bandwidths, mmd_reference

from ..case import Case


def _inputs(n, m, dim, classes, dtype=torch.float32):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, dim, generator=g)
        y = torch.randn(m, dim, generator=g) * 1.1 + 0.1
        inputs = {"x": x.to(device, dtype).requires_grad_(True), "y": y.to(device, dtype).requires_grad_(True)}
        if classes > 1:
            inputs["x_labels"] = torch.randint(0, classes, (n,), generator=g).to(device)
            inputs["y_labels"] = torch.randint(0, classes, (m,), generator=g).to(device)
            inputs["num_classes"] = classes
        return inputs
    return make


def _class_sizes(inp):
    """(n_c, m_c) per class as float64 CPU tensors (one class without labels)."""
    if "x_labels" not in inp:
        return (torch.tensor([float(inp["x"].shape[0])], dtype=torch.float64),
                torch.tensor([float(inp["y"].shape[0])], dtype=torch.float64))
    c = inp["num_classes"]
    return (torch.bincount(inp["x_labels"].cpu(), minlength=c).double(),
            torch.bincount(inp["y_labels"].cpu(), minlength=c).double())


def _pair_count(inp):
    """Same-class (x, x'), (y, y') and (x, y) pairs: what the estimator needs."""
    n_c, m_c = _class_sizes(inp)
    return float((n_c * n_c + m_c * m_c + n_c * m_c).sum())


def _flops(inp):
    # per pair a D-long dot product (2D) forward and two D-long products backward (4D): 6D
    return 6 * inp["x"].shape[1] * _pair_count(inp)


def _work_flops(inp, provider):
    if provider == "reference":
        return _flops(inp)
    if provider != "triton":
        return None  # the C++/CUDA kernels are not modelled
    from ddfast.kernels.mmd import Tiling

    n_c, m_c = _class_sizes(inp)
    rows = (n_c + m_c).tolist()
    x = inp["x"]
    tiling = Tiling(int(sum(rows)), x.shape[1], x.device, x.dtype)
    return tiling.executed_flops([r for r in rows if r > 0], x.shape[1])


def _bytes(inp):
    # read x and y forward and backward (twice there: distance tiles and P·Z), write both gradients
    x, y = inp["x"], inp["y"]
    return 4 * (x.numel() + y.numel()) * x.element_size()


@contextlib.contextmanager
def _torch_tf32():
    """torch's fp32 matmuls in TF32 for the duration (what precision="auto" follows)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def _reference_tf32(**kw):
    with _torch_tf32():
        return mmd_reference(**kw)


def _gaussian_sum(a, b, widths):
    d = torch.cdist(a, b).pow(2)
    return sum(torch.exp(-d / (2 * s * s)).sum() for s in widths)


def _blocked_reference(x, y, block=2048):
    """The biased Gaussian MMD² of mmd_reference, summed over row blocks of the kernel matrices with
    activation checkpointing: the same formula in O(block · (N + M)) memory, for sizes where the
    eager reference cannot hold its N × M matrices."""
    widths = median_bandwidths(x.detach(), y.detach())
    n, m = x.shape[0], y.shape[0]

    def total(rows, cols, scale):
        out = rows.new_zeros(())
        for i in range(0, rows.shape[0], block):
            part = torch.utils.checkpoint.checkpoint(_gaussian_sum, rows[i:i + block], cols, widths,
                                                     use_reentrant=False)
            out = out + part * scale
        return out
    return total(x, x, 1.0 / (n * n)) + total(y, y, 1.0 / (m * m)) - total(x, y, 2.0 / (n * m))


def _fused(precision):
    return lambda backend, **kw: ddfast.mmd(**kw, precision=precision, backend=backend)


def _case(label, n, dim, classes, *, default=False, dtype=torch.float32, precision="auto", reference=mmd_reference,
          tol=1e-4, notes="per-set N = M; 5 bandwidths around the median distance; fwd + bwd to x and y"):
    return Case(
        name=f"mmd/{label}",
        op="mmd",
        make_inputs=_inputs(n, n, dim, classes, dtype),
        reference=reference,
        fused=_fused(precision),
        grad_inputs=("x", "y"),
        default=default,
        flops=_flops,
        bytes_moved=_bytes,
        work_flops=_work_flops,
        tol=tol,
        size=2 * n * dim,
        devices=("cpu", "cuda") if default else ("cuda",),  # GPU sizes: hours on a small CPU
        notes=notes,
    )


def cases():
    out = [_case("gaussian5-n256-d64", 256, 64, 1, default=True),
           _case("gaussian5-n8192-d2048", 8192, 2048, 1),
           _case("gaussian5-c10-n5000-d2048", 5000, 2048, 10),
           _case("gaussian5-n8192-d2048-tf32", 8192, 2048, 1, precision="tf32", reference=_reference_tf32, tol=1e-2,
                 notes="as gaussian5-n8192-d2048, reference with torch's fp32 matmuls in TF32, "
                       "ddfast precision='tf32'"),
           _case("gaussian5-n8192-d2048-bf16", 8192, 2048, 1, dtype=torch.bfloat16, tol=3e-2,
                 notes="as gaussian5-n8192-d2048 with bf16 features for both (fp32 accumulation)")]
    # eager reference at N = M = 65536: each N × N fp32 matrix is 65536² · 4 B = 17.2 GB; cdist, its
    # square and 5 exp terms for each of xx, yy, xy, kept for the backward, need > 300 GB
    out.append(_case("gaussian5-n65536-d128", 65536, 128, 1, reference=_blocked_reference, tol=1e-3,
                     notes="N = M = 65536, D = 128: the eager reference needs > 300 GB (each N x N fp32 matrix "
                           "17.2 GB; cdist, square and 5 exp terms for xx, yy, xy kept for backward); the "
                           "reference here is the same formula in 2048-row blocks under activation "
                           "checkpointing"))
    return out
