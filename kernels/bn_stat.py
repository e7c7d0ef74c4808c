"""Triton kernels for bn_stat_loss (SRe2L's BatchNorm statistic matching).

Forward: x viewed as (N, C, S); program (c, split) reads its slice of channel c once, tile by
tile, and keeps (count, mean, M2) merged with Chan's parallel update (each tile's mean and M2 are
exact in registers), so the variance never suffers from E[x²] − E[x]² cancellation; fp32
accumulation (fp64 for fp64). A one-program epilogue kernel merges the (C, SPLIT) partials
(Chan's formula in fp64), writes μ and σ² and the two norms (fp64 sums, fixed order: deterministic).
Backward: a one-program kernel folds the norms, 1/M and the incoming gradient into a_c, b_c, then
one elementwise pass ``grad_x = a_c + b_c (x − μ_c)``. Two launches each way, no host sync.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes

BLOCK = 1024
MAX_SPLIT = 64


@triton.jit
def _bn_partial_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, C, S, M, chunk, num_splits,
                       BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    c = tl.program_id(0)
    sp = tl.program_id(1)
    lo = sp.to(tl.int64) * chunk
    hi = tl.minimum(lo + chunk, M)
    n_acc = tl.zeros((), dtype=ACC_DTYPE)
    mean_acc = tl.zeros((), dtype=ACC_DTYPE)
    m2_acc = tl.zeros((), dtype=ACC_DTYPE)
    for start in range(lo, hi, BLOCK):
        m = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = m < hi
        n_idx = m // S
        s_idx = m - n_idx * S
        v = tl.load(x_ptr + (n_idx * C + c) * S + s_idx, mask=mask, other=0.0).to(ACC_DTYPE)
        n_t = tl.sum(mask.to(ACC_DTYPE), axis=0)
        mean_t = tl.sum(v, axis=0) / n_t
        dev = tl.where(mask, v - mean_t, 0.0)
        m2_t = tl.sum(dev * dev, axis=0)
        n_new = n_acc + n_t
        delta = mean_t - mean_acc
        mean_acc = mean_acc + delta * (n_t / n_new)
        m2_acc = m2_acc + m2_t + delta * delta * (n_acc * n_t / n_new)
        n_acc = n_new
    out = c * num_splits + sp
    tl.store(count_ptr + out, n_acc)
    tl.store(mean_ptr + out, mean_acc)
    tl.store(m2_ptr + out, m2_acc)


@triton.jit
def _bn_backward_kernel(x_ptr, a_ptr, b_ptr, mean_ptr, out_ptr, C, S, total,
                        BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    c = (idx // S) % C
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE)
    a = tl.load(a_ptr + c, mask=mask, other=0.0)
    b = tl.load(b_ptr + c, mask=mask, other=0.0)
    mu = tl.load(mean_ptr + c, mask=mask, other=0.0)
    tl.store(out_ptr + idx, (a + b * (x - mu)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_finalize_kernel(count_ptr, mean_p_ptr, m2_p_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr, loss_ptr, C, num_splits,
                        BLOCK_C: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """One program: per channel block, Chan's merge of the splits in fp64, then Σ(μ − rm)², Σ(σ² − rv)²."""
    sq_mean = tl.zeros((BLOCK_C,), dtype=tl.float64)
    sq_var = tl.zeros((BLOCK_C,), dtype=tl.float64)
    sp = tl.arange(0, BLOCK_SPLIT)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        cmask = ch < C
        mask = cmask[:, None] & (sp[None, :] < num_splits)
        offs = ch[:, None] * num_splits + sp[None, :]
        cnt = tl.load(count_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        mu_p = tl.load(mean_p_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        m2_p = tl.load(m2_p_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        total = tl.sum(cnt, axis=1)
        total = tl.where(cmask, total, 1.0)
        mu = tl.sum(cnt * mu_p, axis=1) / total
        dev = tl.where(mask, mu_p - mu[:, None], 0.0)
        var = (tl.sum(m2_p, axis=1) + tl.sum(cnt * dev * dev, axis=1)) / total
        tl.store(mean_ptr + ch, mu.to(mean_ptr.dtype.element_ty), mask=cmask)
        tl.store(var_ptr + ch, var.to(var_ptr.dtype.element_ty), mask=cmask)
        # the norms use the statistics as stored (acc dtype), like the reference's fp32 tensors
        dm = tl.where(cmask, mu.to(mean_ptr.dtype.element_ty).to(tl.float64)
                      - tl.load(rm_ptr + ch, mask=cmask, other=0.0).to(tl.float64), 0.0)
        dv = tl.where(cmask, var.to(var_ptr.dtype.element_ty).to(tl.float64)
                      - tl.load(rv_ptr + ch, mask=cmask, other=0.0).to(tl.float64), 0.0)
        sq_mean += dm * dm
        sq_var += dv * dv
    loss = tl.sqrt(tl.sum(sq_mean, axis=0)) + tl.sqrt(tl.sum(sq_var, axis=0))
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _deviations(mean_ptr, var_ptr, rm_ptr, rv_ptr, ch, cmask):
    """(μ_c − running_mean_c, σ²_c − running_var_c) in fp64 for the channels ``ch``."""
    dm = tl.load(mean_ptr + ch, mask=cmask, other=0.0).to(tl.float64) - \
        tl.load(rm_ptr + ch, mask=cmask, other=0.0).to(tl.float64)
    dv = tl.load(var_ptr + ch, mask=cmask, other=0.0).to(tl.float64) - \
        tl.load(rv_ptr + ch, mask=cmask, other=0.0).to(tl.float64)
    return dm, dv


@triton.jit(do_not_specialize=["M"])  # M == 1 would become a constexpr
def _bn_coefficients_kernel(grad_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, a_ptr, b_ptr, C, M,
                            BLOCK_C: tl.constexpr):
    """One program: the norms (fp64), then a_c = g (μ_c − rm_c) / (‖·‖ M), b_c = 2 g (σ²_c − rv_c) / (‖·‖ M);
    a zero norm gives zero coefficients (as torch.norm's backward)."""
    sq_mean = tl.zeros((BLOCK_C,), dtype=tl.float64)
    sq_var = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        cmask = ch < C
        dm, dv = _deviations(mean_ptr, var_ptr, rm_ptr, rv_ptr, ch, cmask)
        sq_mean += dm * dm
        sq_var += dv * dv
    norm_mean = tl.sqrt(tl.sum(sq_mean, axis=0))
    norm_var = tl.sqrt(tl.sum(sq_var, axis=0))
    g = tl.load(grad_ptr).to(tl.float64)
    M = M.to(tl.float64)
    scale_mean = tl.where(norm_mean > 0, g / (tl.where(norm_mean > 0, norm_mean, 1.0) * M), 0.0)
    scale_var = tl.where(norm_var > 0, 2.0 * g / (tl.where(norm_var > 0, norm_var, 1.0) * M), 0.0)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        cmask = ch < C
        dm, dv = _deviations(mean_ptr, var_ptr, rm_ptr, rv_ptr, ch, cmask)
        tl.store(a_ptr + ch, (scale_mean * dm).to(a_ptr.dtype.element_ty), mask=cmask)
        tl.store(b_ptr + ch, (scale_var * dv).to(b_ptr.dtype.element_ty), mask=cmask)


_BLOCK_C = 128


def bn_stat_forward(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor):
    """x (N, C, S) contiguous → (loss, mean (C,), var (C,)) in the accumulation dtype."""
    n, c, s = x.shape
    m = n * s
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    splits = max(1, min(MAX_SPLIT, triton.cdiv(m, 4 * BLOCK)))
    chunk = triton.cdiv(triton.cdiv(m, splits), BLOCK) * BLOCK
    splits = triton.cdiv(m, chunk)
    count = torch.empty((c, splits), device=x.device, dtype=acc_torch)
    mean = torch.empty_like(count)
    m2 = torch.empty_like(count)
    _bn_partial_kernel[(c, splits)](x, count, mean, m2, c, s, m, chunk, splits, BLOCK=BLOCK, ACC_DTYPE=acc_tl)
    mu = torch.empty(c, device=x.device, dtype=acc_torch)
    var = torch.empty_like(mu)
    loss = torch.empty((), device=x.device, dtype=acc_torch)
    _bn_finalize_kernel[(1,)](count, mean, m2, running_mean, running_var, mu, var, loss, c, splits,
                              BLOCK_C=_BLOCK_C, BLOCK_SPLIT=triton.next_power_of_2(splits))
    return loss, mu, var


def bn_stat_backward(grad, x, running_mean, running_var, mean, var):
    n, c, s = x.shape
    acc_tl, _ = acc_dtypes(x.dtype)
    mean = mean.contiguous()
    a = torch.empty_like(mean)
    b = torch.empty_like(mean)
    _bn_coefficients_kernel[(1,)](grad, mean, var.contiguous(), running_mean, running_var, a, b, c, n * s,
                                  BLOCK_C=_BLOCK_C)
    out = torch.empty_like(x)
    total = x.numel()
    _bn_backward_kernel[(triton.cdiv(total, BLOCK),)](x, a, b, mean, out, c, s, total,
                                                     BLOCK=BLOCK, ACC_DTYPE=acc_tl)
    return out
