"""supcon_nce — MIM4DD's contrastive score between synthetic and real features (SPEC 3.4).

Positives are syn/real pairs with the same label, negatives the rest. With
``s_ij = <z_syn_i, z_real_j> / T`` (z = F.normalize(f, dim=1, eps=1e-12) when ``normalize``):

* ``variant="infonce"``: per anchor ``l_i = logsumexp_j s_ij − logsumexp_{j: y_j = y_i} s_ij``.
  Anchors with no positive are excluded: their per-anchor loss is exactly 0 (and gets no
  gradient); ``reduction="mean"`` averages over the anchors that have a positive. If **no** anchor
  has a positive, "mean" returns 0 with a zero gradient (a training loop that adds this term
  with a weight keeps running; nothing is divided by zero).
* ``variant="nce"`` (the CRD binary critic): ``h_ij = e^{s_ij} / (e^{s_ij} + c)``, c = ``noise_ratio``;
  per anchor ``l_i = −(Σ_{pos} log h_ij + Σ_{neg} log(1 − h_ij))``, computed stably as
  ``Σ_pos softplus(log c − s) + Σ_neg softplus(s − log c)``. "mean" divides by n_syn.

``reduction``: "mean" (above), "sum" (Σ_i l_i), "none" (the (n_syn,) vector l, zeros for
excluded infonce anchors).

Fused backends (Triton, C++ CPU, CUDA) compute the per-anchor vector ``l`` without the
n_syn × n_real logit matrix, with an online logsumexp over all columns and over the label-masked
positive columns. They save only ``lse_all`` and ``lse_pos`` (−inf for anchors without a positive)
for the backward, which recomputes the logits: ``dL/ds_ij = g_i (softmax_all_ij − [pos_ij]
softmax_pos_ij)`` (infonce) or ``g_i (σ(s_ij − log c) − [pos_ij])`` (nce), with ``g = dLoss/dl``.
Features with more than two dims are flattened from dim 1.

Triton (ddfast/kernels/supcon_nce.py), flash-attention-2 style: the forward grid is (anchor
blocks × splits of the real columns) with a logsumexp merge of the partials, so n_syn from 10 to
5000 fills a GPU; the L2 normalisation is fused (row scales in the kernels and the analytic
backward ``r (dz − z <z, dz>)``, no normalised copies); the backward recomputes each logit tile
once over the full D (no per-slice recompute for D > 256) into a fixed n_syn × W workspace per
chunk of W real columns and forms both gradients with a tiled GEMM. Memory O(n_syn + n_real) plus
the workspace (4M elements on CUDA). Executed FLOPs ≈ 8/6 of the reference's (one logit recompute:
the price of not keeping the n_syn × n_real matrix). For reduction "mean"/"sum" with a feature set
requiring grad, the Triton op computes the gradients in the forward instead (Liger-Kernel's fused
linear cross-entropy does the same): panels of P synthetic rows whose P × n_real logits fit a
16M-element workspace (64 MB fp32) are computed once, reduced to the row logsumexps, turned into
dL/ds in place and multiplied into both gradients; the saved gradients (the size of the features)
are scaled by the upstream gradient in the backward, which launches no kernel. Executed FLOPs: the
reference's 6·n_syn·n_real·D (+2.4% of tile padding at n_syn = 1000, n_real = 65536). The CUDA
backend: SIMT tiles in shared memory (fp32 accumulation, fp64 for double), not tensor cores, on
normalised copies. C++ CPU: chunks of real
columns, BLAS GEMM per chunk, vectorised online-LSE rows with at::parallel_for; its scratch is one
n_syn × chunk block (≤ 4M elements). No host sync after warm-up (the reductions stay on the device).

``precision`` ("auto", "ieee", "tf32", "tf32x3", "bf16"; ddfast/ops/_precision.py): how fp32
logits are multiplied; "auto" follows torch's fp32 matmul setting (TF32 only where torch would use
it, on CUDA). Measured max error against float64 (n_syn = 100, n_real = 400, D = 128, 10 classes,
T = 0.1; value relative, gradient relative to the largest gradient entry), on CPU: ieee and
tf32x3 (= ieee there) 5e-8 / 7e-7; tf32 9e-7 / 4.2e-4 and bf16 9e-6 / 4.4e-3, both from the
torch/C++ emulation (operands rounded as tensor cores round them). The Triton tf32/tf32x3/bf16
kernels are compiled for sm_90 (tensor-core instructions checked in the PTX); on an H200 (Triton
3.6) the Triton tf32 value erred 2.0e-4 (infonce) and 3.4e-4 (nce) against float64 (n_syn = 30,
n_real = 90, D = 40: the test's case), more than the emulation. Triton fp32 ieee in the
interpreter: 5e-8 / 4e-7.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .. import _backend
from ._precision import check_precision, interpreter_operand, kernel_precision, round_operand
from .._checks import (acc_dtype, check_choice, check_float_tensor, check_labels, check_result_finite,
                       check_same_device, check_same_dtype)

OP = "supcon_nce"
VARIANTS = ("infonce", "nce")
REDUCTIONS = ("mean", "sum", "none")


def supcon_nce_reference(f_syn, y_syn, f_real, y_real, temperature=0.1, normalize=True, variant="infonce",
                         noise_ratio=1.0, reduction="mean"):
    """The formula with the full logit matrix materialised (the oracle of the fused backends)."""
    z_syn = f_syn.flatten(1)
    z_real = f_real.flatten(1)
    if normalize:
        z_syn = F.normalize(z_syn, dim=1, eps=1e-12)
        z_real = F.normalize(z_real, dim=1, eps=1e-12)
    logits = z_syn @ z_real.t() / temperature
    pos = y_syn[:, None] == y_real[None, :]
    if variant == "infonce":
        has_pos = pos.any(dim=1)
        lse_all = torch.logsumexp(logits, dim=1)
        # rows without a positive get a finite dummy row, so that where() passes them no NaN gradient
        pos_logits = logits.masked_fill(~pos, float("-inf")).masked_fill(~has_pos[:, None], 0.0)
        lse_pos = torch.logsumexp(pos_logits, dim=1)
        per_anchor = torch.where(has_pos, lse_all - lse_pos, torch.zeros_like(lse_all))
        count = has_pos.sum()
    else:
        log_c = math.log(noise_ratio)
        per_anchor = torch.where(pos, F.softplus(log_c - logits), F.softplus(logits - log_c)).sum(dim=1)
        count = torch.full((), per_anchor.shape[0], device=per_anchor.device)  # no host-to-device copy
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.sum() / count.clamp_min(1)


# --- autograd shared by the Triton and compiled ops --------------------------------------------
# fwd(z_syn, y_syn, z_real, y_real, inv_temp, nce, log_c) -> (per_anchor, lse_all, lse_pos), the
# last three in the accumulation dtype (fp64 for fp64 inputs, else fp32); for nce the lse outputs
# are zeros. bwd(g, z_syn, y_syn, z_real, y_real, lse_all, lse_pos, inv_temp, nce, log_c)
# -> (grad_z_syn, grad_z_real) in the input dtype.

def _fake_fwd(z_syn, y_syn, z_real, y_real, inv_temp, nce, log_c):
    acc = acc_dtype(z_syn.dtype)
    n = z_syn.shape[0]
    return tuple(z_syn.new_empty((n,), dtype=acc) for _ in range(3))


def _fake_bwd(g, z_syn, y_syn, z_real, y_real, lse_all, lse_pos, inv_temp, nce, log_c):
    return torch.empty_like(z_syn), torch.empty_like(z_real)


def _setup_context(ctx, inputs, output):
    z_syn, y_syn, z_real, y_real, inv_temp, nce, log_c = inputs
    ctx.save_for_backward(z_syn, y_syn, z_real, y_real, output[1], output[2])
    ctx.params = (inv_temp, nce, log_c)


def _make_backward(bwd_op):
    def backward(ctx, grad_per_anchor, _grad_lse_all, _grad_lse_pos):
        z_syn, y_syn, z_real, y_real, lse_all, lse_pos = ctx.saved_tensors
        g = grad_per_anchor.to(lse_all.dtype).contiguous()
        grad_syn, grad_real = bwd_op(g, z_syn, y_syn, z_real, y_real, lse_all, lse_pos, *ctx.params)
        return grad_syn, None, grad_real, None, None, None, None
    return backward


def _triton_setup_context(ctx, inputs, output):
    f_syn, y_syn, f_real, y_real, inv_temp, nce, log_c, normalize, precision = inputs
    ctx.save_for_backward(f_syn, y_syn, f_real, y_real, output[1], output[2])
    ctx.params = (inv_temp, nce, log_c, normalize, precision)


def _triton_backward(ctx, grad_per_anchor, _grad_lse_all, _grad_lse_pos):
    f_syn, y_syn, f_real, y_real, lse_all, lse_pos = ctx.saved_tensors
    g = grad_per_anchor.to(lse_all.dtype).contiguous()
    grad_syn, grad_real = torch.ops.ddfast.supcon_nce_triton_bwd(g, f_syn, y_syn, f_real, y_real, lse_all, lse_pos,
                                                                 *ctx.params)
    return grad_syn, None, grad_real, None, None, None, None, None, None


# The Triton op takes the raw features: it normalises on the fly (row scales) and its backward
# returns the gradient through the normalisation, so no normalised copy exists at any point.
@torch.library.custom_op("ddfast::supcon_nce_triton_fwd", mutates_args=())
def _triton_fwd(f_syn: torch.Tensor, y_syn: torch.Tensor, f_real: torch.Tensor, y_real: torch.Tensor,
                inv_temp: float, nce: bool, log_c: float, normalize: bool,
                precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.supcon_nce import supcon_nce_forward

    return supcon_nce_forward(f_syn, y_syn, f_real, y_real, inv_temp, nce, log_c, normalize, precision)


@torch.library.custom_op("ddfast::supcon_nce_triton_bwd", mutates_args=())
def _triton_bwd(g: torch.Tensor, f_syn: torch.Tensor, y_syn: torch.Tensor, f_real: torch.Tensor,
                y_real: torch.Tensor, lse_all: torch.Tensor, lse_pos: torch.Tensor, inv_temp: float, nce: bool,
                log_c: float, normalize: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.supcon_nce import supcon_nce_backward

    return supcon_nce_backward(g, f_syn, y_syn, f_real, y_real, lse_all, lse_pos, inv_temp, nce, log_c, normalize,
                               precision)


def _fake_triton_fwd(f_syn, y_syn, f_real, y_real, inv_temp, nce, log_c, normalize, precision):
    return _fake_fwd(f_syn, y_syn, f_real, y_real, inv_temp, nce, log_c)


def _fake_triton_bwd(g, f_syn, y_syn, f_real, y_real, lse_all, lse_pos, inv_temp, nce, log_c, normalize, precision):
    return torch.empty_like(f_syn), torch.empty_like(f_real)


_triton_fwd.register_fake(_fake_triton_fwd)
_triton_bwd.register_fake(_fake_triton_bwd)
_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup_context)


# Gradient in the forward (Triton, scalar reductions, some input requiring grad): the op returns the
# loss, the gradients of Σ_i l_i (empty (0, D) where not needed) and the scale that turns them into
# the loss's gradients (1/number of anchors with a positive for infonce "mean", 1/n_syn for nce
# "mean", 1 for "sum"); its backward is one multiply per gradient. The gradients are O((n_syn + n_real) D),
# like the features.
@torch.library.custom_op("ddfast::supcon_nce_triton_fused", mutates_args=())
def _triton_fused(f_syn: torch.Tensor, y_syn: torch.Tensor, f_real: torch.Tensor, y_real: torch.Tensor,
                  inv_temp: float, nce: bool, log_c: float, normalize: bool, precision: str, mean: bool,
                  need_syn: bool, need_real: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.supcon_nce import supcon_nce_fused

    per_anchor, lse_pos, grad_syn, grad_real = supcon_nce_fused(f_syn, y_syn, f_real, y_real, inv_temp, nce, log_c,
                                                                normalize, precision, need_syn, need_real)
    total = per_anchor.sum()
    if not mean:
        scale = torch.ones_like(total)
    elif nce:
        scale = torch.full_like(total, 1.0 / per_anchor.shape[0])
    else:  # anchors without a positive carry lse_pos = −inf and are left out of the mean (no host sync)
        scale = 1.0 / (lse_pos > float("-inf")).sum().clamp_min(1).to(total.dtype)
    return total * scale, grad_syn, grad_real, scale


@_triton_fused.register_fake
def _fake_triton_fused(f_syn, y_syn, f_real, y_real, inv_temp, nce, log_c, normalize, precision, mean, need_syn,
                       need_real):
    acc = acc_dtype(f_syn.dtype)
    dim = f_syn.shape[1]
    return (f_syn.new_empty((), dtype=acc), f_syn.new_empty((f_syn.shape[0] if need_syn else 0, dim)),
            f_real.new_empty((f_real.shape[0] if need_real else 0, dim)), f_syn.new_empty((), dtype=acc))


def _triton_fused_setup_context(ctx, inputs, output):
    _loss, grad_syn, grad_real, scale = output
    ctx.save_for_backward(grad_syn, grad_real, scale)
    ctx.need = inputs[-2:]


def _triton_fused_backward(ctx, grad_loss, _grad_syn, _grad_real, _grad_scale):
    grad_syn, grad_real, scale = ctx.saved_tensors
    g = grad_loss * scale
    need_syn, need_real = ctx.need
    return (grad_syn * g if need_syn else None, None, grad_real * g if need_real else None) + (None,) * 9


_triton_fused.register_autograd(_triton_fused_backward, setup_context=_triton_fused_setup_context)


def _use_fused(f_syn, f_real, reduction) -> bool:
    """The gradient-in-forward path: a scalar loss whose gradient autograd will want, and one row of
    logits fits the workspace (else the recomputing backward)."""
    if reduction == "none" or not torch.is_grad_enabled() or not (f_syn.requires_grad or f_real.requires_grad):
        return False
    from ..kernels.supcon_nce import fused_panel_rows

    return fused_panel_rows(f_syn.shape[0], f_real.shape[0], f_syn.device) > 0


def _register_compiled():
    """Python side of the C++ ops (csrc/supcon_nce.cpp), run once after the library loads."""
    torch.library.register_fake("ddfast::supcon_nce_fwd")(_fake_fwd)
    torch.library.register_fake("ddfast::supcon_nce_bwd")(_fake_bwd)
    torch.library.register_autograd("ddfast::supcon_nce_fwd", _make_backward(torch.ops.ddfast.supcon_nce_bwd),
                                    setup_context=_setup_context)


# cpu_compiled_is_faster: measured fwd+bwd on a shared 2-core CPU: 1000x8192x128, 1 thread: infonce
# 138 vs 362 ms, nce 134 vs 221 ms (median); bench default case 4.1 vs 5.4 ms
# tl.dot uses tensor cores (bf16/fp16, tf32 on opt-in); the CUDA kernel is SIMT FMA: prefer Triton on GPUs
_backend.register_op(_backend.OpSpec(OP, cpu_compiled_is_faster=True, cuda_prefers_triton=True,
                                     on_load=_register_compiled))


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_inputs(f_syn, y_syn, f_real, y_real, temperature, normalize, variant, noise_ratio, reduction):
    check_float_tensor("f_syn", f_syn, min_dim=2)
    check_float_tensor("f_real", f_real, min_dim=2)
    check_same_dtype(f_syn=f_syn, f_real=f_real)
    d_syn, d_real = f_syn[0].numel(), f_real[0].numel()
    if d_syn != d_real:
        raise ValueError(f"f_syn and f_real must have the same feature size D; got f_syn {tuple(f_syn.shape)} "
                         f"(D={d_syn}) and f_real {tuple(f_real.shape)} (D={d_real})")
    check_labels("y_syn", y_syn, f_syn.shape[0])
    check_labels("y_real", y_real, f_real.shape[0])
    check_same_device(f_syn=f_syn, y_syn=y_syn, f_real=f_real, y_real=y_real)
    temperature = _check_positive("temperature", temperature)
    noise_ratio = _check_positive("noise_ratio", noise_ratio)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    check_choice("variant", variant, VARIANTS)
    check_choice("reduction", reduction, REDUCTIONS)
    return temperature, noise_ratio


def supcon_nce(f_syn: torch.Tensor, y_syn: torch.Tensor, f_real: torch.Tensor, y_real: torch.Tensor, *,
               temperature: float = 0.1, normalize: bool = True, variant: str = "infonce",
               noise_ratio: float = 1.0, reduction: str = "mean", precision: str = "auto",
               backend: str = "auto") -> torch.Tensor:
    """Supervised contrastive score of synthetic against real features (see the module doc).

    f_syn (n_syn, D…), f_real (n_real, D…): float features of one dtype and device (flattened from
    dim 1); y_syn, y_real: integer labels. Gradients flow to both feature sets. Returns a scalar
    (reduction "mean"/"sum") or the per-anchor (n_syn,) vector ("none"), in the features' dtype.
    ``precision`` ("auto", "ieee", "tf32", "tf32x3", "bf16"): how fp32 logits are multiplied (see
    ddfast/ops/_precision.py and the module doc for each mode's measured error).
    """
    temperature, noise_ratio = _check_inputs(f_syn, y_syn, f_real, y_real, temperature, normalize, variant,
                                             noise_ratio, reduction)
    check_precision(precision)
    which = _backend.resolve(OP, backend, f_syn.device)
    if which == "torch":
        loss = supcon_nce_reference(round_operand(f_syn, precision), y_syn, round_operand(f_real, precision),
                                    y_real, temperature, normalize, variant, noise_ratio, reduction)
    else:
        nce = variant == "nce"
        y_syn_l, y_real_l = y_syn.long().contiguous(), y_real.long().contiguous()
        if which == "triton":
            f_syn2 = interpreter_operand(f_syn.flatten(1), precision).contiguous()
            f_real2 = interpreter_operand(f_real.flatten(1), precision).contiguous()
            args = (f_syn2, y_syn_l, f_real2, y_real_l, 1.0 / temperature, nce, math.log(noise_ratio), normalize,
                    kernel_precision(precision, f_syn))
            if _use_fused(f_syn, f_real, reduction):
                loss = _backend.call_registered(
                    torch.ops.ddfast.supcon_nce_triton_fused, _triton_fused_setup_context, _triton_fused_backward,
                    *args, reduction == "mean", f_syn.requires_grad, f_real.requires_grad)[0].to(f_syn.dtype)
                check_result_finite(loss, f_syn=f_syn, f_real=f_real)
                return loss
            per_anchor, _lse_all, lse_pos = _backend.call_registered(
                torch.ops.ddfast.supcon_nce_triton_fwd, _triton_setup_context, _triton_backward, *args)
        else:
            z_syn = round_operand(f_syn.flatten(1), precision)
            z_real = round_operand(f_real.flatten(1), precision)
            if normalize:
                z_syn = F.normalize(z_syn, dim=1, eps=1e-12)
                z_real = F.normalize(z_real, dim=1, eps=1e-12)
            per_anchor, _lse_all, lse_pos = _backend.call_registered(
                torch.ops.ddfast.supcon_nce_fwd, _setup_context, _make_backward(torch.ops.ddfast.supcon_nce_bwd),
                z_syn.contiguous(), y_syn_l, z_real.contiguous(), y_real_l, 1.0 / temperature, nce,
                math.log(noise_ratio))
        if reduction == "none":
            loss = per_anchor
        elif reduction == "sum":
            loss = per_anchor.sum()
        elif nce:
            loss = per_anchor.sum() / per_anchor.shape[0]
        else:  # anchors without a positive carry lse_pos = −inf and are left out of the mean
            loss = per_anchor.sum() / (lse_pos > float("-inf")).sum().clamp_min(1)
        loss = loss.to(f_syn.dtype)
    check_result_finite(loss, f_syn=f_syn, f_real=f_real)
    return loss
