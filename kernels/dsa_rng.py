"""Triton kernel for dsa_augment's rng="device" draws: the whole parameter table in one launch.

Same stream and formulas as ``ddfast.ops.dsa.draw_device`` (its torch-op version, the oracle):
per image and stage one Philox4x32-10 block, key = the group's key words, counter =
(stage, image, group, domain) with image 0 for a Siamese group and 1 + the position in x for a
seed −1 group; uniforms u = word · 2⁻³² in float64; the op's parameters with the reference's
formulas in the same operation order. Program: BLOCK images, all stages.
"""
import torch
import triton
import triton.language as tl
from triton.language.random import philox_impl

BLOCK = 128
# globals read inside @triton.jit must be constexpr
DOMAIN_SEEDED = tl.constexpr(0x44534131)
# family index (ddfast.ops.dsa.FAMILIES order) and op codes (ddfast.ops.dsa.OP_*)
COLOR, CROP, CUTOUT, FLIP, SCALE, ROTATE = (tl.constexpr(i) for i in range(6))
OP_IDENTITY, OP_COLOR, OP_CROP, OP_CUTOUT, OP_FLIP, OP_AFFINE = (tl.constexpr(i) for i in range(6))


@triton.jit
def _randint(u, low, high):
    span = high - low
    return low + tl.minimum(tl.floor(u * span.to(tl.float64)).to(tl.int64), span - 1)


@triton.jit
def _cutout(u, size, extent):
    offset = _randint(u, 0, extent + (1 - size % 2))
    lo = offset - size // 2
    first = tl.minimum(tl.maximum(lo, 0), extent - 1)
    last = tl.minimum(tl.maximum(lo + size - 1, 0), extent - 1)
    empty = size == 0
    return tl.where(empty, 0, first), tl.where(empty, -1, last)


@triton.jit(do_not_specialize=["n", "H", "W", "shift_h", "shift_w", "size_h", "size_w"])
def _dsa_draw_kernel(groups_ptr, keys_ptr, families_ptr, cfg_ptr, ip_ptr, fp_ptr, n, H, W, shift_h, shift_w,
                     size_h, size_w, N_STAGES: tl.constexpr, N_FAMILIES: tl.constexpr, PICK: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(groups_ptr + offs, mask=mask, other=0)
    k0 = tl.load(keys_ptr + g * 3, mask=mask, other=0)
    k1 = tl.load(keys_ptr + g * 3 + 1, mask=mask, other=0)
    dom = tl.load(keys_ptr + g * 3 + 2, mask=mask, other=0)
    image = tl.where(dom == DOMAIN_SEEDED, 0, offs.to(tl.int64) + 1)
    brightness = tl.load(cfg_ptr + 0)
    saturation = tl.load(cfg_ptr + 1)
    contrast = tl.load(cfg_ptr + 2)
    prob_flip = tl.load(cfg_ptr + 3)
    scale_a = tl.load(cfg_ptr + 4)
    scale_b = tl.load(cfg_ptr + 5)
    ratio_rotate = tl.load(cfg_ptr + 6)
    pi = tl.load(cfg_ptr + 7)
    for k in tl.static_range(N_STAGES):
        stage = tl.full((BLOCK,), k, tl.int64)
        w0, w1, w2, w3 = philox_impl(stage.to(tl.uint32), image.to(tl.uint32), g.to(tl.uint32), dom.to(tl.uint32),
                                     k0.to(tl.uint32), k1.to(tl.uint32))
        u0 = w0.to(tl.float64) * 2.3283064365386963e-10
        u1 = w1.to(tl.float64) * 2.3283064365386963e-10
        u2 = w2.to(tl.float64) * 2.3283064365386963e-10
        u3 = w3.to(tl.float64) * 2.3283064365386963e-10
        if PICK:  # mode 'S': the family of each image from u3
            which = tl.minimum(tl.floor(u3 * N_FAMILIES).to(tl.int32), N_FAMILIES - 1)
            fam = tl.load(families_ptr + which, mask=mask, other=0)
        else:
            fam = tl.load(families_ptr + k + tl.zeros((BLOCK,), tl.int32))
        crop_a = _randint(u0, -shift_h, shift_h + 1)
        crop_b = _randint(u1, -shift_w, shift_w + 1)
        cut_r0, cut_r1 = _cutout(u0, size_h, H)
        cut_c0, cut_c1 = _cutout(u1, size_w, W)
        angle = (u0 - 0.5) * 2 * ratio_rotate / 180 * pi
        cos_a = tl.cos(angle)
        sin_a = tl.sin(angle)
        op = tl.where(fam == COLOR, OP_COLOR, tl.where(fam == CROP, OP_CROP, tl.where(fam == CUTOUT, OP_CUTOUT,
                      tl.where(fam == FLIP, tl.where(u0 < prob_flip, OP_FLIP, OP_IDENTITY), OP_AFFINE))))
        a = tl.where(fam == CROP, crop_a, tl.where(fam == CUTOUT, cut_r0, 0))
        b = tl.where(fam == CROP, crop_b, tl.where(fam == CUTOUT, cut_r1, 0))
        c = tl.where(fam == CUTOUT, cut_c0, 0)
        d = tl.where(fam == CUTOUT, cut_c1, 0)
        f0 = tl.where(fam == COLOR, (u0 - 0.5) * brightness,
                      tl.where(fam == SCALE, u0 * scale_a + scale_b, tl.where(fam == ROTATE, cos_a, 0.0)))
        f1 = tl.where(fam == COLOR, u1 * saturation, tl.where(fam == ROTATE, -sin_a, 0.0))
        f2 = tl.where(fam == COLOR, u2 + contrast, 0.0)
        f3 = tl.where(fam == ROTATE, sin_a, 0.0)
        f4 = tl.where(fam == SCALE, u1 * scale_a + scale_b, tl.where(fam == ROTATE, cos_a, 0.0))
        row_i = ip_ptr + (k * n + offs.to(tl.int64)) * 5
        tl.store(row_i + 0, op.to(tl.int32), mask=mask)
        tl.store(row_i + 1, a.to(tl.int32), mask=mask)
        tl.store(row_i + 2, b.to(tl.int32), mask=mask)
        tl.store(row_i + 3, c.to(tl.int32), mask=mask)
        tl.store(row_i + 4, d.to(tl.int32), mask=mask)
        row_f = fp_ptr + (k * n + offs.to(tl.int64)) * 6
        tl.store(row_f + 0, f0.to(fp_ptr.dtype.element_ty), mask=mask)
        tl.store(row_f + 1, f1.to(fp_ptr.dtype.element_ty), mask=mask)
        tl.store(row_f + 2, f2.to(fp_ptr.dtype.element_ty), mask=mask)
        tl.store(row_f + 3, f3.to(fp_ptr.dtype.element_ty), mask=mask)
        tl.store(row_f + 4, f4.to(fp_ptr.dtype.element_ty), mask=mask)
        tl.store(row_f + 5, tl.zeros((BLOCK,), fp_ptr.dtype.element_ty), mask=mask)


def dsa_draw(groups: torch.Tensor, keys: torch.Tensor, families: torch.Tensor, cfg: torch.Tensor, n_stages: int,
             pick: bool, height: int, width: int, shifts, sizes, acc_dtype: torch.dtype):
    """(iparams (S, N, 5) int32, fparams (S, N, 6) acc_dtype) of every stage; groups (N,) int64, keys
    (G, 3) int64, families (stage families, or the strategy's for mode 'S') int32, cfg float64 (8,)."""
    n = groups.shape[0]
    ip = torch.empty((n_stages, n, 5), dtype=torch.int32, device=groups.device)
    fp = torch.empty((n_stages, n, 6), dtype=acc_dtype, device=groups.device)
    if n:
        _dsa_draw_kernel[(triton.cdiv(n, BLOCK),)](groups, keys, families, cfg, ip, fp, n, height, width,
                                                  shifts[0], shifts[1], sizes[0], sizes[1], N_STAGES=n_stages,
                                                  N_FAMILIES=families.shape[0], PICK=bool(pick), BLOCK=BLOCK)
    return ip, fp
