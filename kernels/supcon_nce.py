"""Triton kernels for supcon_nce: a split online-logsumexp forward and a GEMM-formulated backward.

Logits ``s_ij = T⁻¹ r_i r_j <f_syn_i, f_real_j>`` with row scales r (1/max(‖f‖, eps) when the op
normalises, else 1): the L2 normalisation is fused, no normalised copy of the features is made.

Forward (flash-attention-2 style): the grid is (anchor blocks, splits of the real columns), so
that n_syn from 10 to 5000 fills the GPU; each program keeps an online (max, sum) over all and over
the positive columns of its split (or the softplus sum of the nce critic) and writes one partial
per anchor and split; the launcher merges the partials with a logsumexp (O(splits · n_syn)).

Backward, per chunk of W real columns (a fixed workspace of n_syn × W): ``_grad_logits_kernel``
recomputes each logit tile once over the full feature axis (D in BLOCK_D slices: no FLOP blow-up
for D > 256) and writes ``G'_ij = T⁻¹ r_i r_j dL/ds_ij`` into the workspace, plus the row/column
sums of ``dL/ds ∘ s`` that the normalisation's backward needs; ``_gemm_kernel`` then forms
``grad f_syn += G' f_real[chunk]`` (accumulated over chunks in fp32) and
``grad f_real[chunk] = G'ᵀ f_syn`` (written once), each with the normalisation term
``− r² (Σ dL/ds ∘ s) f`` in its epilogue. Executed FLOPs: 2·n_syn·n_real·D forward, 6·n_syn·n_real·D
backward (one logit recompute, two products); the eager reference does 2 + 4.

Gradient in the forward (``supcon_nce_fused``; the op takes it for "mean"/"sum" when a feature
set requires grad, as Liger-Kernel's fused linear cross-entropy does): panels of P synthetic rows
with P · n_real within a fixed workspace (16M elements on CUDA). Per panel ``_forward_kernel``
(STORE_LOGITS) computes the logits once and stores them, the merged partials give the row
statistics, ``_grad_logits_kernel`` (LOAD_LOGITS) turns the stored logits into G' in place, and
``_gemm_kernel`` forms the panel's rows of grad f_syn (final: the panel holds every real column)
and adds the panel's share to grad f_real. 6·n_syn·n_real·D FLOPs in all, the reference's count;
the backward only scales the saved gradients. When one row of logits does not fit, or for
reduction "none" or without grad, the op keeps the split forward and the recomputing backward.

PRECISION (constexpr) of every tl.dot: "ieee" (exact fp32 products), "tf32", "tf32x3", or "bf16"
(fp32 operands rounded to bf16, fp32 accumulation). bf16/fp16 inputs use their own type.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes, acc_scalar, sm_count

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
BLOCK_M = 64  # anchor rows per program (every kernel, every dtype)
NORM_EPS = 1e-12  # F.normalize's default eps: rows with a smaller norm are divided by eps instead


def row_scales(f: torch.Tensor, normalize: bool):
    """(r, k): r = 1/max(‖f_i‖, eps) (ones without normalize) and k = r² where the norm exceeds eps
    (the weight of the normalisation's backward term; 0 where F.normalize divides by the constant eps)."""
    _, acc = acc_dtypes(f.dtype)
    if not normalize:
        ones = torch.ones(f.shape[0], device=f.device, dtype=acc)
        return ones, torch.zeros_like(ones)
    norm = torch.linalg.vector_norm(f, dim=1, dtype=acc)
    r = 1.0 / norm.clamp_min(NORM_EPS)
    return r, torch.where(norm > NORM_EPS, r * r, torch.zeros_like(r))


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with the requested operand precision (fp32 accumulation for 16-bit operands).
    out_dtype is acc's: Triton before 3.7 asserts it equals acc's dtype and defaults it to fp32,
    which rejected the fp64 kernels (seen on an H200 with Triton 3.6)."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _logit_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, scale_r, scale_c, dim,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """s[i, j] = scale_r[i] · scale_c[j] · <A[rows[i]], B[cols[j]]>, the feature axis in BLOCK_D slices."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    a_row = rows.to(tl.int64) * dim
    b_row = cols.to(tl.int64) * dim
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        a = tl.load(a_ptr + a_row[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_row[None, :] + d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = _mma(a, b, acc, PRECISION)
    return acc * scale_r[:, None] * scale_c[None, :]


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _forward_kernel(fs_ptr, ys_ptr, fr_ptr, yr_ptr, rs_ptr, rr_ptr, part_a_ptr, part_b_ptr, ws_ptr, ws_stride,
                    n_syn, n_real, dim, cols_per_split, inv_temp: tl.float64, log_c: tl.float64,
                    NCE: tl.constexpr, STORE_LOGITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Partials of one (anchor block, column split): infonce → lse over all / positive columns
    (−inf when the split has none), nce → the sum of the critic's softplus terms (part_b unused).
    STORE_LOGITS: also write each logit tile to ws[i, j] (row stride ws_stride), for the
    gradient-in-forward path, which then never recomputes them."""
    inv_temp, log_c = acc_scalar(inv_temp, ACC_DTYPE), acc_scalar(log_c, ACC_DTYPE)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_syn
    split = tl.program_id(1)
    c_lo = split * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, n_real)
    y_row = tl.load(ys_ptr + rows, mask=row_ok, other=-1)
    scale_r = tl.load(rs_ptr + rows, mask=row_ok, other=0.0) * inv_temp
    neg_inf = float("-inf")
    m_all = tl.full((BLOCK_M,), neg_inf, ACC_DTYPE)
    l_all = tl.zeros((BLOCK_M,), ACC_DTYPE)
    m_pos = tl.full((BLOCK_M,), neg_inf, ACC_DTYPE)
    l_pos = tl.zeros((BLOCK_M,), ACC_DTYPE)
    nce_sum = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_hi
        y_col = tl.load(yr_ptr + cols, mask=col_ok, other=-1)
        scale_c = tl.load(rr_ptr + cols, mask=col_ok, other=0.0)
        s = _logit_tile(fs_ptr, fr_ptr, rows, cols, row_ok, col_ok, scale_r, scale_c, dim,
                        BLOCK_M, BLOCK_N, BLOCK_D, ACC_DTYPE, PRECISION)
        if STORE_LOGITS:
            tl.store(ws_ptr + rows.to(tl.int64)[:, None] * ws_stride + cols[None, :], s,
                     mask=row_ok[:, None] & col_ok[None, :])
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
    out = split.to(tl.int64) * n_syn + rows
    if NCE:
        tl.store(part_a_ptr + out, nce_sum, mask=row_ok)
    else:
        lse_all = tl.where(l_all > 0, m_all + tl.log(tl.where(l_all > 0, l_all, 1.0)), neg_inf)
        lse_pos = tl.where(l_pos > 0, m_pos + tl.log(tl.where(l_pos > 0, l_pos, 1.0)), neg_inf)
        tl.store(part_a_ptr + out, lse_all, mask=row_ok)
        tl.store(part_b_ptr + out, lse_pos, mask=row_ok)


@triton.jit
def _grad_logits_kernel(fs_ptr, ys_ptr, fr_ptr, yr_ptr, rs_ptr, rr_ptr, g_ptr, lse_all_ptr, lse_pos_ptr,
                        ws_ptr, q_syn_ptr, q_real_ptr, n_syn, n_real, dim, c0, ws_cols, inv_temp: tl.float64,
                        log_c: tl.float64, NCE: tl.constexpr, NORMALIZE: tl.constexpr, LOAD_LOGITS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One (anchor block, column tile) of the chunk starting at real column c0: the logit tile once
    (LOAD_LOGITS: read from ws, where _forward_kernel stored it; else recomputed from the features),
    G' = T⁻¹ r_i r_j dL/ds into ws[:, j − c0] (in place), and q = Σ dL/ds ∘ s per anchor / real column."""
    inv_temp, log_c = acc_scalar(inv_temp, ACC_DTYPE), acc_scalar(log_c, ACC_DTYPE)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_syn
    local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = c0 + local
    col_ok = (local < ws_cols) & (cols < n_real)
    y_row = tl.load(ys_ptr + rows, mask=row_ok, other=-1)
    y_col = tl.load(yr_ptr + cols, mask=col_ok, other=-2)
    r_row = tl.load(rs_ptr + rows, mask=row_ok, other=0.0)
    r_col = tl.load(rr_ptr + cols, mask=col_ok, other=0.0)
    out = rows.to(tl.int64)[:, None] * ws_cols + local[None, :]
    if LOAD_LOGITS:
        s = tl.load(ws_ptr + out, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC_DTYPE)
    else:
        s = _logit_tile(fs_ptr, fr_ptr, rows, cols, row_ok, col_ok, r_row * inv_temp, r_col, dim,
                        BLOCK_M, BLOCK_N, BLOCK_D, ACC_DTYPE, PRECISION)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)[:, None]
    pos = y_row[:, None] == y_col[None, :]
    if NCE:
        ds = g * tl.where(pos, -tl.sigmoid(log_c - s), tl.sigmoid(s - log_c))  # no 1 − σ cancellation
    else:
        lse_all = tl.load(lse_all_ptr + rows, mask=row_ok, other=0.0)[:, None]
        lse_pos = tl.load(lse_pos_ptr + rows, mask=row_ok, other=float("-inf"))[:, None]
        has_pos = lse_pos > float("-inf")
        p_all = tl.exp(s - lse_all)
        p_pos = tl.exp(tl.where(pos & has_pos, s - lse_pos, float("-inf")))  # masked entries: exp(−inf) = 0
        ds = tl.where(has_pos, g * (p_all - p_pos), 0.0)
    ds = tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)
    if NORMALIZE:
        q = ds * s
        tl.atomic_add(q_syn_ptr + rows, tl.sum(q, axis=1), mask=row_ok)
        tl.atomic_add(q_real_ptr + cols, tl.sum(q, axis=0), mask=col_ok)
    g_feat = ds * (r_row * inv_temp)[:, None] * r_col[None, :]
    tl.store(ws_ptr + out, g_feat.to(ws_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemm_kernel(a_ptr, sa_r, sa_k, b_ptr, c_ptr, corr_ptr, out_ptr, n_rows, n_k, dim, k_split, split_stride,
                 ACCUMULATE: tl.constexpr, CORRECT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """out[r, d] = [out[r, d]] + Σ_k A[r, k] B[k, d] + corr[r] C[r, d] for one (row, feature) tile.

    A is addressed with strides (sa_r, sa_k) so a transposed workspace needs no copy; B and C are
    row-major with `dim` columns; out is row-major with `dim` columns (one writer per element).
    Split K (grid axis 2, for few rows and a long K): program s sums k in [s·k_split, (s+1)·k_split)
    into out + s·split_stride; the correction and the accumulation belong to split 0, the caller
    sums the partials."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    split = tl.program_id(2)
    k_lo = split * k_split
    k_hi = tl.minimum(k_lo + k_split, n_k)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    a_row = rows.to(tl.int64) * sa_r
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        a = tl.load(a_ptr + a_row[:, None] + k.to(tl.int64)[None, :] * sa_k,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + k.to(tl.int64)[:, None] * dim + d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = _mma(a.to(b.dtype), b, acc, PRECISION)
    tile = rows.to(tl.int64)[:, None] * dim + d[None, :]
    ok = row_ok[:, None] & d_ok[None, :]
    first = ok & (rows * 0 + split == 0)[:, None]  # a block mask (the interpreter rejects a scalar one)
    if CORRECT:
        corr = tl.load(corr_ptr + rows, mask=row_ok, other=0.0)
        acc += corr[:, None] * tl.load(c_ptr + tile, mask=first, other=0.0).to(ACC_DTYPE)
    if ACCUMULATE:
        acc += tl.load(out_ptr + tile, mask=first, other=0.0).to(ACC_DTYPE)
    dst = out_ptr + split.to(tl.int64) * split_stride
    tl.store(dst + tile, acc.to(out_ptr.dtype.element_ty), mask=ok)


# --- launchers ----------------------------------------------------------------------------------

class Tiling:
    """Block sizes (the same on every device, so the interpreter launches what a GPU compiles),
    the forward's column splits and the backward's chunk width (CUDA: a 4M-element workspace;
    the interpreter: 256 elements, so that small tests cross chunk and split boundaries).
    fp64, and fp32 with exact ("ieee") products, take 32-column tiles, fp64 also 16-wide feature
    slices: the forward's 64 × 64 fp32 FMA tile spilled 32-88 bytes on sm_90 at 255 registers (32
    columns: 158, no spill), its fp64 tile with 32-wide slices 16-32 bytes (16-wide: none)."""

    def __init__(self, n_syn: int, n_real: int, dim: int, device: torch.device, dtype: torch.dtype,
                 precision: str = "ieee"):
        d_pow2 = max(16, triton.next_power_of_2(dim))
        wide = dtype == torch.float64
        fma = dtype == torch.float32 and precision == "ieee"
        self.block_m = BLOCK_M
        self.block_n = 32 if wide or fma else 64
        self.block_d = min(d_pow2, 16 if wide else 32)
        self.gemm_k = 32
        self.gemm_d = min(d_pow2, 64 if wide else 128)
        col_tiles = triton.cdiv(n_real, self.block_n)
        row_blocks = triton.cdiv(n_syn, self.block_m)
        want = 4 * sm_count(device, cpu=4)  # programs to keep every SM busy, whatever n_syn is
        self.splits = max(1, min(col_tiles, triton.cdiv(want, row_blocks)))
        self.cols_per_split = triton.cdiv(col_tiles, self.splits) * self.block_n
        self.splits = triton.cdiv(n_real, self.cols_per_split)
        budget = (1 << 22) if device.type == "cuda" else 256  # workspace elements (n_syn × W)
        w = max(self.block_n, budget // max(n_syn, 1) // self.block_n * self.block_n)
        self.chunk = min(w, triton.cdiv(n_real, self.block_n) * self.block_n)

    def executed_flops(self, n_syn: int, n_real: int, dim: int) -> float:
        """Multiply-adds ×2 the kernels issue, tile padding included (the bench's work model)."""
        pad = lambda v, b: triton.cdiv(v, b) * b  # noqa: E731
        logits = 2.0 * pad(n_syn, self.block_m) * pad(n_real, self.block_n) * pad(dim, self.block_d)
        products = 2.0 * 2.0 * pad(n_syn, self.gemm_k) * pad(n_real, self.gemm_k) * pad(dim, self.gemm_d)
        return 2 * logits + products


def _dot_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else dtype


def _merge_partials(part_a, part_b, nce: bool):
    """(per-anchor loss, lse_all, lse_pos) from the forward's (splits, rows) partials."""
    if nce:
        zeros = torch.zeros_like(part_a[0])
        return part_a.sum(0), zeros, zeros.clone()
    lse_all = torch.logsumexp(part_a, 0)
    lse_pos = torch.logsumexp(part_b, 0)  # −inf where no split saw a positive
    per_anchor = torch.where(lse_pos > float("-inf"), lse_all - lse_pos, torch.zeros_like(lse_all))
    return per_anchor, lse_all, lse_pos


def supcon_nce_forward(f_syn, y_syn, f_real, y_real, inv_temp: float, nce: bool, log_c: float, normalize: bool,
                       precision: str):
    """(per-anchor loss, lse_all, lse_pos), each (n_syn,) in the accumulation dtype."""
    n_syn, dim = f_syn.shape
    r_syn, _ = row_scales(f_syn, normalize)
    r_real, _ = row_scales(f_real, normalize)
    n_real = f_real.shape[0]
    acc_tl, acc_torch = acc_dtypes(f_syn.dtype)
    t = Tiling(n_syn, n_real, dim, f_syn.device, f_syn.dtype, precision)
    part_a = torch.empty((t.splits, n_syn), device=f_syn.device, dtype=acc_torch)
    part_b = torch.empty_like(part_a)
    _forward_kernel[(triton.cdiv(n_syn, t.block_m), t.splits)](
        f_syn, y_syn, f_real, y_real, r_syn, r_real, part_a, part_b, part_a, 0, n_syn, n_real, dim,
        t.cols_per_split, inv_temp, log_c, NCE=nce, STORE_LOGITS=False, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BLOCK_D=t.block_d, ACC_DTYPE=acc_tl, PRECISION=precision)
    return _merge_partials(part_a, part_b, nce)


def gemm(a, a_strides, b, out, *, n_rows, n_k, accumulate, corr=None, c=None, precision, block_m, block_k,
         block_d, splits=1):
    """out (+)= A @ B (+ corr[:, None] * C) with the Triton tile GEMM (A addressed by a_strides).
    splits > 1 (not with accumulate): K in that many slices, whose partials go to an accumulation-dtype
    scratch (splits, n_rows, D) and are summed there (deterministic, no atomics)."""
    dim = b.shape[1]
    acc_tl, acc_torch = acc_dtypes(b.dtype)
    k_split = triton.cdiv(triton.cdiv(n_k, splits), block_k) * block_k
    splits = triton.cdiv(n_k, k_split)
    if accumulate and splits > 1:
        raise ValueError("gemm: split K does not accumulate into out")
    target = out if splits == 1 else torch.empty((splits, n_rows, dim), device=out.device, dtype=acc_torch)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(dim, block_d), splits)
    _gemm_kernel[grid](a, a_strides[0], a_strides[1], b, b if c is None else c, out if corr is None else corr,
                       target, n_rows, n_k, dim, k_split, n_rows * dim, ACCUMULATE=accumulate,
                       CORRECT=corr is not None, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d, ACC_DTYPE=acc_tl,
                       PRECISION=precision)
    if splits > 1:
        out.copy_(target.sum(0))


SPLIT_K_SCRATCH = 1 << 22  # elements of the split-K partials (16 MB fp32)


def k_splits(n_rows: int, n_k: int, dim: int, t: "Tiling", device: torch.device) -> int:
    """K slices for a GEMM with few output tiles (a panel's rows of grad f_syn: P × D outputs, K = n_real):
    enough programs to fill the GPU, at least 8 K-blocks each on CUDA (1 in the interpreter, so tests
    cross the slices), partials within SPLIT_K_SCRATCH."""
    tiles = triton.cdiv(n_rows, t.block_m) * triton.cdiv(dim, t.gemm_d)
    want = triton.cdiv(4 * sm_count(device, cpu=4), tiles)
    min_blocks = 8 if device.type == "cuda" else 1
    most = triton.cdiv(n_k, min_blocks * t.gemm_k)
    return max(1, min(want, most, SPLIT_K_SCRATCH // max(n_rows * dim, 1)))


def supcon_nce_backward(g, f_syn, y_syn, f_real, y_real, lse_all, lse_pos, inv_temp: float, nce: bool,
                        log_c: float, normalize: bool, precision: str):
    """(grad f_syn, grad f_real) for the per-anchor upstream gradient g (n_syn,), normalisation included."""
    n_syn, dim = f_syn.shape
    r_syn, k_syn = row_scales(f_syn, normalize)
    r_real, k_real = row_scales(f_real, normalize)
    n_real = f_real.shape[0]
    acc_tl, acc_torch = acc_dtypes(f_syn.dtype)
    t = Tiling(n_syn, n_real, dim, f_syn.device, f_syn.dtype, precision)
    ws = torch.empty((n_syn, t.chunk), device=f_syn.device, dtype=_dot_dtype(f_syn.dtype, precision))
    grad_syn = torch.empty((n_syn, dim), device=f_syn.device, dtype=acc_torch)
    grad_real = torch.empty_like(f_real)
    q_syn = torch.zeros(n_syn, device=f_syn.device, dtype=acc_torch)
    q_real = torch.zeros(n_real, device=f_syn.device, dtype=acc_torch)
    gemm_tiles = dict(precision=precision, block_m=t.block_m, block_k=t.gemm_k, block_d=t.gemm_d)
    for c0 in range(0, n_real, t.chunk):
        width = min(t.chunk, n_real - c0)
        if normalize and c0 > 0:
            q_syn.zero_()  # this chunk's share only: the epilogue term is linear in q
        _grad_logits_kernel[(triton.cdiv(n_syn, t.block_m), triton.cdiv(width, t.block_n))](
            f_syn, y_syn, f_real, y_real, r_syn, r_real, g, lse_all, lse_pos, ws, q_syn, q_real,
            n_syn, n_real, dim, c0, t.chunk, inv_temp, log_c, NCE=nce, NORMALIZE=normalize, LOAD_LOGITS=False,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, ACC_DTYPE=acc_tl, PRECISION=precision)
        rows = slice(c0, c0 + width)
        corr_syn = -(k_syn * q_syn) if normalize else None
        corr_real = -(k_real[rows] * q_real[rows]) if normalize else None
        gemm(ws, (t.chunk, 1), f_real[rows], grad_syn, n_rows=n_syn, n_k=width, accumulate=c0 > 0,
             corr=corr_syn, c=f_syn, **gemm_tiles)
        gemm(ws, (1, t.chunk), f_syn, grad_real[rows], n_rows=width, n_k=n_syn, accumulate=False,
             corr=corr_real, c=f_real[rows], **gemm_tiles)
    return grad_syn.to(f_syn.dtype), grad_real


# --- gradient in the forward (scalar reductions) ---------------------------------------------------

# Workspace elements of the gradient-in-forward path (one panel of logits in the accumulation dtype):
# 16M on CUDA (64 MB fp32); in the interpreter small, so that tests cross panel boundaries.
FUSED_WORKSPACE_CUDA = 1 << 24
FUSED_WORKSPACE_INTERPRETER = 1024


def fused_panel_rows(n_syn: int, n_real: int, device: torch.device) -> int:
    """Synthetic rows per panel of the gradient-in-forward path (0: one row of n_real logits does not
    fit the workspace; the caller keeps the recomputing backward). A multiple of the row block when
    at least one block fits, so no panel but the last pads its row tiles."""
    budget = FUSED_WORKSPACE_CUDA if device.type == "cuda" else FUSED_WORKSPACE_INTERPRETER
    rows = budget // max(n_real, 1)
    if rows >= BLOCK_M:
        rows = rows // BLOCK_M * BLOCK_M
    return min(rows, n_syn)


def supcon_nce_fused(f_syn, y_syn, f_real, y_real, inv_temp: float, nce: bool, log_c: float, normalize: bool,
                     precision: str, need_syn: bool, need_real: bool):
    """Loss terms and their gradients in one pass (Liger-Kernel style): (per-anchor loss, lse_pos,
    grad f_syn, grad f_real), the gradients those of Σ_i l_i (upstream gradient 1 per anchor),
    normalisation included; a gradient not needed is an empty (0, D) tensor.

    Panels of P synthetic rows (P · n_real ≤ the workspace): ``_forward_kernel`` computes the panel's
    logits once, stores them in the workspace and yields the row statistics; ``_grad_logits_kernel``
    turns the stored logits into G' in place; two GEMMs form grad f_syn for the panel's rows (complete:
    the panel holds every real column) and add the panel's share of grad f_real. Executed FLOPs: the
    logits once and the two products, 6·n_syn·n_real·D, the reference's count."""
    n_syn, dim = f_syn.shape
    n_real = f_real.shape[0]
    device = f_syn.device
    rows = fused_panel_rows(n_syn, n_real, device)
    if rows < 1:
        raise ValueError(f"supcon_nce_fused: one row of {n_real} logits exceeds the workspace")
    r_syn, k_syn = row_scales(f_syn, normalize)
    r_real, k_real = row_scales(f_real, normalize)
    acc_tl, acc_torch = acc_dtypes(f_syn.dtype)
    t = Tiling(rows, n_real, dim, device, f_syn.dtype, precision)
    ws = torch.empty((rows, n_real), device=device, dtype=acc_torch)
    parts = torch.empty((2, t.splits * rows), device=device, dtype=acc_torch)
    ones = torch.ones(rows, device=device, dtype=acc_torch)  # upstream gradient 1 per anchor
    per_anchor = torch.empty(n_syn, device=device, dtype=acc_torch)
    lse_pos = torch.empty(n_syn, device=device, dtype=acc_torch)
    q_syn = torch.zeros(n_syn, device=device, dtype=acc_torch)
    q_real = torch.zeros(n_real, device=device, dtype=acc_torch)
    grad_syn = f_syn.new_empty((n_syn if need_syn else 0, dim))
    grad_real = torch.empty((n_real if need_real else 0, dim), device=device, dtype=acc_torch)
    gemm_tiles = dict(precision=precision, block_m=t.block_m, block_k=t.gemm_k, block_d=t.gemm_d)
    for p0 in range(0, n_syn, rows):
        p = min(rows, n_syn - p0)
        panel = slice(p0, p0 + p)
        f_panel, r_panel = f_syn[panel], r_syn[panel]
        part_a, part_b = (x[:t.splits * p].view(t.splits, p) for x in parts)
        _forward_kernel[(triton.cdiv(p, t.block_m), t.splits)](
            f_panel, y_syn[panel], f_real, y_real, r_panel, r_real, part_a, part_b, ws, n_real, p, n_real, dim,
            t.cols_per_split, inv_temp, log_c, NCE=nce, STORE_LOGITS=True, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
            BLOCK_D=t.block_d, ACC_DTYPE=acc_tl, PRECISION=precision)
        per_anchor[panel], lse_all, lse_pos[panel] = _merge_partials(part_a, part_b, nce)
        _grad_logits_kernel[(triton.cdiv(p, t.block_m), triton.cdiv(n_real, t.block_n))](
            f_panel, y_syn[panel], f_real, y_real, r_panel, r_real, ones, lse_all, lse_pos[panel], ws,
            q_syn[panel], q_real, p, n_real, dim, 0, n_real, inv_temp, log_c, NCE=nce, NORMALIZE=normalize,
            LOAD_LOGITS=True, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, ACC_DTYPE=acc_tl,
            PRECISION=precision)
        if need_syn:  # every real column is in the panel: its rows of grad f_syn are final
            corr = -(k_syn[panel] * q_syn[panel]) if normalize else None
            gemm(ws, (n_real, 1), f_real, grad_syn[panel], n_rows=p, n_k=n_real, accumulate=False, corr=corr,
                 c=f_panel, splits=k_splits(p, n_real, dim, t, device), **gemm_tiles)
        if need_real:  # q_real is complete after the last panel: its correction goes there
            last = p0 + p == n_syn
            corr = -(k_real * q_real) if normalize and last else None
            gemm(ws, (1, n_real), f_panel, grad_real, n_rows=n_real, n_k=p, accumulate=p0 > 0, corr=corr,
                 c=f_real, **gemm_tiles)
    return per_anchor, lse_pos, grad_syn, grad_real.to(f_real.dtype)


def fused_executed_flops(n_syn: int, n_real: int, dim: int, device: torch.device, dtype: torch.dtype,
                         precision: str = "ieee") -> float:
    """Multiply-adds ×2 that supcon_nce_fused issues with both gradients, tile padding included."""
    rows = fused_panel_rows(n_syn, n_real, device)
    t = Tiling(rows, n_real, dim, torch.device("cpu"), dtype, precision)  # block sizes: the same on every device
    pad = lambda v, b: triton.cdiv(v, b) * b  # noqa: E731
    total = 0.0
    for p0 in range(0, n_syn, rows):
        p = min(rows, n_syn - p0)
        logits = pad(p, t.block_m) * pad(n_real, t.block_n) * pad(dim, t.block_d)
        grad_syn = pad(p, t.block_m) * pad(n_real, t.gemm_k) * pad(dim, t.gemm_d)
        grad_real = pad(n_real, t.block_m) * pad(p, t.gemm_k) * pad(dim, t.gemm_d)
        total += 2.0 * (logits + grad_syn + grad_real)
    return total
