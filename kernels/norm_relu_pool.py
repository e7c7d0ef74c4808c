"""Triton kernels: instance norm (per sample and channel) → ReLU → optional 2×2 average pool, and
its input gradient; one program per (sample, channel) plane held in registers.

DM's real side runs DC's ConvNet block (conv → GroupNorm(C, C) → ReLU → AvgPool2d(2)) without
gradients. ATen makes four passes over the conv output for it (moments, normalise, ReLU, pool:
about 5 reads/writes of the full-size tensor); here it is read once and only the pooled plane is
written. Statistics in fp32 (fp64 for fp64) over the plane: mean, then the mean squared deviation
(biased, as GroupNorm), both from registers. ``eps`` is typed fp64 (Triton types a Python float
fp32): an fp32-rounded eps puts 1/σ 1e-9 off in float64 where eps dominates the variance.

The backward (the real side of DC's segmented step, first order only) recomputes the statistics
from the saved input and writes ``dx`` from it and the pooled output's gradient: one read of the
input, one of the (quarter-size) gradient, one write. ATen runs pool, ReLU and GroupNorm
backwards as separate full-size passes (``avg_pool2d_backward`` alone was 24.5 % of the segmented
DC step's device time on an H200).
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes

# the largest plane one program holds (padded to powers of two): 64×64, 16 fp32 values per thread
MAX_PLANE = 4096


@triton.jit
def _normalized_plane(x_ptr, w_ptr, b_ptr, plane, C, H, W, eps, HAS_AFFINE: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_W: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One plane in registers: x̂ (0 outside the plane), the affine output y, γ, 1/σ, the mask and
    the element offsets."""
    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < H) & (cols[None, :] < W)
    offs = plane * H * W + rows[:, None] * W + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / (H * W)
    xhat = tl.where(mask, x - mean, 0.0)
    # eps is fp64 (see the module doc): one scalar add in fp64, then back to the accumulation type
    rstd = 1.0 / tl.sqrt((tl.sum(tl.sum(xhat * xhat, axis=1), axis=0) / (H * W) + eps).to(ACC_DTYPE))
    xhat = xhat * rstd
    if HAS_AFFINE:
        c = plane % C
        gamma = tl.load(w_ptr + c).to(ACC_DTYPE)
        y = xhat * gamma + tl.load(b_ptr + c).to(ACC_DTYPE)
    else:
        gamma = tl.full((), 1.0, ACC_DTYPE)
        y = xhat
    return xhat, y, gamma, rstd, mask, offs


@triton.jit
def _norm_relu_pool_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, H, W, eps: tl.float64,
                           HAS_AFFINE: tl.constexpr, POOL: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_W: tl.constexpr, ACC_DTYPE: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    _, y, _, _, mask, offs = _normalized_plane(x_ptr, w_ptr, b_ptr, plane, C, H, W, eps, HAS_AFFINE, BLOCK_H,
                                               BLOCK_W, ACC_DTYPE)
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
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_relu_pool_bwd_kernel(x_ptr, w_ptr, b_ptr, g_ptr, dx_ptr, C, H, W, eps: tl.float64,
                               HAS_AFFINE: tl.constexpr, POOL: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_W: tl.constexpr, ACC_DTYPE: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    xhat, y, gamma, rstd, mask, offs = _normalized_plane(x_ptr, w_ptr, b_ptr, plane, C, H, W, eps, HAS_AFFINE,
                                                         BLOCK_H, BLOCK_W, ACC_DTYPE)
    if POOL:  # each input position gets its tile's output gradient ÷ 4
        oh, ow = H // 2, W // 2
        rows = tl.arange(0, BLOCK_H)
        cols = tl.arange(0, BLOCK_W)
        g = tl.load(g_ptr + plane * oh * ow + (rows // 2)[:, None] * ow + (cols // 2)[None, :], mask=mask,
                    other=0.0).to(ACC_DTYPE) * 0.25
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    gxhat = tl.where(mask & (y > 0.0), g, 0.0) * gamma  # ReLU passes where its output is positive
    m1 = tl.sum(tl.sum(gxhat, axis=1), axis=0) / (H * W)
    m2 = tl.sum(tl.sum(gxhat * xhat, axis=1), axis=0) / (H * W)
    dx = rstd * (gxhat - m1 - xhat * m2)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, x: torch.Tensor, weight, bias, eps: float, pool: bool, *buffers: torch.Tensor) -> None:
    """One program per (sample, channel) plane of ``x``; ``buffers``: the kernel's tensors after
    x, weight and bias (the output, or the gradient and dx)."""
    n, c, h, w = x.shape
    block_h, block_w = max(2, triton.next_power_of_2(h)), max(2, triton.next_power_of_2(w))
    affine = weight is not None
    kernel[(n * c,)](x, weight if affine else x, bias if affine else x, *buffers, c, h, w, float(eps),
                     HAS_AFFINE=affine, POOL=pool, BLOCK_H=block_h, BLOCK_W=block_w,
                     ACC_DTYPE=acc_dtypes(x.dtype)[0], num_warps=8 if block_h * block_w >= 2048 else 4)


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
    if out.numel():
        _launch(_norm_relu_pool_kernel, x, weight, bias, eps, pool, out)
    return out


def norm_relu_pool_backward(x: torch.Tensor, weight, bias, eps: float, pool: bool, grad: torch.Tensor) -> torch.Tensor:
    """dx of ``norm_relu_pool`` for contiguous ``x`` (``fits``) and the output gradient ``grad``."""
    dx = torch.empty_like(x)
    if dx.numel():
        _launch(_norm_relu_pool_bwd_kernel, x, weight, bias, eps, pool, grad.contiguous(), dx)
    return dx
