"""Triton kernels for mmd: flash-attention-style tiled kernel sums and their fused backward.

Both kernels see z (R, D) sorted by class (see ddfast/ops/mmd.py for the contract). Each program
owns BLOCK_M rows and walks the column tiles of its rows' classes only (block-diagonal), computing
distance tiles ‖a‖² + ‖b‖² − 2<a, b> with tl.dot over D chunks; the kernel values never leave
registers, so memory is O(R·D) for the inputs and O(R) for the outputs.

Forward: per row, Σ k over same-class x columns and y columns.
Backward: with upstream weights W (symmetrised: row i against column j plus column j against row i),
grad z_i = Σ_j W_ij ∂k(z_i, z_j)/∂z_i. For the Gaussian kernel that is
Σ_j P_ij (z_i − z_j) with P = W·Σ_s −exp(−d/(2s²))/s²: a row sum of P times z_i minus the matmul P·Z;
for the linear kernel Σ_j W_ij z_j. The (BLOCK_M, D) gradient accumulator is too wide for
registers when D is large, so the owning program accumulates it in an fp32 (fp64) workspace in
global memory: only that program touches those rows, so there are no atomics and no races.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes, dot_precision

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def _dot_tile(z_ptr, stride, rows, rmask, cols, cmask, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """<z_rows, z_cols> as a (BLOCK_M, BLOCK_N) tile, accumulated over D in BLOCK_K chunks."""
    ks = tl.arange(0, BLOCK_K)
    row_off = rows.to(tl.int64)[:, None] * stride
    col_off = cols.to(tl.int64)[None, :] * stride
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        kmask = kk < D
        a = tl.load(z_ptr + row_off + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(z_ptr + col_off + kk[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        dot = tl.dot(a, b, dot, input_precision=PRECISION)
    return dot


@triton.jit
def _gaussian(dot, sq_r, sq_c, coef_ptr, NUM_BW: tl.constexpr):
    """Kernel value Σ_s exp(−c_s d) and its derivative factor −2 Σ_s c_s exp(−c_s d), c_s = 1/(2 s²)."""
    d = sq_r[:, None] + sq_c[None, :] - 2.0 * dot
    d = tl.where(d < 0.0, 0.0, d)  # rounding can make it negative; NaN must survive (tl.maximum drops it)
    k = tl.zeros_like(d)
    g = tl.zeros_like(d)
    for s in tl.static_range(NUM_BW):
        c = tl.load(coef_ptr + s)
        e = tl.exp(-c * d)
        k += e
        g -= 2.0 * c * e
    return k, g


@triton.jit
def _row_block(cls_ptr, off_ptr, R, BLOCK_M: tl.constexpr):
    """Rows of this program and the column range [lo, hi) of the classes they belong to."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    first = tl.load(cls_ptr + pid * BLOCK_M)
    last = tl.load(cls_ptr + tl.minimum(pid * BLOCK_M + BLOCK_M, R) - 1)
    lo = tl.load(off_ptr + first)
    hi = tl.load(off_ptr + last + 1)
    return rows, rmask, lo, hi


@triton.jit
def _mmd_fwd_kernel(z_ptr, sq_ptr, cls_ptr, side_ptr, off_ptr, coef_ptr, out_ptr, R, D, stride,
                    NUM_BW: tl.constexpr, LINEAR: tl.constexpr, UNBIASED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    rows, rmask, lo, hi = _row_block(cls_ptr, off_ptr, R, BLOCK_M)
    cls_r = tl.load(cls_ptr + rows, mask=rmask, other=-1)
    sq_r = tl.load(sq_ptr + rows, mask=rmask, other=0.0)
    sum_x = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    sum_y = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for c0 in range(lo, hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        cls_c = tl.load(cls_ptr + cols, mask=cmask, other=-2)
        is_y = tl.load(side_ptr + cols, mask=cmask, other=0) != 0
        dot = _dot_tile(z_ptr, stride, rows, rmask, cols, cmask, D, BLOCK_M, BLOCK_N, BLOCK_K, ACC_DTYPE, PRECISION)
        if LINEAR:
            kval = dot
        else:
            sq_c = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
            kval, _ = _gaussian(dot, sq_r, sq_c, coef_ptr, NUM_BW)
        valid = cls_r[:, None] == cls_c[None, :]
        if UNBIASED:
            valid = valid & (rows[:, None] != cols[None, :])
        kval = tl.where(valid, kval, 0.0)
        k_y = tl.where(is_y[None, :], kval, 0.0)
        sum_y += tl.sum(k_y, axis=1)
        sum_x += tl.sum(kval - k_y, axis=1)
    tl.store(out_ptr + rows * 2, sum_x, mask=rmask)
    tl.store(out_ptr + rows * 2 + 1, sum_y, mask=rmask)


@triton.jit
def _mmd_bwd_kernel(grad_ptr, z_ptr, sq_ptr, cls_ptr, side_ptr, off_ptr, coef_ptr, ws_ptr, R, D, stride,
                    NUM_BW: tl.constexpr, LINEAR: tl.constexpr, UNBIASED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    rows, rmask, lo, hi = _row_block(cls_ptr, off_ptr, R, BLOCK_M)
    cls_r = tl.load(cls_ptr + rows, mask=rmask, other=-1)
    sq_r = tl.load(sq_ptr + rows, mask=rmask, other=0.0)
    is_y_r = tl.load(side_ptr + rows, mask=rmask, other=0) != 0
    ga_r = tl.load(grad_ptr + rows * 2, mask=rmask, other=0.0)
    gb_r = tl.load(grad_ptr + rows * 2 + 1, mask=rmask, other=0.0)
    ks = tl.arange(0, BLOCK_K)
    ws_rows = ws_ptr + rows.to(tl.int64)[:, None] * D
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for c0 in range(lo, hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        cls_c = tl.load(cls_ptr + cols, mask=cmask, other=-2)
        is_y_c = tl.load(side_ptr + cols, mask=cmask, other=0) != 0
        ga_c = tl.load(grad_ptr + cols * 2, mask=cmask, other=0.0)
        gb_c = tl.load(grad_ptr + cols * 2 + 1, mask=cmask, other=0.0)
        # k(z_i, z_j) enters row i's output (weight by j's side) and row j's (weight by i's side)
        w = (tl.where(is_y_c[None, :], gb_r[:, None], ga_r[:, None])
             + tl.where(is_y_r[:, None], gb_c[None, :], ga_c[None, :]))
        valid = cls_r[:, None] == cls_c[None, :]
        if UNBIASED:
            valid = valid & (rows[:, None] != cols[None, :])
        if LINEAR:
            p = tl.where(valid, w, 0.0)
        else:
            dot = _dot_tile(z_ptr, stride, rows, rmask, cols, cmask, D, BLOCK_M, BLOCK_N, BLOCK_K, ACC_DTYPE,
                            PRECISION)
            sq_c = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
            _, g = _gaussian(dot, sq_r, sq_c, coef_ptr, NUM_BW)
            p = tl.where(valid, w * g, 0.0)
            row_sum += tl.sum(p, axis=1)
        p_in = p.to(z_ptr.dtype.element_ty)
        col_off = cols.to(tl.int64)[:, None] * stride
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            kmask = kk < D
            zc = tl.load(z_ptr + col_off + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            part = tl.dot(p_in, zc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            wmask = rmask[:, None] & kmask[None, :]
            cur = tl.load(ws_rows + kk[None, :], mask=wmask, other=0.0)
            # Gaussian: grad_i = row_sum_i z_i − Σ_j P_ij z_j ; linear: + Σ_j W_ij z_j
            if LINEAR:
                cur += part
            else:
                cur -= part
            tl.store(ws_rows + kk[None, :], cur, mask=wmask)
    if not LINEAR:
        row_off = rows.to(tl.int64)[:, None] * stride
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            kmask = kk < D
            wmask = rmask[:, None] & kmask[None, :]
            zr = tl.load(z_ptr + row_off + kk[None, :], mask=wmask, other=0.0).to(ACC_DTYPE)
            cur = tl.load(ws_rows + kk[None, :], mask=wmask, other=0.0)
            tl.store(ws_rows + kk[None, :], cur + row_sum[:, None] * zr, mask=wmask)


def _config(z: torch.Tensor):
    acc_tl, acc_torch = acc_dtypes(z.dtype)
    return acc_tl, acc_torch, dot_precision(z)


def _common(z, coefs, linear):
    acc_tl, acc_torch, precision = _config(z)
    sq = z.to(acc_torch).pow(2).sum(1)
    meta = dict(NUM_BW=0 if linear else coefs.numel(), LINEAR=linear, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_K=BLOCK_K, ACC_DTYPE=acc_tl, PRECISION=precision)
    if coefs.numel() == 0:  # linear kernel: never read, but launch with a valid pointer
        coefs = sq
    return sq, coefs, acc_torch, meta


def mmd_forward(z, cls, side, offsets, coefs, linear: bool, unbiased: bool):
    """(R, 2) per-row kernel sums over same-class x and y columns (accumulation dtype)."""
    rows, dim = z.shape
    sq, coefs, acc_torch, meta = _common(z, coefs, linear)
    out = torch.empty((rows, 2), dtype=acc_torch, device=z.device)
    _mmd_fwd_kernel[(triton.cdiv(rows, BLOCK_M),)](z, sq, cls, side, offsets, coefs, out, rows, dim, z.stride(0),
                                                   UNBIASED=unbiased, **meta)
    return out


def mmd_backward(grad, z, cls, side, offsets, coefs, linear: bool, unbiased: bool):
    """grad_z (R, D) in z's dtype, given the gradient (R, 2) of mmd_forward's output."""
    rows, dim = z.shape
    sq, coefs, acc_torch, meta = _common(z, coefs, linear)
    ws = torch.zeros((rows, dim), dtype=acc_torch, device=z.device)
    _mmd_bwd_kernel[(triton.cdiv(rows, BLOCK_M),)](grad.to(acc_torch).contiguous(), z, sq, cls, side, offsets, coefs,
                                                   ws, rows, dim, z.stride(0), UNBIASED=unbiased, **meta)
    return ws.to(z.dtype)
