"""Triton kernels for bn_stat_loss (SRe2L's BatchNorm statistic matching): one launch each way.

Forward (``_bn_forward_kernel``, grid (C, splits)): x viewed as (N, C, S); program (c, split) reads
its slice of channel c once, tile by tile, and keeps (count, mean, M2) of x − rm_c merged with
Chan's parallel update (each tile's mean and M2 are exact in registers), so the variance never
suffers from E[x²] − E[x]² cancellation; fp32 accumulation (fp64 for fp64). The shift by the
running mean rm_c matters where x ≈ rm_c far from 0 (x ≈ 1e3): the loss measures exactly μ − rm,
which an fp32 mean of x, rounded at 1e3, would only give to ~3e-5. It stores its partial and bumps
channel c's arrival counter; the last split of c to arrive merges c's partials (Chan's formula in
fp64), writes μ_c, σ²_c (rounded to the accumulation dtype) and the squared deviations
(μ_c − rm_c)², (σ²_c − rv_c)² (fp64, from the merged fp64 statistics), then bumps a global counter;
the last channel to finish sums the squared deviations in channel order (fixed order:
deterministic) and writes loss = sqrt(Σ(μ − rm)²) + sqrt(Σ(σ² − rv)²). Counters come from
``arrival_counters`` and are left at zero (each folding program resets its own).
Backward (``_bn_backward_kernel``, a capped grid over tiles of rows (n, c) × spatial columns):
every program first takes the two norms in fp64 (C values, the same order in every program), then
writes ``grad_x = a_c + b_c (x − μ_c)`` with a_c = g (μ_c − rm_c)/(‖μ − rm‖ M),
b_c = 2 g (σ²_c − rv_c)/(‖σ² − rv‖ M) (fp64, rounded to the accumulation dtype; a zero norm gives
0), computed once per row of the tile. No host sync, no workspace kernel.

Fused with an eval-mode BatchNorm (``bn_eval_stat``, WRITE_Y / HAS_GY): the forward also writes
y = (x − rm_c)·α_c + β_c, α_c = w_c / sqrt(rv_c + eps), from the same loads of x; the backward also
reads the incoming grad_y and adds grad_y·α_c. So the BatchNorm and its statistic loss cost one
read of x and a write of y forward and one read of x and grad_y and a write of grad_x backward,
where the layer and the loss apart cost two reads of x forward and, backward, the BatchNorm's
pass, the loss's pass and autograd's sum of the two gradients.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import acc_dtypes, acc_scalar, arrival_counters, last_to_arrive, sm_count

BLOCK = 1024
MAX_SPLIT = 64
_BLOCK_C = 128
_CPU_PROGRAMS = 3  # the interpreter: a few programs, so the grid-stride loop runs several tiles each
_PROGRAMS_PER_SM = 4


@triton.jit
def _merge_channel(part_ptr, sq_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr, c, C, num_splits,
                   BLOCK_SPLIT: tl.constexpr):
    """Chan's merge of channel c's split partials (statistics of x − shift_c, shift_c = rm_c in the
    acc dtype) in fp64 → μ_c, σ²_c (stored in the acc dtype) and the squared deviations from the
    running statistics (fp64, from the merged fp64 values: μ_c − rm_c is the shifted mean plus
    shift_c − rm_c, with no cancellation). Reads through L2 (.cg): the partials were written by
    other programs."""
    sp = tl.arange(0, BLOCK_SPLIT)
    smask = sp < num_splits
    offs = c * num_splits + sp
    plane = C * num_splits
    cnt = tl.load(part_ptr + offs, mask=smask, other=0.0, cache_modifier=".cg").to(tl.float64)
    mu_p = tl.load(part_ptr + plane + offs, mask=smask, other=0.0, cache_modifier=".cg").to(tl.float64)
    m2_p = tl.load(part_ptr + 2 * plane + offs, mask=smask, other=0.0, cache_modifier=".cg").to(tl.float64)
    total = tl.sum(cnt, axis=0)
    mu = tl.sum(cnt * mu_p, axis=0) / total  # mean of x − shift_c
    dev = tl.where(smask, mu_p - mu, 0.0)
    var = (tl.sum(m2_p, axis=0) + tl.sum(cnt * dev * dev, axis=0)) / total
    rm = tl.load(rm_ptr + c)
    rm64 = rm.to(tl.float64)
    shift = rm.to(part_ptr.dtype.element_ty).to(tl.float64)  # the forward's shift, exactly
    tl.store(mean_ptr + c, (shift + mu).to(mean_ptr.dtype.element_ty))
    tl.store(var_ptr + c, var.to(var_ptr.dtype.element_ty))
    dm = mu + (shift - rm64)
    dv = var - tl.load(rv_ptr + c).to(tl.float64)
    tl.store(sq_ptr + c, dm * dm)
    tl.store(sq_ptr + C + c, dv * dv)


@triton.jit
def _loss_from_squares(sq_ptr, loss_ptr, C, BLOCK_C: tl.constexpr):
    """sqrt(Σ_c (μ_c − rm_c)²) + sqrt(Σ_c (σ²_c − rv_c)²), fp64 sums in a fixed channel order."""
    sq_mean = tl.zeros((BLOCK_C,), dtype=tl.float64)
    sq_var = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        cmask = ch < C
        sq_mean += tl.load(sq_ptr + ch, mask=cmask, other=0.0, cache_modifier=".cg")
        sq_var += tl.load(sq_ptr + C + ch, mask=cmask, other=0.0, cache_modifier=".cg")
    loss = tl.sqrt(tl.sum(sq_mean, axis=0)) + tl.sqrt(tl.sum(sq_var, axis=0))
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _bn_scale(w_ptr, rv_ptr, ch, cmask, eps, HAS_W: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Eval-mode BatchNorm's α_c = w_c / sqrt(rv_c + eps) (fp64, rounded to the acc dtype)."""
    alpha = 1.0 / tl.sqrt(tl.load(rv_ptr + ch, mask=cmask, other=1.0).to(tl.float64) + eps)
    if HAS_W:
        alpha = alpha * tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float64)
    return alpha.to(ACC_DTYPE)


@triton.jit
def _bn_forward_kernel(x_ptr, part_ptr, sq_ptr, counter_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr, loss_ptr,
                       y_ptr, w_ptr, b_ptr, C, S, M, chunk, num_splits, eps: tl.float64,
                       BLOCK: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, WRITE_Y: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    c = tl.program_id(0)
    sp = tl.program_id(1)
    lo = sp.to(tl.int64) * chunk
    hi = tl.minimum(lo + chunk, M)
    n_acc = tl.zeros((), dtype=ACC_DTYPE)
    mean_acc = tl.zeros((), dtype=ACC_DTYPE)
    m2_acc = tl.zeros((), dtype=ACC_DTYPE)
    shift = tl.load(rm_ptr + c).to(ACC_DTYPE)  # statistics of x − rm_c (module doc)
    if WRITE_Y:  # y = (x − rm_c)·α_c + β_c, the BatchNorm in eval mode
        alpha = _bn_scale(w_ptr, rv_ptr, c, True, acc_scalar(eps, tl.float64), HAS_W, ACC_DTYPE)
        beta = tl.load(b_ptr + c).to(ACC_DTYPE) if HAS_B else tl.zeros((), dtype=ACC_DTYPE)
    for start in range(lo, hi, BLOCK):
        m = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = m < hi
        n_idx = m // S
        s_idx = m - n_idx * S
        offs = (n_idx * C + c) * S + s_idx
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) - shift, 0.0)
        if WRITE_Y:
            tl.store(y_ptr + offs, (d * alpha + beta).to(y_ptr.dtype.element_ty), mask=mask)
        n_t = tl.sum(mask.to(ACC_DTYPE), axis=0)
        mean_t = tl.sum(d, axis=0) / n_t
        dev = tl.where(mask, d - mean_t, 0.0)
        m2_t = tl.sum(dev * dev, axis=0)
        n_new = n_acc + n_t
        delta = mean_t - mean_acc
        mean_acc = mean_acc + delta * (n_t / n_new)
        m2_acc = m2_acc + m2_t + delta * delta * (n_acc * n_t / n_new)
        n_acc = n_new
    # partial (count, mean, M2) of (c, sp): planes of (C, num_splits) in part_ptr
    out = c * num_splits + sp
    plane = C * num_splits
    tl.store(part_ptr + out, n_acc)
    tl.store(part_ptr + plane + out, mean_acc)
    tl.store(part_ptr + 2 * plane + out, m2_acc)
    if last_to_arrive(counter_ptr + c, num_splits):  # the last split of channel c: every partial of c is visible
        _merge_channel(part_ptr, sq_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr, c, C, num_splits, BLOCK_SPLIT)
        if last_to_arrive(counter_ptr + C, C):  # the last channel: every squared deviation is visible
            _loss_from_squares(sq_ptr, loss_ptr, C, BLOCK_C)


@triton.jit
def _deviations(mean_ptr, var_ptr, rm_ptr, rv_ptr, ch, cmask):
    """(μ_c − running_mean_c, σ²_c − running_var_c) in fp64 for the channels ``ch``."""
    dm = tl.load(mean_ptr + ch, mask=cmask, other=0.0).to(tl.float64) - \
        tl.load(rm_ptr + ch, mask=cmask, other=0.0).to(tl.float64)
    dv = tl.load(var_ptr + ch, mask=cmask, other=0.0).to(tl.float64) - \
        tl.load(rv_ptr + ch, mask=cmask, other=0.0).to(tl.float64)
    return dm, dv


@triton.jit
def _norm_scales(grad_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, C, M, BLOCK_C: tl.constexpr):
    """g / (‖μ − rm‖ M) and 2 g / (‖σ² − rv‖ M) in fp64 (fixed channel order); 0 for a zero norm
    (as torch.norm's backward)."""
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
    m = M.to(tl.float64)
    scale_mean = tl.where(norm_mean > 0, g / (tl.where(norm_mean > 0, norm_mean, 1.0) * m), 0.0)
    scale_var = tl.where(norm_var > 0, 2.0 * g / (tl.where(norm_var > 0, norm_var, 1.0) * m), 0.0)
    return scale_mean, scale_var


@triton.jit(do_not_specialize=["M"])  # M == 1 would become a constexpr
def _bn_backward_kernel(grad_ptr, x_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, out_ptr, gy_ptr, w_ptr, C, S, M, rows,
                        num_col_tiles, num_tiles, eps: tl.float64,
                        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                        ACC_DTYPE: tl.constexpr, HAS_GY: tl.constexpr, HAS_W: tl.constexpr):
    """Tile t = rows [rt·BLOCK_R, +BLOCK_R) of (N·C, S) × columns [ct·BLOCK_S, +BLOCK_S); program p
    runs tiles p, p + programs, ... (grid-stride). HAS_GY: add the eval-mode BatchNorm's grad_y·α_c."""
    scale_mean, scale_var = _norm_scales(grad_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, C, M, BLOCK_C)
    eps64 = acc_scalar(eps, tl.float64)
    for t in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        rt = t // num_col_tiles
        ct = t - rt * num_col_tiles
        r = rt.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        s = ct * BLOCK_S + tl.arange(0, BLOCK_S)
        rmask = r < rows
        ch = r % C
        dm, dv = _deviations(mean_ptr, var_ptr, rm_ptr, rv_ptr, ch, rmask)
        a = (scale_mean * dm).to(ACC_DTYPE)  # a_c, b_c rounded to the acc dtype, then applied in it
        b = (scale_var * dv).to(ACC_DTYPE)
        mu = tl.load(mean_ptr + ch, mask=rmask, other=0.0).to(ACC_DTYPE)
        offs = r[:, None] * S + s[None, :]
        mask = rmask[:, None] & (s < S)[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        grad = a[:, None] + b[:, None] * (x - mu[:, None])
        if HAS_GY:
            alpha = _bn_scale(w_ptr, rv_ptr, ch, rmask, eps64, HAS_W, ACC_DTYPE)
            grad += tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) * alpha[:, None]
        tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)


def bn_stat_forward(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    counters: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 0.0):
    """x (N, C, S) contiguous → (loss, mean (C,), var (C,)) in the accumulation dtype; one launch.
    ``counters``: C + 1 int32 zeros (default: ``arrival_counters``), left at zero. With ``y`` (like
    x, contiguous) the launch also writes the eval-mode BatchNorm of x with ``weight``, ``bias``
    (C,) contiguous or None, and ``eps`` into it."""
    n, c, s = x.shape
    m = n * s
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    splits = max(1, min(MAX_SPLIT, triton.cdiv(m, 4 * BLOCK)))
    chunk = triton.cdiv(triton.cdiv(m, splits), BLOCK) * BLOCK
    splits = triton.cdiv(m, chunk)
    partials = torch.empty((3, c, splits), device=x.device, dtype=acc_torch)  # count, mean, M2
    squares = torch.empty((2, c), device=x.device, dtype=torch.float64)
    if counters is None:
        counters = arrival_counters(c + 1, x.device)
    mu = torch.empty(c, device=x.device, dtype=acc_torch)
    var = torch.empty_like(mu)
    loss = torch.empty((), device=x.device, dtype=acc_torch)
    if c == 0:  # no program would write the loss: both norms are empty
        return loss.zero_(), mu, var
    _bn_forward_kernel[(c, splits)](x, partials, squares, counters, running_mean, running_var, mu, var, loss,
                                    x if y is None else y, x if weight is None else weight,
                                    x if bias is None else bias, c, s, m, chunk, splits, float(eps), BLOCK=BLOCK,
                                    BLOCK_SPLIT=triton.next_power_of_2(splits), BLOCK_C=_BLOCK_C,
                                    ACC_DTYPE=acc_tl, WRITE_Y=y is not None, HAS_W=weight is not None,
                                    HAS_B=bias is not None)
    return loss, mu, var


def _max_programs(device: torch.device) -> int:
    """Grid cap of the backward: a few programs per SM; a few on CPU."""
    return _PROGRAMS_PER_SM * sm_count(device, cpu=0) if device.type == "cuda" else _CPU_PROGRAMS


def backward_tiles(n: int, c: int, s: int):
    """(BLOCK_R, BLOCK_S, row tiles, column tiles): BLOCK_R·BLOCK_S = BLOCK elements per tile, the
    columns a power of two ≥ S up to BLOCK (so a tile covers whole rows when S is small)."""
    block_s = min(triton.next_power_of_2(s), BLOCK)
    block_r = BLOCK // block_s
    return block_r, block_s, triton.cdiv(n * c, block_r), triton.cdiv(s, block_s)


def bn_stat_backward(grad, x, running_mean, running_var, mean, var, grad_y: Optional[torch.Tensor] = None,
                     weight: Optional[torch.Tensor] = None, eps: float = 0.0):
    """grad_x of the loss (``grad`` a 0-d tensor); with ``grad_y`` (like x, contiguous) plus the
    eval-mode BatchNorm's grad_y·w_c/sqrt(rv_c + eps), in the same pass."""
    n, c, s = x.shape
    acc_tl, _ = acc_dtypes(x.dtype)
    block_r, block_s, row_tiles, col_tiles = backward_tiles(n, c, s)
    num_tiles = row_tiles * col_tiles
    out = torch.empty_like(x)
    programs = max(1, min(num_tiles, _max_programs(x.device)))
    _bn_backward_kernel[(programs,)](grad, x, mean.contiguous(), var.contiguous(), running_mean, running_var, out,
                                     x if grad_y is None else grad_y, x if weight is None else weight,
                                     c, s, n * s, n * c, col_tiles, num_tiles, float(eps),
                                     BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_C=_BLOCK_C, ACC_DTYPE=acc_tl,
                                     HAS_GY=grad_y is not None, HAS_W=weight is not None)
    return out
