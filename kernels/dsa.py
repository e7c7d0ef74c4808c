"""Triton kernels for dsa_augment: one launch applies one stage (one op per image) to all images.

Per image n: ``iparams[n] = [op, a, b, c, d]`` (int32), ``fparams[n]`` = 6 floats (see
ddfast/ops/dsa.py for the op codes and their parameters). Programs: (image, pixel block); each
program loops over the channels.

Forward: a per-image pre-pass gives contrast's mean M = mean(v) of the saturation output (color
images only), then the main kernel writes every output pixel (gather). Backward: a per-image
pre-pass gives Σ grad_y (color images); integer ops (crop, flip, cutout, identity) and color are
gathers (one store per input pixel); the bilinear affine op scatters its four weights with
atomic adds into a zeroed buffer in the accumulation dtype.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes

BLOCK = 256
_REDUCE_BLOCK = 1024

# op codes (ddfast/ops/dsa.py writes them): tl.constexpr, because @triton.jit code may only read
# globals that are constexpr (plain ints raise NameError on compile; the interpreter hides that)
OP_COLOR = tl.constexpr(1)
OP_CROP = tl.constexpr(2)
OP_CUTOUT = tl.constexpr(3)
OP_FLIP = tl.constexpr(4)
OP_AFFINE = tl.constexpr(5)


@triton.jit
def _source_coords(offs, mask, W, H, fp_ptr, base_ptr, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """Sampling position (ix along W, iy along H) of output pixels, in the operation order of
    CPU ``affine_grid`` (base grid @ theta^T) and ``grid_sample``'s unnormalisation, so fp32
    results match the reference bitwise on CPU (the reference always builds its grid on CPU)."""
    i = offs // W
    j = offs % W
    t0 = tl.load(fp_ptr + 0).to(ACC)
    t1 = tl.load(fp_ptr + 1).to(ACC)
    t2 = tl.load(fp_ptr + 2).to(ACC)
    t3 = tl.load(fp_ptr + 3).to(ACC)
    t4 = tl.load(fp_ptr + 4).to(ACC)
    t5 = tl.load(fp_ptr + 5).to(ACC)
    xs = tl.load(base_ptr + j, mask=mask, other=0.0)
    ys = tl.load(base_ptr + W + i, mask=mask, other=0.0)
    gx = tl.fma(ys, t1, xs * t0) + t2
    gy = tl.fma(ys, t4, xs * t3) + t5
    wf = W.to(ACC)
    hf = H.to(ACC)
    if ALIGN:
        ix = (gx + 1) * ((wf - 1) / 2)
        iy = (gy + 1) * ((hf - 1) / 2)
    else:
        ix = tl.fma(gx + 1, wf / 2, -0.5)
        iy = tl.fma(gy + 1, hf / 2, -0.5)
    return ix, iy


@triton.jit
def _bilinear_corners(ix, iy, W, H, mask):
    """Corner indices, weights (grid_sample's: e = 1 − w, s = 1 − n) and in-bounds masks."""
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    w = ix - x0f
    e = 1 - w
    n = iy - y0f
    s = 1 - n
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    in_x0 = (x0 >= 0) & (x0 < W)
    in_x1 = (x1 >= 0) & (x1 < W)
    in_y0 = (y0 >= 0) & (y0 < H)
    in_y1 = (y1 >= 0) & (y1 < H)
    return (y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1,
            s * e, s * w, n * e, n * w,
            mask & in_y0 & in_x0, mask & in_y0 & in_x1, mask & in_y1 & in_x0, mask & in_y1 & in_x1)


# sizes of 1 (C, H or W) must stay runtime ints: Triton would otherwise make them constexpr
_SIZES = ["C", "H", "W", "HW"]


@triton.jit(do_not_specialize=_SIZES)
def _color_mean_kernel(x_ptr, ip_ptr, fp_ptr, mean_ptr, C, HW,
                       BLOCK: tl.constexpr, ACC: tl.constexpr):
    """mean over (C, H, W) of the saturation output v, for color images (0 elsewhere)."""
    n = tl.program_id(0)
    op = tl.load(ip_ptr + n * 5)
    total = tl.zeros((BLOCK,), dtype=ACC)
    if op == OP_COLOR:
        b = tl.load(fp_ptr + n * 6 + 0).to(ACC)
        s = tl.load(fp_ptr + n * 6 + 1).to(ACC)
        base = n.to(tl.int64) * C * HW
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < HW
            csum = tl.zeros((BLOCK,), dtype=ACC)
            for c in range(C):
                csum += tl.load(x_ptr + base + c * HW + offs, mask=mask, other=0.0).to(ACC) + b
            cmean = csum / C
            for c in range(C):
                u = tl.load(x_ptr + base + c * HW + offs, mask=mask, other=0.0).to(ACC) + b
                total += tl.where(mask, (u - cmean) * s + cmean, 0.0)
    tl.store(mean_ptr + n, tl.sum(total, axis=0) / (C * HW))


@triton.jit(do_not_specialize=_SIZES)
def _dsa_fwd_kernel(x_ptr, y_ptr, ip_ptr, fp_ptr, base_ptr, mean_ptr, C, H, W,
                    ALIGN: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0)
    HW = H * W
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    base = n.to(tl.int64) * C * HW
    op = tl.load(ip_ptr + n * 5)
    if op == OP_AFFINE:
        ix, iy = _source_coords(offs, mask, W, H, fp_ptr + n * 6, base_ptr, ALIGN, ACC)
        o00, o01, o10, o11, w00, w01, w10, w11, m00, m01, m10, m11 = _bilinear_corners(ix, iy, W, H, mask)
        for c in range(C):
            plane = x_ptr + base + c * HW
            v = tl.load(plane + o00, mask=m00, other=0.0).to(ACC) * w00
            v = tl.fma(tl.load(plane + o01, mask=m01, other=0.0).to(ACC), w01, v)
            v = tl.fma(tl.load(plane + o10, mask=m10, other=0.0).to(ACC), w10, v)
            v = tl.fma(tl.load(plane + o11, mask=m11, other=0.0).to(ACC), w11, v)
            tl.store(y_ptr + base + c * HW + offs, v.to(y_ptr.dtype.element_ty), mask=mask)
    elif op == OP_COLOR:
        b = tl.load(fp_ptr + n * 6 + 0).to(ACC)
        s = tl.load(fp_ptr + n * 6 + 1).to(ACC)
        cf = tl.load(fp_ptr + n * 6 + 2).to(ACC)
        m = tl.load(mean_ptr + n)
        csum = tl.zeros((BLOCK,), dtype=ACC)
        for c in range(C):
            csum += tl.load(x_ptr + base + c * HW + offs, mask=mask, other=0.0).to(ACC) + b
        cmean = csum / C
        for c in range(C):
            u = tl.load(x_ptr + base + c * HW + offs, mask=mask, other=0.0).to(ACC) + b
            v = (u - cmean) * s + cmean
            tl.store(y_ptr + base + c * HW + offs, ((v - m) * cf + m).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        i = offs // W
        j = offs % W
        a = tl.load(ip_ptr + n * 5 + 1)
        bb = tl.load(ip_ptr + n * 5 + 2)
        cc = tl.load(ip_ptr + n * 5 + 3)
        dd = tl.load(ip_ptr + n * 5 + 4)
        src_i = tl.where(op == OP_CROP, i + a, i)
        src_j = tl.where(op == OP_CROP, j + bb, tl.where(op == OP_FLIP, W - 1 - j, j))
        valid = mask & (src_i >= 0) & (src_i < H) & (src_j >= 0) & (src_j < W)
        cut = (op == OP_CUTOUT) & (i >= a) & (i <= bb) & (j >= cc) & (j <= dd)
        keep = tl.where(cut, 0.0, 1.0).to(ACC)
        for c in range(C):
            v = tl.load(x_ptr + base + c * HW + src_i * W + src_j, mask=valid, other=0.0).to(ACC)
            tl.store(y_ptr + base + c * HW + offs, (v * keep).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SIZES)
def _grad_sum_kernel(g_ptr, ip_ptr, sum_ptr, C, HW, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Σ grad_y over (C, H, W) per color image (0 elsewhere)."""
    n = tl.program_id(0)
    op = tl.load(ip_ptr + n * 5)
    total = tl.zeros((BLOCK,), dtype=ACC)
    if op == OP_COLOR:
        base = n.to(tl.int64) * C * HW
        for start in range(0, C * HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            total += tl.load(g_ptr + base + offs, mask=offs < C * HW, other=0.0).to(ACC)
    tl.store(sum_ptr + n, tl.sum(total, axis=0))


@triton.jit(do_not_specialize=_SIZES)
def _dsa_bwd_kernel(g_ptr, gx_ptr, ip_ptr, fp_ptr, base_ptr, sum_ptr, C, H, W,
                    ALIGN: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """gx (accumulation dtype, zeroed) from grad_y; the program's pixels are output pixels for the
    affine scatter and input pixels for the gathers."""
    n = tl.program_id(0)
    HW = H * W
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    base = n.to(tl.int64) * C * HW
    op = tl.load(ip_ptr + n * 5)
    if op == OP_AFFINE:
        ix, iy = _source_coords(offs, mask, W, H, fp_ptr + n * 6, base_ptr, ALIGN, ACC)
        o00, o01, o10, o11, w00, w01, w10, w11, m00, m01, m10, m11 = _bilinear_corners(ix, iy, W, H, mask)
        for c in range(C):
            g = tl.load(g_ptr + base + c * HW + offs, mask=mask, other=0.0).to(ACC)
            plane = gx_ptr + base + c * HW
            tl.atomic_add(plane + o00, g * w00, mask=m00)
            tl.atomic_add(plane + o01, g * w01, mask=m01)
            tl.atomic_add(plane + o10, g * w10, mask=m10)
            tl.atomic_add(plane + o11, g * w11, mask=m11)
    elif op == OP_COLOR:
        s = tl.load(fp_ptr + n * 6 + 1).to(ACC)
        cf = tl.load(fp_ptr + n * 6 + 2).to(ACC)
        shift = (1 - cf) * tl.load(sum_ptr + n) / (C * HW)
        gsum = tl.zeros((BLOCK,), dtype=ACC)
        for c in range(C):
            gsum += tl.load(g_ptr + base + c * HW + offs, mask=mask, other=0.0).to(ACC) * cf + shift
        gmean = gsum / C
        for c in range(C):
            gv = tl.load(g_ptr + base + c * HW + offs, mask=mask, other=0.0).to(ACC) * cf + shift
            tl.store(gx_ptr + base + c * HW + offs, gv * s + (1 - s) * gmean, mask=mask)
    else:
        i = offs // W
        j = offs % W
        a = tl.load(ip_ptr + n * 5 + 1)
        bb = tl.load(ip_ptr + n * 5 + 2)
        cc = tl.load(ip_ptr + n * 5 + 3)
        dd = tl.load(ip_ptr + n * 5 + 4)
        # the output pixel that read input pixel (i, j)
        dst_i = tl.where(op == OP_CROP, i - a, i)
        dst_j = tl.where(op == OP_CROP, j - bb, tl.where(op == OP_FLIP, W - 1 - j, j))
        valid = mask & (dst_i >= 0) & (dst_i < H) & (dst_j >= 0) & (dst_j < W)
        cut = (op == OP_CUTOUT) & (dst_i >= a) & (dst_i <= bb) & (dst_j >= cc) & (dst_j <= dd)
        keep = tl.where(cut, 0.0, 1.0).to(ACC)
        for c in range(C):
            g = tl.load(g_ptr + base + c * HW + dst_i * W + dst_j, mask=valid, other=0.0).to(ACC)
            tl.store(gx_ptr + base + c * HW + offs, g * keep, mask=mask)


def dsa_forward(x: torch.Tensor, iparams: torch.Tensor, fparams: torch.Tensor, base_grid: torch.Tensor,
                align_corners: bool) -> torch.Tensor:
    """One stage on contiguous (N, C, H, W) images; iparams (N, 5) int32, fparams (N, 6) and
    base_grid (W + H: affine_grid's normalised x then y coordinates) in the accumulation dtype."""
    n, c, h, w = x.shape
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    means = torch.empty(n, device=x.device, dtype=acc_torch)
    _color_mean_kernel[(n,)](x, iparams, fparams, means, c, h * w, BLOCK=_REDUCE_BLOCK, ACC=acc_tl)
    y = torch.empty_like(x)
    _dsa_fwd_kernel[(n, triton.cdiv(h * w, BLOCK))](x, y, iparams, fparams, base_grid, means, c, h, w,
                                                    ALIGN=bool(align_corners), BLOCK=BLOCK, ACC=acc_tl)
    return y


def dsa_backward(grad_y: torch.Tensor, iparams: torch.Tensor, fparams: torch.Tensor, base_grid: torch.Tensor,
                 align_corners: bool) -> torch.Tensor:
    n, c, h, w = grad_y.shape
    acc_tl, acc_torch = acc_dtypes(grad_y.dtype)
    sums = torch.empty(n, device=grad_y.device, dtype=acc_torch)
    _grad_sum_kernel[(n,)](grad_y, iparams, sums, c, h * w, BLOCK=_REDUCE_BLOCK, ACC=acc_tl)
    gx = torch.zeros(grad_y.shape, device=grad_y.device, dtype=acc_torch)
    _dsa_bwd_kernel[(n, triton.cdiv(h * w, BLOCK))](grad_y, gx, iparams, fparams, base_grid, sums, c, h, w,
                                                    ALIGN=bool(align_corners), BLOCK=BLOCK, ACC=acc_tl)
    return gx.to(grad_y.dtype)
