"""Triton kernel: instance norm (per sample and channel) → ReLU → optional 2×2 average pool, forward
only, one program per (sample, channel) plane held in registers.

DM's real side runs DC's ConvNet block (conv → GroupNorm(C, C) → ReLU → AvgPool2d(2)) without
gradients. ATen makes four passes over the conv output for it (moments, normalise, ReLU, pool:
about 5 reads/writes of the full-size tensor); here it is read once and only the pooled plane is
written. Statistics in fp32 (fp64 for fp64) over the plane: mean, then the mean squared deviation
(biased, as GroupNorm), both from registers.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes

# the largest plane one program holds (padded to powers of two): 64×64, 16 fp32 values per thread
MAX_PLANE = 4096


@triton.jit
def _norm_relu_pool_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, H, W, eps,
                           HAS_AFFINE: tl.constexpr, POOL: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_W: tl.constexpr, ACC_DTYPE: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < H) & (cols[None, :] < W)
    x = tl.load(x_ptr + plane * H * W + rows[:, None] * W + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / (H * W)
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / (H * W) + eps)
    if HAS_AFFINE:
        c = plane % C
        y = d * (tl.load(w_ptr + c).to(ACC_DTYPE) * rstd) + tl.load(b_ptr + c).to(ACC_DTYPE)
    else:
        y = d * rstd
    y = tl.maximum(y, 0.0)
    if POOL:  # H, W even: every 2×2 tile inside the plane holds only unmasked values
        tiles = tl.reshape(y, (BLOCK_H // 2, 2, BLOCK_W // 2, 2))
        pooled = tl.sum(tl.sum(tiles, axis=3), axis=1) * 0.25
        oh, ow = H // 2, W // 2
        prow = tl.arange(0, BLOCK_H // 2)
        pcol = tl.arange(0, BLOCK_W // 2)
        pmask = (prow[:, None] < oh) & (pcol[None, :] < ow)
        tl.store(out_ptr + plane * oh * ow + prow[:, None] * ow + pcol[None, :],
                 pooled.to(out_ptr.dtype.element_ty), mask=pmask)
    else:
        tl.store(out_ptr + plane * H * W + rows[:, None] * W + cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask)


def fits(x: torch.Tensor, pool: bool) -> bool:
    """Whether one program can hold a plane of ``x`` (N, C, H, W) and, with ``pool``, H and W are even."""
    if x.dim() != 4 or x.shape[2] * x.shape[3] == 0:
        return False
    h, w = x.shape[2], x.shape[3]
    if pool and (h % 2 or w % 2):
        return False
    return triton.next_power_of_2(h) * triton.next_power_of_2(w) <= MAX_PLANE


def norm_relu_pool(x: torch.Tensor, weight, bias, eps: float, pool: bool) -> torch.Tensor:
    """x (N, C, H, W) contiguous with ``fits(x, pool)``; weight/bias (C,) or None."""
    n, c, h, w = x.shape
    out = x.new_empty((n, c, h // 2, w // 2) if pool else (n, c, h, w))
    if out.numel() == 0:
        return out
    acc_tl, _ = acc_dtypes(x.dtype)
    block_h, block_w = max(2, triton.next_power_of_2(h)), max(2, triton.next_power_of_2(w))
    affine = weight is not None
    _norm_relu_pool_kernel[(n * c,)](
        x, weight if affine else x, bias if affine else x, out, c, h, w, float(eps),
        HAS_AFFINE=affine, POOL=pool, BLOCK_H=block_h, BLOCK_W=block_w, ACC_DTYPE=acc_tl,
        num_warps=8 if block_h * block_w >= 2048 else 4)
    return out
