"""Triton kernels for bn_stat_loss (SRe2L's BatchNorm statistic matching).

Forward: x viewed as (N, C, S); program (c, split) reads its slice of channel c once, tile by
tile, and keeps (count, mean, M2) merged with Chan's parallel update (each tile's mean and M2 are
exact in registers), so the variance never suffers from E[x²] − E[x]² cancellation; fp32
accumulation (fp64 for fp64). The (C, SPLIT) partials are merged the same way on the host side
(C-sized tensor ops, no sync). Backward: one elementwise pass
``grad_x = a_c + b_c (x − μ_c)`` with a_c, b_c folding the norms, 1/M and the incoming gradient.
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


def merge_partials(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Chan's merge of (C, K) partial (count, mean, M2) into per-channel (mean, biased var)."""
    total = count.sum(1)
    mu = (count * mean).sum(1) / total
    m2_all = m2.sum(1) + (count * (mean - mu[:, None]) ** 2).sum(1)
    return mu, m2_all / total


def loss_from_stats(mean, var, running_mean, running_var):
    """The two norms in fp64 (C values): squares of fp32 statistics above ~1e19 would overflow."""
    loss = torch.linalg.vector_norm(mean.double() - running_mean.double()) + \
        torch.linalg.vector_norm(var.double() - running_var.double())
    return loss.to(mean.dtype)


def backward_coefficients(grad, mean, var, running_mean, running_var, m: int):
    """a_c, b_c of grad_x = a_c + b_c (x − μ_c), computed in fp64 (C values); a zero norm gives a zero
    gradient (as torch.norm's backward)."""
    dm = mean.double() - running_mean.double()
    dv = var.double() - running_var.double()
    nm = torch.linalg.vector_norm(dm)
    nv = torch.linalg.vector_norm(dv)
    g = grad.double()
    a = torch.where(nm > 0, g * dm / (nm * m), torch.zeros_like(dm))
    b = torch.where(nv > 0, 2.0 * g * dv / (nv * m), torch.zeros_like(dv))
    return a.to(mean.dtype).contiguous(), b.to(mean.dtype).contiguous()


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
    mu, var = merge_partials(count, mean, m2)
    return loss_from_stats(mu, var, running_mean, running_var), mu, var


def bn_stat_backward(grad, x, running_mean, running_var, mean, var):
    n, c, s = x.shape
    acc_tl, _ = acc_dtypes(x.dtype)
    a, b = backward_coefficients(grad, mean, var, running_mean, running_var, n * s)
    out = torch.empty_like(x)
    total = x.numel()
    _bn_backward_kernel[(triton.cdiv(total, BLOCK),)](x, a, b, mean.contiguous(), out, c, s, total,
                                                     BLOCK=BLOCK, ACC_DTYPE=acc_tl)
    return out
