"""Triton kernels for mmd: symmetric tensor-core distance tiles, and a GEMM-formulated backward.

All kernels see z (R, D) sorted by class (see ddfast/ops/mmd.py for the contract); the rows of a
class form one block of the (block-diagonal) kernel matrix, x rows first, then y rows.

Forward (``_mmd_fwd_kernel``): one program per block of BLOCK rows walks the column tiles of its
classes from its own diagonal tile on (the upper triangle only: every unordered pair once, the
x–x and y–y blocks included). Each tile is a ``tl.dot`` over D in BLOCK_K slices; the distance
``‖a‖² + ‖b‖² − 2<a, b>``, the exp per bandwidth and the bandwidth sum happen in the epilogue, in
registers. A tile adds its row sums to its rows and, off the diagonal, its column sums to its
columns (atomic adds into the O(R) output: several programs own a row's total).

Backward: grad z_i = Σ_j W_ij ∂k(z_i, z_j)/∂z_i with symmetrised upstream weights W. Gaussian:
``Σ_j P_ij (z_i − z_j)`` with ``P = W ∘ Σ_s −2 c_s exp(−c_s d)``, i.e. ``rowsum(P) z − P Z``; linear:
``W Z``. Per panel of Wc columns (a fixed R × Wc workspace), ``_mmd_grad_tile_kernel`` recomputes
each distance tile once over the full D and writes −P (W for the linear kernel) and the panel's row
sums; ``_mmd_gemm_kernel`` adds ``ws Z[panel] + rowsum ∘ z`` to the fp32 gradient (one
read-modify-write of the gradient per panel, not per tile). Both walk only the columns of their
rows' classes, with the same bounds, so the workspace outside them is never read.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes
from .supcon_nce import _mma


@triton.jit
def _dot_tile(z_ptr, stride, rows, rmask, cols, cmask, D,
              BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """<z_rows, z_cols> as a (BLOCK, BLOCK) tile, accumulated over D in BLOCK_K slices."""
    ks = tl.arange(0, BLOCK_K)
    row_off = rows.to(tl.int64)[:, None] * stride
    col_off = cols.to(tl.int64)[None, :] * stride
    dot = tl.zeros((BLOCK, BLOCK), dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        kmask = kk < D
        a = tl.load(z_ptr + row_off + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(z_ptr + col_off + kk[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        dot = _mma(a, b, dot, PRECISION)
    return dot


@triton.jit
def _gaussian(dot, sq_r, sq_c, coef_ptr, NUM_BW: tl.constexpr):
    """Kernel value Σ_s exp(−c_s d) and its derivative factor −2 Σ_s c_s exp(−c_s d), c_s = 1/(2 s²)."""
    d = sq_r[:, None] + sq_c[None, :] - 2.0 * dot
    d = tl.where(d < 0.0, 0.0, d)  # rounding can make it negative; NaN must survive (tl.maximum drops it)
    k = tl.zeros_like(d)
    g = tl.zeros_like(d)
    # a loop, not unrolled: one exp tile live at a time (unrolled, the registers grew with the number
    # of bandwidths: the tf32 Gaussian backward tile needed 255 at 8 bandwidths, 161 as a loop)
    for s in range(NUM_BW):
        c = tl.load(coef_ptr + s)
        e = tl.exp(-c * d)
        k += e
        g -= 2.0 * c * e
    return k, g


@triton.jit
def _row_block(cls_ptr, off_ptr, R, BLOCK: tl.constexpr):
    """Rows of this program and the column range [lo, hi) of the classes they belong to."""
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < R
    first = tl.load(cls_ptr + pid * BLOCK)
    last = tl.load(cls_ptr + tl.minimum(pid * BLOCK + BLOCK, R) - 1)
    lo = tl.load(off_ptr + first)
    hi = tl.load(off_ptr + last + 1)
    return rows, rmask, lo, hi


@triton.jit
def _panel_range(lo, hi, p0, p_len, BLOCK: tl.constexpr):
    """Panel-local column range [k_lo, k_hi) of the class range [lo, hi) inside [p0, p0 + p_len),
    k_lo aligned down to BLOCK (the tiles of the workspace); empty when k_hi <= k_lo."""
    k_lo = (tl.maximum(lo, p0) - p0) // BLOCK * BLOCK
    k_hi = tl.minimum(hi, p0 + p_len) - p0
    return k_lo, k_hi


@triton.jit
def _mmd_fwd_kernel(z_ptr, sq_ptr, cls_ptr, side_ptr, off_ptr, coef_ptr, out_ptr, R, D, stride,
                    NUM_BW: tl.constexpr, LINEAR: tl.constexpr, UNBIASED: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    rows, rmask, lo, hi = _row_block(cls_ptr, off_ptr, R, BLOCK)
    start = tl.program_id(0) * BLOCK
    cls_r = tl.load(cls_ptr + rows, mask=rmask, other=-1)
    is_y_r = tl.load(side_ptr + rows, mask=rmask, other=0) != 0
    sq_r = tl.load(sq_ptr + rows, mask=rmask, other=0.0)
    row_x = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    row_y = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for c0 in range(start, hi, BLOCK):  # the diagonal tile, then the tiles right of it
        cols = c0 + tl.arange(0, BLOCK)
        cmask = cols < hi
        cls_c = tl.load(cls_ptr + cols, mask=cmask, other=-2)
        is_y_c = tl.load(side_ptr + cols, mask=cmask, other=0) != 0
        dot = _dot_tile(z_ptr, stride, rows, rmask, cols, cmask, D, BLOCK, BLOCK_K, ACC_DTYPE, PRECISION)
        if LINEAR:
            kval = dot
        else:
            sq_c = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
            kval, _ = _gaussian(dot, sq_r, sq_c, coef_ptr, NUM_BW)
        valid = cls_r[:, None] == cls_c[None, :]
        if UNBIASED:
            valid = valid & (rows[:, None] != cols[None, :])
        kval = tl.where(valid, kval, 0.0)
        k_ycol = tl.where(is_y_c[None, :], kval, 0.0)
        row_y += tl.sum(k_ycol, axis=1)
        row_x += tl.sum(kval - k_ycol, axis=1)
        if c0 > start:  # off the diagonal: the mirrored pairs (j, i) belong to the column rows
            k_yrow = tl.where(is_y_r[:, None], kval, 0.0)
            col_y = tl.sum(k_yrow, axis=0)
            tl.atomic_add(out_ptr + cols * 2, tl.sum(kval, axis=0) - col_y, mask=cmask)
            tl.atomic_add(out_ptr + cols * 2 + 1, col_y, mask=cmask)
    tl.atomic_add(out_ptr + rows * 2, row_x, mask=rmask)
    tl.atomic_add(out_ptr + rows * 2 + 1, row_y, mask=rmask)


@triton.jit
def _mmd_grad_tile_kernel(grad_ptr, z_ptr, sq_ptr, cls_ptr, side_ptr, off_ptr, coef_ptr, ws_ptr, rs_ptr,
                          R, D, stride, p0, p_len,
                          NUM_BW: tl.constexpr, LINEAR: tl.constexpr, UNBIASED: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                          ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """ws[rows, k] = −P (Gaussian) or W (linear) for the panel columns p0 + k of the rows' classes;
    rs[rows] = the panel's row sums of P (Gaussian)."""
    rows, rmask, lo, hi = _row_block(cls_ptr, off_ptr, R, BLOCK)
    k_lo, k_hi = _panel_range(lo, hi, p0, p_len, BLOCK)
    cls_r = tl.load(cls_ptr + rows, mask=rmask, other=-1)
    sq_r = tl.load(sq_ptr + rows, mask=rmask, other=0.0)
    is_y_r = tl.load(side_ptr + rows, mask=rmask, other=0) != 0
    ga_r = tl.load(grad_ptr + rows * 2, mask=rmask, other=0.0)
    gb_r = tl.load(grad_ptr + rows * 2 + 1, mask=rmask, other=0.0)
    row_sum = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for k0 in range(k_lo, k_hi, BLOCK):
        local = k0 + tl.arange(0, BLOCK)
        cols = p0 + local
        cmask = local < k_hi
        cls_c = tl.load(cls_ptr + cols, mask=cmask, other=-2)
        is_y_c = tl.load(side_ptr + cols, mask=cmask, other=0) != 0
        ga_c = tl.load(grad_ptr + cols * 2, mask=cmask, other=0.0)
        gb_c = tl.load(grad_ptr + cols * 2 + 1, mask=cmask, other=0.0)
        # k(z_i, z_j) enters row i's output (weight by j's side) and row j's (weight by i's side)
        w = (tl.where(is_y_c[None, :], gb_r[:, None], ga_r[:, None])
             + tl.where(is_y_r[:, None], gb_c[None, :], ga_c[None, :]))
        valid = (cls_r[:, None] == cls_c[None, :]) & rmask[:, None]
        if UNBIASED:
            valid = valid & (rows[:, None] != cols[None, :])
        if LINEAR:
            val = tl.where(valid, w, 0.0)
        else:
            dot = _dot_tile(z_ptr, stride, rows, rmask, cols, cmask, D, BLOCK, BLOCK_K, ACC_DTYPE, PRECISION)
            sq_c = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
            _, g = _gaussian(dot, sq_r, sq_c, coef_ptr, NUM_BW)
            p = tl.where(valid, w * g, 0.0)
            row_sum += tl.sum(p, axis=1)
            val = -p
        ws = ws_ptr + rows.to(tl.int64)[:, None] * p_len + local[None, :]
        tl.store(ws, val.to(ws_ptr.dtype.element_ty), mask=rmask[:, None] & (local[None, :] < p_len))
    if not LINEAR:
        tl.store(rs_ptr + rows, row_sum, mask=rmask)


@triton.jit
def _mmd_gemm_kernel(ws_ptr, z_ptr, rs_ptr, cls_ptr, off_ptr, out_ptr, R, D, stride, p0, p_len,
                     ACCUMULATE: tl.constexpr, LINEAR: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """out[rows, d] (+)= Σ_k ws[rows, k] z[p0 + k, d] (+ rs[rows] z[rows, d]) over the rows' class range."""
    rows, rmask, lo, hi = _row_block(cls_ptr, off_ptr, R, BLOCK)
    k_lo, k_hi = _panel_range(lo, hi, p0, p_len, BLOCK)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros((BLOCK, BLOCK_D), dtype=ACC_DTYPE)
    ws_rows = ws_ptr + rows.to(tl.int64)[:, None] * p_len
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        a = tl.load(ws_rows + k[None, :], mask=rmask[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(z_ptr + (p0 + k).to(tl.int64)[:, None] * stride + d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = _mma(a.to(b.dtype), b, acc, PRECISION)
    tile = rows.to(tl.int64)[:, None] * D + d[None, :]
    ok = rmask[:, None] & d_ok[None, :]
    if not LINEAR:
        rs = tl.load(rs_ptr + rows, mask=rmask, other=0.0)
        zr = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride + d[None, :], mask=ok, other=0.0)
        acc += rs[:, None] * zr.to(ACC_DTYPE)
    if ACCUMULATE:
        acc += tl.load(out_ptr + tile, mask=ok, other=0.0)
    tl.store(out_ptr + tile, acc, mask=ok)


class Tiling:
    """Block sizes and warps (the same on every device, so the interpreter launches what a GPU compiles) and
    the backward panel width (CUDA: a 32M-element workspace; the interpreter: 2048 elements, so
    that small tests cross panel boundaries)."""

    def __init__(self, rows: int, dim: int, device: torch.device, dtype: torch.dtype):
        d_pow2 = max(16, triton.next_power_of_2(dim))
        wide = dtype == torch.float64
        self.block = 32 if wide else 64
        # warps of the two distance-tile kernels: over 4 warps a 64 x 64 tile is 32 elements per thread
        # for each live tile (products, distances, weights, 64-bit store addresses), and sm_90 builds
        # spilled (fp32 FMA forward 36 B, Gaussian backward 60-264 B); 8 warps halve that. fp64's
        # 32 x 32 tiles stay at 4 warps (at 8 ptxas capped the forward at 128 registers and spilled)
        self.warps = 4 if wide else 8
        self.block_k = min(d_pow2, 16 if wide else 32)  # fp64: 32-wide D slices spilled 20 B (forward)
        self.gemm_k = 32
        self.gemm_d = min(d_pow2, 64 if wide else 128)
        budget = (1 << 25) if device.type == "cuda" else 2048
        panel = max(self.block, budget // max(rows, 1) // self.block * self.block)
        self.panel = min(panel, triton.cdiv(rows, self.block) * self.block)

    def executed_flops(self, class_rows, dim: int) -> float:
        """Multiply-adds ×2 the kernels issue for classes of the given sizes (n_c + m_c rows each),
        tile padding included, each class taken as tile-aligned (the bench's work model)."""
        pad_d = triton.cdiv(dim, self.block_k) * self.block_k
        total = 0.0
        for r in class_rows:
            t = triton.cdiv(int(r), self.block)
            tile = 2.0 * self.block * self.block * pad_d
            total += tile * t * (t + 1) / 2   # forward: upper triangle and diagonal tiles
            total += tile * t * t             # backward: every tile's distances once
            total += 2.0 * (t * self.block) ** 2 * (triton.cdiv(dim, self.gemm_d) * self.gemm_d)  # P Z
        return total


def _setup(z, coefs, linear, precision):
    from ..ops._precision import round_operand

    acc_tl, acc_torch = acc_dtypes(z.dtype)
    # the norms come from the operands the dot products see, so ‖a‖² + ‖b‖² − 2<a, b> stays consistent
    sq = round_operand(z, precision).to(acc_torch).pow(2).sum(1)
    t = Tiling(z.shape[0], z.shape[1], z.device, z.dtype)
    meta = dict(NUM_BW=0 if linear else coefs.numel(), LINEAR=linear, BLOCK=t.block, BLOCK_K=t.block_k,
                ACC_DTYPE=acc_tl, PRECISION=precision)
    if coefs.numel() == 0:  # linear kernel: never read, but launch with a valid pointer
        coefs = sq
    return sq, coefs, acc_torch, meta, t


def mmd_forward(z, cls, side, offsets, coefs, linear: bool, unbiased: bool, precision: str):
    """(R, 2) per-row kernel sums over same-class x and y columns (accumulation dtype)."""
    rows, dim = z.shape
    sq, coefs, acc_torch, meta, t = _setup(z, coefs, linear, precision)
    out = torch.zeros((rows, 2), dtype=acc_torch, device=z.device)
    _mmd_fwd_kernel[(triton.cdiv(rows, t.block),)](z, sq, cls, side, offsets, coefs, out, rows, dim, z.stride(0),
                                                   UNBIASED=unbiased, num_warps=t.warps, **meta)
    return out


def mmd_backward(grad, z, cls, side, offsets, coefs, linear: bool, unbiased: bool, precision: str):
    """grad_z (R, D) in z's dtype, given the gradient (R, 2) of mmd_forward's output."""
    rows, dim = z.shape
    sq, coefs, acc_torch, meta, t = _setup(z, coefs, linear, precision)
    ws_dtype = torch.bfloat16 if precision == "bf16" else z.dtype
    ws = torch.empty((rows, t.panel), dtype=ws_dtype, device=z.device)
    row_sums = torch.empty(rows, dtype=acc_torch, device=z.device)
    out = torch.empty((rows, dim), dtype=acc_torch, device=z.device)
    grad = grad.to(acc_torch).contiguous()
    grid_rows = triton.cdiv(rows, t.block)
    for p0 in range(0, rows, t.panel):
        _mmd_grad_tile_kernel[(grid_rows,)](grad, z, sq, cls, side, offsets, coefs, ws, row_sums, rows, dim,
                                            z.stride(0), p0, t.panel, UNBIASED=unbiased, num_warps=t.warps, **meta)
        _mmd_gemm_kernel[(grid_rows, triton.cdiv(dim, t.gemm_d))](
            ws, z, row_sums, cls, offsets, out, rows, dim, z.stride(0), p0, t.panel, ACCUMULATE=p0 > 0,
            LINEAR=linear, BLOCK=t.block, BLOCK_K=t.gemm_k, BLOCK_D=t.gemm_d, ACC_DTYPE=meta["ACC_DTYPE"],
            PRECISION=precision)
    return out.to(z.dtype)
