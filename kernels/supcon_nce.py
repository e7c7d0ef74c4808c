"""Triton kernels for supcon_nce: tiled z_syn z_realᵀ with an online logsumexp, and its backward.

Forward: one program per block of BLOCK_M anchors walks all real columns in BLOCK_N tiles
(``tl.dot`` over BLOCK_D slices of the feature axis), keeping a running (max, sum) over all
columns and over the positive columns (flash-attention style), or the running sum of the
softplus terms for the nce critic. Only O(n_syn) statistics are written.

Backward: one kernel, launched twice. With ANCHOR_ROWS it produces grad z_syn (row blocks of
anchors, walking real columns); without it grad z_real (row blocks of real samples, walking
anchor columns, the logit tile transposed). Each program recomputes the logit tiles, forms
dL/ds from the saved statistics and accumulates dL/ds @ z_other for a BLOCK_DO slice of the
feature axis (a second grid axis; feature sizes above BLOCK_DO recompute the logits once per
slice). No atomics: every output element has one writer.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes, dot_precision


@triton.jit
def _logit_tile(a_ptr, b_ptr, a_idx, b_idx, a_ok, b_ok, dim, inv_temp,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """s[a, b] = <A[a_idx[a]], B[b_idx[b]]> · inv_temp, accumulated in ACC_DTYPE."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC_DTYPE)
    a_row = a_idx.to(tl.int64) * dim
    b_row = b_idx.to(tl.int64) * dim
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        a = tl.load(a_ptr + a_row[:, None] + d[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_row[:, None] + d[None, :], mask=b_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc * inv_temp


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _forward_kernel(zs_ptr, ys_ptr, zr_ptr, yr_ptr, loss_ptr, lse_all_ptr, lse_pos_ptr,
                    n_syn, n_real, dim, inv_temp, log_c,
                    NCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_syn
    y_row = tl.load(ys_ptr + rows, mask=row_ok, other=-1)
    neg_inf = float("-inf")
    m_all = tl.full((BLOCK_M,), neg_inf, ACC_DTYPE)
    l_all = tl.zeros((BLOCK_M,), ACC_DTYPE)
    m_pos = tl.full((BLOCK_M,), neg_inf, ACC_DTYPE)
    l_pos = tl.zeros((BLOCK_M,), ACC_DTYPE)
    nce_sum = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for c0 in range(0, n_real, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_real
        y_col = tl.load(yr_ptr + cols, mask=col_ok, other=-1)
        s = _logit_tile(zs_ptr, zr_ptr, rows, cols, row_ok, col_ok, dim, inv_temp,
                        BLOCK_M, BLOCK_N, BLOCK_D, ACC_DTYPE, PRECISION)
        pos = (y_row[:, None] == y_col[None, :]) & col_ok[None, :]
        if NCE:
            terms = _softplus(tl.where(pos, log_c - s, s - log_c))
            nce_sum += tl.sum(tl.where(col_ok[None, :], terms, 0.0), axis=1)
        else:
            s_all = tl.where(col_ok[None, :], s, neg_inf)
            m_new = tl.maximum(m_all, tl.max(s_all, axis=1))  # finite: every tile has a valid column
            l_all = l_all * tl.exp(m_all - m_new) + tl.sum(tl.exp(s_all - m_new[:, None]), axis=1)
            m_all = m_new
            s_pos = tl.where(pos, s, neg_inf)
            m_new = tl.maximum(m_pos, tl.max(s_pos, axis=1))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)  # no positive seen yet: keep the sum at 0
            l_pos = l_pos * tl.exp(m_pos - m_safe) + tl.sum(tl.exp(s_pos - m_safe[:, None]), axis=1)
            m_pos = m_new
    if NCE:
        tl.store(loss_ptr + rows, nce_sum, mask=row_ok)
        tl.store(lse_all_ptr + rows, tl.zeros((BLOCK_M,), ACC_DTYPE), mask=row_ok)
        tl.store(lse_pos_ptr + rows, tl.zeros((BLOCK_M,), ACC_DTYPE), mask=row_ok)
    else:
        lse_all = m_all + tl.log(l_all)
        has_pos = m_pos > neg_inf
        lse_pos = tl.where(has_pos, m_pos + tl.log(tl.where(has_pos, l_pos, 1.0)), neg_inf)
        tl.store(loss_ptr + rows, tl.where(has_pos, lse_all - lse_pos, 0.0), mask=row_ok)
        tl.store(lse_all_ptr + rows, lse_all, mask=row_ok)
        tl.store(lse_pos_ptr + rows, lse_pos, mask=row_ok)


@triton.jit
def _backward_kernel(a_ptr, ya_ptr, b_ptr, yb_ptr, g_ptr, lse_all_ptr, lse_pos_ptr, out_ptr,
                     n_a, n_b, dim, inv_temp, log_c,
                     ANCHOR_ROWS: tl.constexpr, NCE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """out[a, d] = inv_temp · Σ_b dL/ds(a, b) · B[b, d] for one row block of A and one slice of d.

    The anchors (with g, lse_all, lse_pos) are the rows of A when ANCHOR_ROWS, else the rows of B."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_a
    d_out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_out_ok = d_out < dim
    y_row = tl.load(ya_ptr + rows, mask=row_ok, other=-1)
    neg_inf = float("-inf")
    if ANCHOR_ROWS:
        g_row = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        lse_all_row = tl.load(lse_all_ptr + rows, mask=row_ok, other=0.0)
        lse_pos_row = tl.load(lse_pos_ptr + rows, mask=row_ok, other=neg_inf)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC_DTYPE)
    for c0 in range(0, n_b, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_b
        y_col = tl.load(yb_ptr + cols, mask=col_ok, other=-1)
        s = _logit_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, dim, inv_temp,
                        BLOCK_M, BLOCK_N, BLOCK_D, ACC_DTYPE, PRECISION)
        pos = y_row[:, None] == y_col[None, :]
        if ANCHOR_ROWS:
            g = g_row[:, None]
            lse_all = lse_all_row[:, None]
            lse_pos = lse_pos_row[:, None]
        else:
            g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)[None, :]
            lse_all = tl.load(lse_all_ptr + cols, mask=col_ok, other=0.0)[None, :]
            lse_pos = tl.load(lse_pos_ptr + cols, mask=col_ok, other=neg_inf)[None, :]
        if NCE:
            ds = g * tl.where(pos, -tl.sigmoid(log_c - s), tl.sigmoid(s - log_c))  # no 1 − σ cancellation
        else:
            has_pos = lse_pos > neg_inf
            p_all = tl.exp(s - lse_all)
            p_pos = tl.exp(tl.where(pos & has_pos, s - lse_pos, neg_inf))  # exp of masked entries: 0, no overflow
            ds = tl.where(has_pos, g * (p_all - p_pos), 0.0)
        ds = tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)
        b_row = cols.to(tl.int64) * dim
        b = tl.load(b_ptr + b_row[:, None] + d_out[None, :], mask=col_ok[:, None] & d_out_ok[None, :], other=0.0)
        acc = tl.dot(ds.to(b.dtype), b, acc, input_precision=PRECISION)
    out_row = rows.to(tl.int64) * dim
    tl.store(out_ptr + out_row[:, None] + d_out[None, :], (acc * inv_temp).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_out_ok[None, :])


def _config(z: torch.Tensor, dim: int):
    """(ACC_DTYPE, torch acc dtype, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO, backward num_warps)."""
    acc_tl, acc_torch = acc_dtypes(z.dtype)
    precision = dot_precision(z)
    d_pow2 = max(16, triton.next_power_of_2(dim))
    if z.is_cuda:
        block_m, block_n = 64, 64
        block_d = min(d_pow2, 64)
        block_do = min(d_pow2, 128)
    else:  # interpreter: big tiles mean fewer interpreted steps
        block_m, block_n = 32, 32
        block_d = min(d_pow2, 128)
        block_do = min(d_pow2, 128)
    num_warps = 8 if z.is_cuda else 4  # the backward's BLOCK_M x BLOCK_DO accumulator needs the registers
    return acc_tl, acc_torch, precision, block_m, block_n, block_d, block_do, num_warps


def supcon_nce_forward(z_syn, y_syn, z_real, y_real, inv_temp: float, nce: bool, log_c: float):
    """(per-anchor loss, lse_all, lse_pos), each (n_syn,) in the accumulation dtype."""
    n_syn, dim = z_syn.shape
    n_real = z_real.shape[0]
    acc_tl, acc_torch, precision, block_m, block_n, block_d, _, _ = _config(z_syn, dim)
    loss = torch.empty(n_syn, device=z_syn.device, dtype=acc_torch)
    lse_all = torch.empty_like(loss)
    lse_pos = torch.empty_like(loss)
    _forward_kernel[(triton.cdiv(n_syn, block_m),)](
        z_syn, y_syn, z_real, y_real, loss, lse_all, lse_pos, n_syn, n_real, dim, inv_temp, log_c,
        NCE=nce, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, ACC_DTYPE=acc_tl, PRECISION=precision)
    return loss, lse_all, lse_pos


def supcon_nce_backward(g, z_syn, y_syn, z_real, y_real, lse_all, lse_pos, inv_temp: float, nce: bool,
                        log_c: float):
    """(grad z_syn, grad z_real) for the per-anchor upstream gradient g (n_syn,)."""
    n_syn, dim = z_syn.shape
    n_real = z_real.shape[0]
    acc_tl, _, precision, block_m, block_n, block_d, block_do, num_warps = _config(z_syn, dim)
    grad_syn = torch.empty_like(z_syn)
    grad_real = torch.empty_like(z_real)
    common = dict(NCE=nce, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DO=block_do,
                  ACC_DTYPE=acc_tl, PRECISION=precision, num_warps=num_warps)
    d_blocks = triton.cdiv(dim, block_do)
    _backward_kernel[(triton.cdiv(n_syn, block_m), d_blocks)](
        z_syn, y_syn, z_real, y_real, g, lse_all, lse_pos, grad_syn, n_syn, n_real, dim, inv_temp, log_c,
        ANCHOR_ROWS=True, **common)
    _backward_kernel[(triton.cdiv(n_real, block_m), d_blocks)](
        z_real, y_real, z_syn, y_syn, g, lse_all, lse_pos, grad_real, n_real, n_syn, dim, inv_temp, log_c,
        ANCHOR_ROWS=False, **common)
    return grad_syn, grad_real
