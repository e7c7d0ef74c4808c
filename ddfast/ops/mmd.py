"""mmd — maximum mean discrepancy between two feature sets, optionally per class (SPEC 3.3).

Kernels on flattened features (x: (N, D...), y: (M, D...) → D = prod of the trailing dims):

* ``"gaussian"``: ``k(a, b) = Σ_s exp(−‖a − b‖² / (2 s²))`` over the bandwidths ``s``.
* ``"linear"``:   ``k(a, b) = <a, b>`` (the biased per-class MMD² is then DM's
  ``Σ_c ‖mean x_c − mean y_c‖²``).

Estimators per class c (n = |x_c|, m = |y_c|):

* ``"biased"`` (V-statistic): ``mean k(x, x') + mean k(y, y') − 2 mean k(x, y)`` over all pairs.
* ``"unbiased"`` (U-statistic): the xx and yy means leave out the diagonal (``i ≠ i'``, divided by
  ``n(n − 1)``); needs n ≥ 2 and m ≥ 2 for every class present on both sides.

Default bandwidths (``bandwidths=None``): the median ``med`` of the pairwise Euclidean distances
``‖z_i − z_j‖, i < j`` of the concatenated sample ``z = [x; y]`` (all classes together), computed
on the rows ``⌊k·R/1024⌋, k = 0..1023`` when there are R > 1024 rows (else on all rows), then
``s = med · 2^k`` for ``k = −2, −1, 0, 1, 2``. A zero median (all sampled points equal) uses
``med = 1``. Bandwidths, default or given, are constants for autograd (no gradient flows to them).

Labels: ``x_labels``/``y_labels`` (both or neither) give the per-class MMD²; ``reduction="sum"``
sums them, ``"none"`` returns shape (C,). A class absent on either side contributes 0. Without
labels all samples form one class (``"none"`` → shape (1,)).

Kernels (Triton and C++/CUDA) work on ``z = [x; y]`` sorted by class: one launch for all classes,
the kernel matrix block-diagonal by class, memory O(N + M). Their forward output is, per row i, the
kernel sums over same-class x columns and y columns (``A_i``, ``B_i``); the per-class MMD² is an
O(N + M) weighted sum of those, so autograd of the custom op only needs ``∂/∂z`` of weighted kernel
sums. Triton (ddfast/kernels/mmd.py): the forward computes the upper-triangle tiles only (x–x and
y–y symmetric), each a ``tl.dot`` tile with the distance, the exp per bandwidth and the bandwidth
sum in the epilogue; the backward recomputes each distance tile once (full D, no per-slice
recompute) into a fixed R × W panel workspace and adds ``panel · Z`` with a tiled GEMM (one
read-modify-write of the fp32 gradient per panel, not per tile). Distances are
``‖a‖² + ‖b‖² − 2<a, b>`` (clamped at 0; fp32/fp64 features are centred first, which leaves Gaussian
distances unchanged and limits cancellation). The C++ CPU kernel (csrc/mmd.cpp) walks the same
upper-triangle tiles (128 or 256 rows) with a BLAS matmul per tile and the exp, side sums and
P·Z products as vectorised ATen ops on the tile, tiles in parallel; the CUDA kernel is SIMT.
Executed FLOPs of the Triton kernels ≈ 1.11× the eager reference's at
N = M (bench work model). No host sync after warm-up in the default configuration (the class
counts stay on the device; ``estimator="unbiased"`` with labels reads them once to validate).

``precision`` ("auto", "ieee", "tf32", "tf32x3", "bf16"; ddfast/ops/_precision.py): how fp32
dot products are multiplied; "auto" follows torch's fp32 matmul setting (TF32 only where torch
would use it, on CUDA). Measured max error against float64 (N = M = 200, D = 64, 5 bandwidths
2..32; value relative, gradient relative to the largest gradient entry), on CPU: ieee and tf32x3
(= ieee there) 2.4e-6 / 9e-7; tf32 2e-6 / 3e-4 and bf16 2e-5 / 2.4e-3, both from the torch/C++
emulation (operands rounded as tensor cores round them). The Triton tf32/tf32x3/bf16 kernels are
compiled for sm_90 (tensor-core instructions checked in the PTX); on an H200 (Triton 3.6) the
Triton tf32 value erred 2.1e-3 against float64 (N = 40, M = 30, D = 24, bandwidths 2, 4, 8: the
test's case), ten times the emulation's: the tensor cores do not round operands as the emulation
does. Triton fp32 ieee in the interpreter: 1e-7 / 5e-7.

CUDA: ``backend="auto"`` takes the Triton kernel (tensor cores for tf32/bf16), except unlabeled
exact-fp32 gaussian MMD with N·M·D ≥ 2^34 and D ≥ 512, where cuBLAS (the reference's matmuls, on
centred features) is faster, if its N×M working set fits a quarter of the free memory
(``BLAS_PAIR_WORK``; also in every precision when auto falls back to the SIMT CUDA kernel).
CPU: ``backend="auto"`` takes the C++ kernel, measured faster than the reference (fwd + bwd,
median of 9, one thread: 54.4 vs 38.8 ms at N = M = 256, D = 64; 233.5 vs 203.0 ms at 512 × 128;
194.7 vs 96.3 ms at N = M = 1000, D = 64, 10 classes).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend
from ._precision import check_precision, interpreter_operand, kernel_precision, round_operand
from .._checks import (acc_dtype, check_choice, check_float_tensor, check_labels, check_num_classes,
                       check_result_finite, check_same_device, check_same_dtype, infer_num_classes)

OP = "mmd"
KERNELS = ("gaussian", "linear")
ESTIMATORS = ("biased", "unbiased")
REDUCTIONS = ("sum", "none")
MEDIAN_SUBSAMPLE = 1024


def median_bandwidths(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default bandwidths (see the module docstring): median pairwise distance × 2^(−2..2).

    x (N, D), y (M, D); returns 5 bandwidths in the accumulation dtype, without gradient.
    """
    with torch.no_grad():
        z = torch.cat([x, y]).to(acc_dtype(x.dtype))
        rows = z.shape[0]
        if rows > MEDIAN_SUBSAMPLE:
            z = z[torch.arange(MEDIAN_SUBSAMPLE, device=z.device) * rows // MEDIAN_SUBSAMPLE]
        med = torch.pdist(z).median()
        med = torch.where(med > 0, med, torch.ones_like(med))
        # 2^(−2..2) made on the device (torch.tensor of Python numbers would be a host-to-device copy)
        return med * torch.exp2(torch.arange(-2, 3, dtype=z.dtype, device=z.device))


def _kernel_matrix(a: torch.Tensor, b: torch.Tensor, kernel: str, bandwidths: Optional[torch.Tensor]) -> torch.Tensor:
    if kernel == "linear":
        return a @ b.T
    sq_dist = torch.cdist(a, b).pow(2)
    return sum(torch.exp(-sq_dist / (2 * s * s)) for s in bandwidths)


def mmd_reference(x, y, *, kernel="gaussian", bandwidths=None, x_labels=None, y_labels=None, num_classes=None,
                  estimator="biased", reduction="sum"):
    """Plain PyTorch: per class, the full kernel matrices (cdist → exp) and the estimator formula."""
    out_dtype = x.dtype
    acc = acc_dtype(x.dtype)
    x = x.reshape(x.shape[0], -1).to(acc)
    y = y.reshape(y.shape[0], -1).to(acc)
    if kernel == "gaussian":
        bandwidths = (median_bandwidths(x, y) if bandwidths is None
                      else torch.as_tensor(bandwidths, dtype=acc, device=x.device).reshape(-1))
    if x_labels is None:
        groups = [(x, y)]  # one class; no boolean mask (a host sync on CUDA)
    else:
        if num_classes is None:
            num_classes = infer_num_classes(x_labels, y_labels)
        groups = [(x[x_labels == c], y[y_labels == c]) for c in range(num_classes)]
    per_class = []
    for xc, yc in groups:
        n, m = xc.shape[0], yc.shape[0]
        if n == 0 or m == 0:
            per_class.append(x.new_zeros(()))
            continue
        kxx = _kernel_matrix(xc, xc, kernel, bandwidths)
        kyy = _kernel_matrix(yc, yc, kernel, bandwidths)
        kxy = _kernel_matrix(xc, yc, kernel, bandwidths)
        if estimator == "biased":
            value = kxx.mean() + kyy.mean() - 2 * kxy.mean()
        else:
            value = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                     + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
        per_class.append(value)
    result = torch.stack(per_class)
    return (result.sum() if reduction == "sum" else result).to(out_dtype)


# --- the kernels' contract --------------------------------------------------------------------
# Inputs: z (R, D) contiguous, rows sorted by class; cls (R,) int64 class of each row; side (R,)
# int32 0 = row of x, 1 = row of y; offsets (C + 1,) int64, class c owns rows offsets[c]:offsets[c+1];
# coefs (S,) accumulation dtype, 1 / (2 s²) per bandwidth (empty for the linear kernel).
# Forward output: (R, 2) accumulation dtype, [A_i, B_i] = Σ k(z_i, z_j) over same-class columns j of
# x (A) and of y (B), the diagonal j = i left out when `unbiased`.
# Backward: given grad (R, 2) of that output, grad_z (R, D) in z's dtype.

def _fake_fwd(z, cls, side, offsets, coefs, linear, unbiased):
    return z.new_empty((z.shape[0], 2), dtype=acc_dtype(z.dtype))


def _fake_bwd(grad, z, cls, side, offsets, coefs, linear, unbiased):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, cls, side, offsets, coefs, linear, unbiased = inputs
    ctx.save_for_backward(z, cls, side, offsets, coefs)
    ctx.linear, ctx.unbiased = linear, unbiased


def _make_backward(bwd_op):
    def backward(ctx, grad):
        z, cls, side, offsets, coefs = ctx.saved_tensors
        grad_z = bwd_op(grad.contiguous(), z, cls, side, offsets, coefs, ctx.linear, ctx.unbiased)
        return grad_z, None, None, None, None, None, None
    return backward


# The Triton ops take one more argument, the tl.dot precision ("ieee", "tf32", "tf32x3", "bf16").
@torch.library.custom_op("ddfast::mmd_triton_fwd", mutates_args=())
def _triton_fwd(z: torch.Tensor, cls: torch.Tensor, side: torch.Tensor, offsets: torch.Tensor, coefs: torch.Tensor,
                linear: bool, unbiased: bool, precision: str) -> torch.Tensor:
    from ..kernels.mmd import mmd_forward

    return mmd_forward(z, cls, side, offsets, coefs, linear, unbiased, precision)


@torch.library.custom_op("ddfast::mmd_triton_bwd", mutates_args=())
def _triton_bwd(grad: torch.Tensor, z: torch.Tensor, cls: torch.Tensor, side: torch.Tensor, offsets: torch.Tensor,
                coefs: torch.Tensor, linear: bool, unbiased: bool, precision: str) -> torch.Tensor:
    from ..kernels.mmd import mmd_backward

    return mmd_backward(grad, z, cls, side, offsets, coefs, linear, unbiased, precision)


def _triton_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs[:-1], output)
    ctx.precision = inputs[-1]


def _triton_backward(ctx, grad):
    z, cls, side, offsets, coefs = ctx.saved_tensors
    grad_z = _triton_bwd(grad.contiguous(), z, cls, side, offsets, coefs, ctx.linear, ctx.unbiased, ctx.precision)
    return grad_z, None, None, None, None, None, None, None


_triton_fwd.register_fake(lambda *args: _fake_fwd(*args[:-1]))
_triton_bwd.register_fake(lambda *args: _fake_bwd(*args[:-1]))
_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup_context)


_COMPILED_BACKWARD = []  # the compiled op's backward, made once the library is loaded


def _compiled_backward():
    if not _COMPILED_BACKWARD:
        _COMPILED_BACKWARD.append(_make_backward(torch.ops.ddfast.mmd_bwd))
    return _COMPILED_BACKWARD[0]


def _register_compiled():
    """Python side of the C++ ops (csrc/mmd.cpp), run once after the library loads."""
    torch.library.register_fake("ddfast::mmd_fwd")(_fake_fwd)
    torch.library.register_fake("ddfast::mmd_bwd")(_fake_bwd)
    torch.library.register_autograd("ddfast::mmd_fwd", _make_backward(torch.ops.ddfast.mmd_bwd),
                                    setup_context=_setup_context)


# Measured on this project's (shared, loaded) 2-core CPU, fwd + bwd, median of 9, reference vs the
# blocked C++ kernel: 1 thread 54.4 vs 38.8 ms at N = M = 256, D = 64; 233.5 vs 203.0 ms at
# 512 × 128; 194.7 vs 96.3 ms at 1000 × 64 with 10 classes (2 threads: 2.8-8.3x), so auto takes
# the C++ kernel on CPU.
# tl.dot uses tensor cores (bf16/fp16, tf32 on opt-in); the CUDA kernel is SIMT FMA: prefer Triton on GPUs
_backend.register_op(_backend.OpSpec(OP, cpu_compiled_is_faster=True, cuda_prefers_triton=True,
                                     on_load=_register_compiled))

# ...except exact fp32 at large sizes. On an H200 (ddfast validate, 2026-11-26, fwd + bwd, fp32,
# torch's "highest" matmul precision) the Triton kernel took 260 ms against the reference's 75.7 ms
# at N = M = 8192, D = 2048 (the reference's cuBLAS SGEMM runs near the FP32 peak; Triton's ieee
# dot does not), but was 1.26x faster at 10 classes x 500 x 500 x 2048 (39.8 vs 50.0 ms) and 1.9x
# at 256 x 256 x 64. The reference keeps ~(K + 2) matrices of N·M + N² + M² entries for K bandwidths
# (5.76 GB there, against the kernel's 0.26 GB), so auto takes it only for unlabeled inputs with
# N·M·D past the point between those two measured sizes (5e9 and 1.4e11), D ≥ 512 (dot products,
# not the pairwise exp, dominate) and that working set under a quarter of the free device memory.
BLAS_PAIR_WORK = 2 ** 34
BLAS_MIN_FEATURES = 512


def _auto_takes_blas(kernel: str, backend, precision: str, x: torch.Tensor, n: int, m: int, d: int,
                     num_bandwidths: int) -> bool:
    """Whether auto on CUDA hands unlabeled work to the reference (cuBLAS) instead of the fused
    ``kernel``. Only for precision "auto", so the reference multiplies as torch's matmul setting
    says, as the kernel would."""
    if _backend.requested(backend) != "auto" or precision != "auto" or not x.is_cuda:
        return False
    if not blas_is_faster(kernel, x.dtype, kernel_precision(precision, x), n * m * d, d):
        return False
    free, _ = torch.cuda.mem_get_info(x.device)
    free += torch.cuda.memory_reserved(x.device) - torch.cuda.memory_allocated(x.device)
    return reference_bytes(n, m, num_bandwidths, x.element_size()) <= free // 4


def blas_is_faster(kernel: str, dtype: torch.dtype, dot_precision: str, pair_work: int, d: int) -> bool:
    """The CUDA kernel is SIMT in every precision (341-363 ms on the H200 case above); Triton loses
    only with ieee fp32 dots."""
    if pair_work < BLAS_PAIR_WORK or d < BLAS_MIN_FEATURES:
        return False
    return kernel == "cuda" or (dtype == torch.float32 and dot_precision == "ieee")


def reference_bytes(n: int, m: int, num_bandwidths: int, element_size: int) -> int:
    """The reference's working set, fwd + bwd: K + 2 matrices of each pair block (measured 5.76 GB
    at N = M = 8192, K = 5, fp32; this gives 5.64 GB)."""
    return (n * m + n * n + m * m) * (num_bandwidths + 2) * element_size


def _reference_centred(x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """The reference on features centred by their pooled mean, as the kernels centre them: the
    distances are shift-invariant, and fp32 |a|² + |b|² − 2<a, b> would otherwise cancel on
    features with a large common offset (5 % off at offset 50 on CPU). The mean is a constant for
    autograd: the exact gradient, since the loss does not depend on it."""
    c = torch.cat([x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)]).detach().mean(0)
    return mmd_reference(x - c.view(x.shape[1:]), y - c.view(y.shape[1:]), **kw)


# --- validation -------------------------------------------------------------------------------

def _check_bandwidths(bandwidths, kernel: str, acc: torch.dtype, device) -> Optional[torch.Tensor]:
    if bandwidths is None:
        return None
    if kernel != "gaussian":
        raise ValueError(f"bandwidths apply only to kernel='gaussian', got kernel={kernel!r}")
    if isinstance(bandwidths, torch.Tensor):
        if bandwidths.dtype.is_complex or bandwidths.dtype == torch.bool:
            raise TypeError(f"bandwidths must be real numbers, got dtype {bandwidths.dtype}")
        values = bandwidths.detach().to(device=device, dtype=acc).reshape(-1)
    elif isinstance(bandwidths, (int, float)) and not isinstance(bandwidths, bool):
        values = torch.tensor([float(bandwidths)], dtype=acc, device=device)
    elif isinstance(bandwidths, (list, tuple)) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in bandwidths):
        values = torch.tensor([float(b) for b in bandwidths], dtype=acc, device=device)
    else:
        raise TypeError("bandwidths must be None, a positive number, a sequence of positive numbers or a 1-D "
                        f"tensor; got {type(bandwidths).__name__}")
    if values.numel() == 0:
        raise ValueError("bandwidths is empty; pass at least one positive bandwidth (or None for the default)")
    if not bool(((values > 0) & torch.isfinite(values)).all()):
        raise ValueError(f"bandwidths must be positive and finite, got {values.tolist()}")
    return values


def _check_labels(x, x_labels, y_labels, n: int, m: int, num_classes) -> int:
    if (x_labels is None) != (y_labels is None):
        missing = "y_labels" if y_labels is None else "x_labels"
        raise ValueError(f"{missing} is None: pass both x_labels and y_labels, or neither")
    if num_classes is not None:
        check_num_classes(num_classes)
    if x_labels is None:
        return 1
    check_labels("x_labels", x_labels, n, num_classes)
    check_labels("y_labels", y_labels, m, num_classes)
    check_same_device(x=x, x_labels=x_labels, y_labels=y_labels)
    return num_classes if num_classes is not None else infer_num_classes(x_labels, y_labels)


def _class_counts(x_labels, y_labels, n, m, num_classes, device):
    """Per-class sizes on the device, without a host sync (no bincount: its size needs the max)."""
    if x_labels is None:
        return (torch.full((1,), n, device=device), torch.full((1,), m, device=device))

    def count(labels):
        ones = torch.ones_like(labels, dtype=torch.long)
        return torch.zeros(num_classes, dtype=torch.long, device=device).index_add_(0, labels.long(), ones)
    return count(x_labels), count(y_labels)


def _check_unbiased_counts(n_c: torch.Tensor, m_c: torch.Tensor, labeled: bool) -> None:
    """Raise if a class present on both sides has fewer than 2 samples on one (one host sync with
    labels: the counts live on the device; without labels the sizes are Python ints, no sync)."""
    if not labeled:  # n_c, m_c are the Python ints N and M
        for side, count in (("x", n_c), ("y", m_c)):
            if count < 2:
                raise ValueError(f"estimator='unbiased' needs at least 2 samples per class on each side; {side} "
                                 f"has {count} (use estimator='biased')")
        return
    both = (n_c > 0) & (m_c > 0)
    if not bool((both & ((n_c < 2) | (m_c < 2))).any()):  # one sync in the usual, valid case
        return
    for side, counts in (("x", n_c), ("y", m_c)):
        small = (both & (counts < 2)).nonzero().flatten().tolist()
        if small:
            where = f"{side}_labels class {small[0]}" if labeled else side
            raise ValueError(f"estimator='unbiased' needs at least 2 samples per class on each side; {where} has "
                             f"{int(counts[small[0]])} (use estimator='biased')")


# --- the kernels' path --------------------------------------------------------------------------

def _fused(x2, y2, x_labels, y_labels, n_c, m_c, num_classes, kernel, coefs, estimator, reduction, which, precision):
    n, m = x2.shape[0], y2.shape[0]
    device = x2.device
    acc = acc_dtype(x2.dtype)
    z = torch.cat([x2, y2])
    if kernel == "gaussian" and z.dtype in (torch.float32, torch.float64):
        # distances are shift-invariant: centring keeps |a|² + |b|² − 2<a, b> from cancelling
        # catastrophically on features with a large common offset (a constant for autograd; half
        # inputs are left as given, rounding the centred values would cost more than it saves)
        z = z - z.detach().mean(0)
    side = torch.cat([torch.zeros(n, dtype=torch.int32, device=device),
                      torch.ones(m, dtype=torch.int32, device=device)])
    if x_labels is None:
        cls = torch.zeros(n + m, dtype=torch.long, device=device)
    else:
        cls, order = torch.sort(torch.cat([x_labels, y_labels]).long(), stable=True)
        z, side = z[order], side[order]
    z = z.contiguous()
    offsets = torch.zeros(num_classes + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(n_c + m_c, 0)
    unbiased = estimator == "unbiased"
    if which == "triton":
        sums = _backend.call_registered(torch.ops.ddfast.mmd_triton_fwd, _triton_setup_context, _triton_backward,
                                        interpreter_operand(z, precision), cls, side, offsets, coefs,
                                        kernel == "linear", unbiased, kernel_precision(precision, z))
    else:  # the C++/CUDA kernels multiply exactly: tf32/bf16 are emulated by rounding the operands
        sums = _backend.call_registered(torch.ops.ddfast.mmd_fwd, _setup_context, _compiled_backward(),
                                        round_operand(z, precision), cls, side, offsets, coefs, kernel == "linear",
                                        unbiased)  # (R, 2): [A_i, B_i]

    # per-class weights of the xx, yy and xy kernel sums; classes absent on a side weigh 0
    n_f, m_f = n_c.to(acc), m_c.to(acc)
    present = (n_c > 0) & (m_c > 0)
    if unbiased:
        w_xx, w_yy = 1 / (n_f * (n_f - 1)), 1 / (m_f * (m_f - 1))
    else:
        w_xx, w_yy = 1 / (n_f * n_f), 1 / (m_f * m_f)
    w_xy = -1 / (n_f * m_f)
    zero = torch.zeros((), dtype=acc, device=device)
    w_xx, w_yy, w_xy = (torch.where(present, w, zero) for w in (w_xx, w_yy, w_xy))
    is_y = side.bool()
    weight_a = torch.where(is_y, w_xy[cls], w_xx[cls])  # weight of A_i (row i against x columns)
    weight_b = torch.where(is_y, w_yy[cls], w_xy[cls])  # weight of B_i
    per_row = weight_a * sums[:, 0] + weight_b * sums[:, 1]
    if reduction == "sum":
        return per_row.sum()
    return torch.zeros(num_classes, dtype=acc, device=device).index_add(0, cls, per_row)


def mmd(x: torch.Tensor, y: torch.Tensor, *, kernel: str = "gaussian", bandwidths=None, x_labels=None,
        y_labels=None, num_classes: Optional[int] = None, estimator: str = "biased", reduction: str = "sum",
        precision: str = "auto", backend: str = "auto") -> torch.Tensor:
    """MMD² between x (N, D...) and y (M, D...), per class when labels are given (see module doc).

    Returns a scalar (``reduction="sum"``) or shape (C,) (``"none"``) in the input dtype; gradients
    flow to both x and y.
    """
    check_float_tensor("x", x, min_dim=1)
    check_float_tensor("y", y, min_dim=1)
    check_same_device(x=x, y=y)
    check_same_dtype(x=x, y=y)
    check_choice("kernel", kernel, KERNELS)
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_precision(precision)
    n, m = x.shape[0], y.shape[0]
    d_x, d_y = math.prod(x.shape[1:]), math.prod(y.shape[1:])
    if d_x != d_y:
        raise ValueError(f"x and y must have the same number of features per sample; got x {tuple(x.shape)} "
                         f"(D={d_x}) and y {tuple(y.shape)} (D={d_y})")
    if d_x == 0:
        raise ValueError(f"x has no features (shape {tuple(x.shape)})")
    acc = acc_dtype(x.dtype)
    bw = _check_bandwidths(bandwidths, kernel, acc, x.device)
    num_classes = _check_labels(x, x_labels, y_labels, n, m, num_classes)
    n_c, m_c = _class_counts(x_labels, y_labels, n, m, num_classes, x.device)
    if estimator == "unbiased":
        labeled = x_labels is not None
        _check_unbiased_counts(n_c if labeled else n, m_c if labeled else m, labeled)

    which = _backend.resolve(OP, backend, x.device)
    if (which in ("triton", "cuda") and kernel == "gaussian" and x_labels is None
            and _auto_takes_blas(which, backend, precision, x, n, m, d_x, 5 if bw is None else bw.numel())):
        result = _reference_centred(x, y, kernel=kernel, bandwidths=bw, estimator=estimator, reduction=reduction)
    elif which == "torch":
        result = mmd_reference(round_operand(x, precision), round_operand(y, precision), kernel=kernel,
                               bandwidths=bw, x_labels=x_labels, y_labels=y_labels, num_classes=num_classes,
                               estimator=estimator, reduction=reduction)
    else:
        x2, y2 = x.reshape(n, d_x), y.reshape(m, d_x)
        if kernel == "linear":
            coefs = torch.empty(0, dtype=acc, device=x.device)
        else:
            s = median_bandwidths(x2, y2) if bw is None else bw
            coefs = (0.5 / (s * s)).contiguous()
        result = _fused(x2, y2, x_labels, y_labels, n_c, m_c, num_classes, kernel, coefs, estimator, reduction,
                        which, precision).to(x.dtype)
    check_result_finite(result, x=x, y=y)
    return result
