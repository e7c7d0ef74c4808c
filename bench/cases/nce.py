"""supcon_nce cases: MIM4DD's contrastive score, n_syn synthetic anchors against n_real real samples.

Sizes: 1000 synthetic images (CIFAR-100, 10 per class) against a 65536-sample real batch, with a
128-d projection (MIM4DD's head) or raw 2048-d features (ResNet-50 penultimate layer); both
variants (infonce, and the CRD binary critic "nce").

Precision variants run the reference and ddfast at the same precision: ``-tf32`` sets torch's fp32
matmul precision to TF32 for the reference and passes ``precision="tf32"`` to ddfast; ``-bf16``
feeds bf16 features to both (fp32 accumulation).

Work model (``work_flops``): the reference executes 2·n_syn·n_real·D flops forward (the logits)
and 4·n_syn·n_real·D backward (two products). The cases take the mean with gradients to both
feature sets, so the Triton provider runs its gradient-in-forward path: per panel of synthetic
rows the logits once (kept in the workspace) and the two products, tile padding included
(``ddfast.kernels.supcon_nce.fused_executed_flops``): 1.00-1.03× the reference (the last panel's
rows padded to a 64-row tile). The same op with ``reduction="none"`` or when a row of logits does
not fit the workspace recomputes the logits in its backward (``Tiling.executed_flops``, ≈ 8/6):
on CUDA (16M-element workspace) no case here does; in the CPU interpreter (1024 elements) the
default case (n_real = 2048) does, and its work column says so.
"""
import torch

import ddfast
from ddfast.ops.supcon_nce import supcon_nce_reference

from ..case import Case
from .mmd import _torch_tf32

NUM_CLASSES = 100


def _inputs(n_syn, n_real, dim, dtype=torch.float32):
    def make(device):
        g = torch.Generator().manual_seed(0)
        f_syn = torch.randn(n_syn, dim, generator=g).to(device, dtype).requires_grad_(True)
        f_real = torch.randn(n_real, dim, generator=g).to(device, dtype).requires_grad_(True)
        y_syn = (torch.arange(n_syn) % NUM_CLASSES).to(device)
        y_real = torch.randint(0, NUM_CLASSES, (n_real,), generator=g).to(device)
        return {"f_syn": f_syn, "y_syn": y_syn, "f_real": f_real, "y_real": y_real}
    return make


def _pairs_times_dim(inp):
    return inp["f_syn"].shape[0] * inp["f_real"].shape[0] * inp["f_syn"].shape[1]


def _work_flops(precision):
    def work(inp, provider):
        if provider == "reference":
            return 6.0 * _pairs_times_dim(inp)
        if provider != "triton":
            return None  # the C++/CUDA kernels are not modelled
        from ddfast.kernels.supcon_nce import Tiling, fused_executed_flops, fused_panel_rows

        n_syn, dim = inp["f_syn"].shape
        n_real = inp["f_real"].shape[0]
        device, dtype = inp["f_syn"].device, inp["f_syn"].dtype
        kernel_precision = "tf32" if precision == "tf32" else "ieee"  # the cases' "auto": torch's default, ieee
        if fused_panel_rows(n_syn, n_real, device) > 0:
            return fused_executed_flops(n_syn, n_real, dim, device, dtype, kernel_precision)
        return Tiling(n_syn, n_real, dim, device, dtype, kernel_precision).executed_flops(n_syn, n_real, dim)
    return work


def _reference(variant, tf32):
    def run(**kw):
        if tf32:
            with _torch_tf32():
                return supcon_nce_reference(**kw, variant=variant)
        return supcon_nce_reference(**kw, variant=variant)
    return run


def _fused(variant, precision):
    return lambda backend, **kw: ddfast.supcon_nce(**kw, variant=variant, precision=precision, backend=backend)


def _case(variant, n_syn, n_real, dim, *, default=False, suffix="", dtype=torch.float32, precision="auto",
          tol=1e-4):
    return Case(
        name=f"nce/{variant}-ns{n_syn}-nr{n_real}-d{dim}{suffix}",
        op="supcon_nce",
        make_inputs=_inputs(n_syn, n_real, dim, dtype),
        reference=_reference(variant, precision == "tf32"),
        fused=_fused(variant, precision),
        grad_inputs=("f_syn", "f_real"),
        default=default,
        # useful work: logits z_syn z_realᵀ, then dL/ds z_real and dL/dsᵀ z_syn (2 flops per MAC);
        flops=lambda inp: 6.0 * _pairs_times_dim(inp),
        work_flops=_work_flops(precision),
        # features read by forward and backward, gradients written
        bytes_moved=lambda inp: 4 * (inp["f_syn"].numel() + inp["f_real"].numel()) * inp["f_syn"].element_size(),
        tol=tol,
        size=n_syn * n_real,
        devices=("cpu", "cuda") if default else ("cuda",),
        notes=f"{variant}, T=0.1, L2-normalised, 100 classes"
              + {"": "", "-tf32": "; TF32 matmuls in both", "-bf16": "; bf16 features in both"}[suffix],
    )


def cases():
    out = [_case("infonce", 128, 2048, 64, default=True)]
    for variant in ("infonce", "nce"):
        for dim in (128, 2048):
            out.append(_case(variant, 1000, 65536, dim))
    out.append(_case("infonce", 1000, 65536, 2048, suffix="-tf32", precision="tf32", tol=1e-2))
    out.append(_case("infonce", 1000, 65536, 2048, suffix="-bf16", dtype=torch.bfloat16, tol=3e-2))
    return out
