"""dsa_augment — Differentiable Siamese Augmentation for many groups in one call (SPEC 3.5).

DatasetCondensation's ``DiffAugment(x, strategy, seed, param)`` draws random parameters with
a fixed sequence of torch generator calls and applies color / crop / cutout / flip / scale /
rotate. ``dsa_augment(x, groups, strategy, seeds)`` does that for many groups at once: the
images with group id ``g`` get the transform of ``seeds[g]``, so the output for group g equals
``DiffAugment(x[groups == g], strategy, seeds[g])``.

Structure:
  1. draw (CPU, the reference's call sequence per group): every op becomes one *stage*; each
     image gets one row of integer parameters ``iparams = [op, a, b, c, d]`` and one row of float
     parameters ``fparams`` (6 values; see the OP_* codes below). Mode 'S' is one stage (each
     group picked its own op family), mode 'M' one stage per op family of the strategy.
  2. apply: one kernel launch per stage over all images. Within a stage every image does one
     op, so the stages reproduce the reference's intermediate results exactly (no composition
     of bilinear samplings, whose zero fill and interpolation would not commute).

Per-op semantics (H = x.size(2), W = x.size(3), reference names in brackets):
  color (brightness, saturation, contrast): u = x + b; v = (u − mean_C u)·s + mean_C u;
      y = (v − M)·c + M with M = mean_{C,H,W} v.  Backward: S = Σ gy per image,
      gv = c·gy + (1 − c)·S/(CHW), gx = s·gv + (1 − s)·mean_C gv.
  crop: y[i, j] = x[i + a, j + b] inside the image, else 0 (the reference's pad-by-1 gather
      with clamped indices is exactly this shift with zero fill). Backward: the inverse shift.
  cutout: y = x · (1 − box) with the reference's clamped box rows [a, b], cols [c, d].
  flip: y[i, j] = x[i, W − 1 − j].
  scale, rotate: ``grid_sample(x, affine_grid(theta))`` bilinear, zero padding, either
      ``align_corners`` convention, sampled in the kernel without a grid tensor. Backward: a
      scatter of the bilinear weights (atomics on CUDA/Triton, hence not bitwise deterministic
      there; the C++ CPU kernel gives each thread whole images, so it needs no atomics).

Numerics: the draws are bitwise the reference's; crop, cutout, flip, scale and rotate are bitwise
equal to the reference on CPU in fp32 (the kernels follow CPU affine_grid/grid_sample's operation
order, fma included); color differs in the last bits (contrast's mean is summed in fp64 by the
C++ kernel, in fp32 blocks by Triton/CUDA, while torch uses its own fp32 cascade sum).
The output is checked for NaN/Inf (one pass; DDFAST_CHECK_FINITE=0 turns it off).

RNG: with ``rng="reference"`` a seeded group re-seeds a private CPU generator with
seed, seed+1, … exactly where the reference calls ``set_seed_DiffAug`` (the global generator is
left alone), and element 0 of each draw applies to the whole group (element 0 of a CPU draw does
not depend on the draw's size). A group with seed −1 draws per-image values from torch's global
CPU generator like the reference does on CPU. On CUDA the reference draws flip/color/crop/cutout
from the CUDA generator, so there only ``ddfast.compat.dc.DiffAugment`` (which draws on the
tensor's device) reproduces its numbers. ``rng="fast"`` draws every parameter of every group
from one CPU generator in a single call: same distributions, not the reference's stream.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _backend
from .._checks import acc_dtype, check_choice, check_float_tensor, check_labels, check_result_finite

OP = "dsa"

OP_IDENTITY, OP_COLOR, OP_CROP, OP_CUTOUT, OP_FLIP, OP_AFFINE = range(6)
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
N_IPARAMS, N_FPARAMS = 5, 6


class ParamDiffAug:
    """DatasetCondensation's augmentation settings (same attribute names and defaults)."""

    def __init__(self):
        self.aug_mode = "S"  # 'S': one op family per call, picked by the seed; 'M': all, in order
        self.prob_flip = 0.5
        self.ratio_scale = 1.2
        self.ratio_rotate = 15.0
        self.ratio_crop_pad = 0.125
        self.ratio_cutout = 0.5  # cutout box side as a fraction of the image side
        self.ratio_noise = 0.05  # unused by DiffAugment (no 'noise' op), kept for compatibility
        self.brightness = 1.0
        self.saturation = 2.0
        self.contrast = 0.5


def parse_strategy(strategy, param) -> List[str]:
    """Op families of ``strategy`` ('' / 'None' / 'none' → none), validated."""
    if not isinstance(strategy, str):
        raise TypeError("strategy must be a string like 'color_crop_cutout_flip_scale_rotate', "
                        f"got {type(strategy).__name__}")
    if strategy in ("", "None", "none"):
        return []
    names = strategy.split("_")
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"strategy has an unknown op {name!r}; ops are {FAMILIES}")
    if getattr(param, "aug_mode", None) not in ("S", "M"):
        raise ValueError(f"param.aug_mode must be 'S' or 'M', got {getattr(param, 'aug_mode', None)!r}")
    return names


# --- random parameters, drawn with the reference's generator calls ----------------------------

class SeedStream:
    """The reference's ``set_seed_DiffAug``: seed −1 never re-seeds; otherwise each call seeds the
    generator (``None`` = torch's global generators, like ``torch.random.manual_seed``) with the
    next seed."""

    def __init__(self, seed: int, generator: Optional[torch.Generator] = None):
        self.latest = seed
        self.generator = generator

    def reseed(self):
        if self.latest == -1:
            return
        if self.generator is None:
            torch.random.manual_seed(self.latest)
        else:
            self.generator.manual_seed(self.latest)
        self.latest += 1

    def rand(self, *size, dtype=None, device="cpu"):
        return torch.rand(*size, dtype=dtype, device=device, generator=self.generator)

    def randint(self, low, high, size, device="cpu"):
        return torch.randint(low, high, size=size, device=device, generator=self.generator)


def _pixels(extent: int, ratio: float) -> int:
    """DSA's pixel count of a ratio (crop shift, cutout size): ``int(extent * ratio + 0.5)``."""
    return int(extent * ratio + 0.5)


def _cutout_rows(offset: torch.Tensor, size: int, extent: int):
    """(first, last) row/col a cutout of ``size`` at ``offset`` covers. The reference clamps every box
    index into the image: the covered rows are the clamped ends of [offset − size//2,
    offset − size//2 + size − 1]; a zero size is an empty index grid, (0, −1): nothing is cut."""
    if size == 0:
        return 0, -1
    lo = offset - size // 2
    return lo.clamp(0, extent - 1), (lo + size - 1).clamp(0, extent - 1)


def draw_family(family: str, stream: SeedStream, n: int, height: int, width: int, param,
                dtype: torch.dtype, device) -> List[tuple]:
    """One op family's draws, in the reference's order (sizes, dtypes, devices as it uses them).

    Returns a list of (iparams (n, 5) int64 CPU, fparams (n, 6) float64 CPU) stages; the color
    family is one stage (brightness, saturation, contrast fused)."""
    ip = torch.zeros(n, N_IPARAMS, dtype=torch.int64)
    fp = torch.zeros(n, N_FPARAMS, dtype=torch.float64)

    def per_image(t):
        return t.reshape(n, -1)[:, 0].cpu()

    if family == "color":
        stream.reseed()
        b = (stream.rand(n, 1, 1, 1, dtype=dtype, device=device) - 0.5) * param.brightness
        stream.reseed()
        s = stream.rand(n, 1, 1, 1, dtype=dtype, device=device) * param.saturation
        stream.reseed()
        c = stream.rand(n, 1, 1, 1, dtype=dtype, device=device) + param.contrast
        ip[:, 0] = OP_COLOR
        fp[:, 0], fp[:, 1], fp[:, 2] = per_image(b).double(), per_image(s).double(), per_image(c).double()
    elif family == "crop":
        shift_h, shift_w = _pixels(height, param.ratio_crop_pad), _pixels(width, param.ratio_crop_pad)
        stream.reseed()
        th = stream.randint(-shift_h, shift_h + 1, [n, 1, 1], device=device)
        stream.reseed()
        tw = stream.randint(-shift_w, shift_w + 1, [n, 1, 1], device=device)
        ip[:, 0] = OP_CROP
        ip[:, 1], ip[:, 2] = per_image(th), per_image(tw)
    elif family == "cutout":
        size_h, size_w = _pixels(height, param.ratio_cutout), _pixels(width, param.ratio_cutout)
        stream.reseed()
        oh = stream.randint(0, height + (1 - size_h % 2), [n, 1, 1], device=device)
        stream.reseed()
        ow = stream.randint(0, width + (1 - size_w % 2), [n, 1, 1], device=device)
        ip[:, 0] = OP_CUTOUT
        for col, offset, size, extent in ((1, per_image(oh), size_h, height), (3, per_image(ow), size_w, width)):
            ip[:, col], ip[:, col + 1] = _cutout_rows(offset, size, extent)
    elif family == "flip":
        stream.reseed()
        randf = stream.rand(n, 1, 1, 1, device=device)
        ip[:, 0] = torch.where(per_image(randf) < param.prob_flip, OP_FLIP, OP_IDENTITY)
    elif family == "scale":
        ratio = param.ratio_scale
        stream.reseed()
        sx = stream.rand(n) * (ratio - 1.0 / ratio) + 1.0 / ratio
        stream.reseed()
        sy = stream.rand(n) * (ratio - 1.0 / ratio) + 1.0 / ratio
        ip[:, 0] = OP_AFFINE
        fp[:, 0], fp[:, 4] = sx.double(), sy.double()
    elif family == "rotate":
        stream.reseed()
        angle = (stream.rand(n) - 0.5) * 2 * param.ratio_rotate / 180 * float(math.pi)
        ip[:, 0] = OP_AFFINE
        # element by element on 0-d tensors, as the reference builds theta (bitwise the same cos/sin)
        for i in range(n):
            a = angle[i]
            fp[i, 0], fp[i, 1] = float(torch.cos(a)), float(torch.sin(-a))
            fp[i, 3], fp[i, 4] = float(torch.sin(a)), float(torch.cos(a))
    return [(ip, fp)]


def draw_stages(families: Sequence[str], stream: SeedStream, n: int, height: int, width: int, param,
                dtype: torch.dtype, device, siamese: bool) -> List[tuple]:
    """The reference DiffAugment's draws for one call on n images: a list of stages (ip, fp)."""
    if not families:
        return []
    if param.aug_mode == "M":
        chosen = list(families)
    else:
        stream.reseed()
        chosen = [families[int(torch.randint(0, len(families), size=(1,), generator=stream.generator).item())]]
    stages = []
    for family in chosen:
        stages += draw_family(family, stream, n, height, width, param, dtype, device)
    if siamese:  # element 0 of every draw applies to the whole batch
        stages = [(ip[:1].expand(n, -1), fp[:1].expand(n, -1)) for ip, fp in stages]
    return stages


def _mix_seeds(seeds: Sequence[int]) -> int:
    h = 1469598103934665603
    for s in seeds:
        h = ((h ^ (s & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def _draw_fast(families, seeds, rows, height, width, param):
    """rng='fast': one torch.rand call gives the uniforms of every row (Siamese group or free image)."""
    seeded = [s for s in seeds if s != -1]
    gen = torch.Generator().manual_seed(_mix_seeds(seeded)) if seeded else None
    n_stages = len(families) if param.aug_mode == "M" else 1
    u = torch.rand(n_stages, rows, 4, dtype=torch.float64, generator=gen)
    stages = []
    for k in range(n_stages):
        ip = torch.zeros(rows, N_IPARAMS, dtype=torch.int64)
        fp = torch.zeros(rows, N_FPARAMS, dtype=torch.float64)
        if param.aug_mode == "M":
            family_of_row = torch.full((rows,), k)
        else:
            family_of_row = (u[k, :, 3] * len(families)).long().clamp_max(len(families) - 1)
        for position, family in enumerate(families):
            sel = family_of_row == position
            if bool(sel.any()):
                ip[sel], fp[sel] = _params_from_uniforms(family, u[k, sel], height, width, param)
        stages.append((ip, fp))
    return stages


def _params_from_uniforms(family, u, height, width, param):
    """(iparams, fparams) rows of one family from uniforms u (rows, ≥3), the reference's formulas."""
    rows = u.shape[0]
    ip = torch.zeros(rows, N_IPARAMS, dtype=torch.int64)
    fp = torch.zeros(rows, N_FPARAMS, dtype=torch.float64)

    def randint(lo, hi, v):
        return lo + torch.clamp((v * (hi - lo)).long(), max=hi - lo - 1)

    if family == "color":
        ip[:, 0] = OP_COLOR
        fp[:, 0] = (u[:, 0] - 0.5) * param.brightness
        fp[:, 1] = u[:, 1] * param.saturation
        fp[:, 2] = u[:, 2] + param.contrast
    elif family == "crop":
        sh, sw = _pixels(height, param.ratio_crop_pad), _pixels(width, param.ratio_crop_pad)
        ip[:, 0], ip[:, 1], ip[:, 2] = OP_CROP, randint(-sh, sh + 1, u[:, 0]), randint(-sw, sw + 1, u[:, 1])
    elif family == "cutout":
        ip[:, 0] = OP_CUTOUT
        for col, extent, v in ((1, height, u[:, 0]), (3, width, u[:, 1])):
            size = _pixels(extent, param.ratio_cutout)
            ip[:, col], ip[:, col + 1] = _cutout_rows(randint(0, extent + (1 - size % 2), v), size, extent)
    elif family == "flip":
        ip[:, 0] = torch.where(u[:, 0] < param.prob_flip, OP_FLIP, OP_IDENTITY)
    elif family == "scale":
        r = param.ratio_scale
        ip[:, 0] = OP_AFFINE
        fp[:, 0], fp[:, 4] = u[:, 0] * (r - 1 / r) + 1 / r, u[:, 1] * (r - 1 / r) + 1 / r
    elif family == "rotate":
        a = (u[:, 0] - 0.5) * 2 * param.ratio_rotate / 180 * math.pi
        ip[:, 0] = OP_AFFINE
        fp[:, 0], fp[:, 1], fp[:, 3], fp[:, 4] = torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)
    return ip, fp


def draw_grouped(families, seeds: List[int], groups: torch.Tensor, height: int, width: int, param,
                 dtype: torch.dtype, rng: str) -> List[tuple]:
    """Per-image (iparams, fparams) of every stage for ``dsa_augment`` (CPU tensors)."""
    groups_cpu = groups.cpu()
    n = groups_cpu.numel()
    # row of the parameter table each image reads: its group's row, or its own row for seed −1
    row_of_image = torch.empty(n, dtype=torch.int64)
    members = [torch.nonzero(groups_cpu == g).flatten() for g in range(len(seeds))]
    rows = 0
    for g, seed in enumerate(seeds):
        idx = members[g]
        if seed == -1:
            row_of_image[idx] = torch.arange(rows, rows + idx.numel())
            rows += idx.numel()
        else:
            row_of_image[idx] = rows
            rows += 1
    if rng == "fast":
        tables = _draw_fast(families, seeds, rows, height, width, param)
    else:
        n_stages = len(families) if param.aug_mode == "M" else 1
        tables = [(torch.zeros(rows, N_IPARAMS, dtype=torch.int64), torch.zeros(rows, N_FPARAMS, dtype=torch.float64))
                  for _ in range(n_stages)]
        generator = torch.Generator()
        row = 0
        for g, seed in enumerate(seeds):
            count = members[g].numel()
            if seed == -1:
                if count == 0:
                    continue
                stages = draw_stages(families, SeedStream(-1), count, height, width, param, dtype, "cpu", False)
                used = count
            else:
                stages = draw_stages(families, SeedStream(seed, generator), 1, height, width, param, dtype, "cpu", True)
                used = 1
            for (ip_t, fp_t), (ip, fp) in zip(tables, stages):
                ip_t[row:row + used] = ip
                fp_t[row:row + used] = fp
            row += used
    return [(ip[row_of_image], fp[row_of_image]) for ip, fp in tables]


# --- reference application (the `torch` backend): the reference's tensor ops -------------------

def _ref_color(x, b, s, c):
    x = x + b
    x_mean = x.mean(dim=1, keepdim=True)
    x = (x - x_mean) * s + x_mean
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - x_mean) * c + x_mean


def _ref_crop(x, th, tw):
    n, _, h, w = x.shape
    dev = x.device
    rows = torch.clamp(torch.arange(h, device=dev).view(1, h, 1) + th.view(n, 1, 1) + 1, 0, h + 1)
    cols = torch.clamp(torch.arange(w, device=dev).view(1, 1, w) + tw.view(n, 1, 1) + 1, 0, w + 1)
    batch = torch.arange(n, device=dev).view(n, 1, 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def _ref_cutout(x, box):
    n, _, h, w = x.shape
    i = torch.arange(h, device=x.device).view(1, h, 1)
    j = torch.arange(w, device=x.device).view(1, 1, w)
    r0, r1, c0, c1 = (box[:, k].view(n, 1, 1) for k in range(4))
    inside = (i >= r0) & (i <= r1) & (j >= c0) & (j <= c1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[inside] = 0
    return x * mask.unsqueeze(1)


def _ref_affine(x, theta, align_corners):
    # the reference builds theta in float32 on the CPU, then moves the grid to x's device
    theta = theta.to(torch.float32 if x.dtype != torch.float64 else torch.float64).cpu()
    grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners).to(device=x.device, dtype=x.dtype)
    return F.grid_sample(x, grid, align_corners=align_corners)


def _ref_op(code: int, x, ip, fp, align_corners):
    if code == OP_IDENTITY:
        return x
    if code == OP_FLIP:
        return x.flip(3)
    if code == OP_CROP:
        return _ref_crop(x, ip[:, 1].to(x.device), ip[:, 2].to(x.device))
    if code == OP_CUTOUT:
        return _ref_cutout(x, ip[:, 1:5].to(x.device))
    if code == OP_COLOR:
        b, s, c = (fp[:, k].to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1) for k in range(3))
        return _ref_color(x, b, s, c)
    theta = fp.reshape(-1, 2, 3)
    return _ref_affine(x, theta, align_corners)


def apply_stage_reference(x: torch.Tensor, ip: torch.Tensor, fp: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """One stage with torch ops; ``ip``/``fp`` are per-image CPU tables (float64 fp)."""
    codes = ip[:, 0]
    present = torch.unique(codes).tolist()
    if len(present) == 1:
        return _ref_op(present[0], x, ip, fp, align_corners)
    pieces, order = [], []
    for code in present:
        idx = torch.nonzero(codes == code).flatten()
        pieces.append(_ref_op(code, x[idx.to(x.device)], ip[idx], fp[idx], align_corners))
        order.append(idx)
    inverse = torch.argsort(torch.cat(order)).to(x.device)
    return torch.cat(pieces)[inverse]


# --- fused backends: custom ops with autograd --------------------------------------------------

def base_grid(height: int, width: int, align_corners: bool, dtype, device) -> torch.Tensor:
    """affine_grid's normalised pixel coordinates (x along W, then y along H), computed with the
    same torch ops as ``affine_grid`` so the kernels sample where the reference samples."""
    def axis(steps):
        if steps <= 1:
            return torch.zeros(steps, dtype=dtype)
        coords = torch.linspace(-1, 1, steps, dtype=dtype)
        return coords if align_corners else coords * (steps - 1) / steps
    return torch.cat([axis(width), axis(height)]).to(device)


def _setup_context(ctx, inputs, output):
    _x, ip, fp, base, align_corners = inputs
    ctx.save_for_backward(ip, fp, base)
    ctx.align_corners = align_corners


def _make_backward(bwd_op):
    def backward(ctx, grad_y):
        ip, fp, base = ctx.saved_tensors
        return bwd_op(grad_y.contiguous(), ip, fp, base, ctx.align_corners), None, None, None, None
    return backward


def _fake_fwd(x, ip, fp, base, align_corners):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_bwd(grad_y, ip, fp, base, align_corners):
    return torch.empty_like(grad_y, memory_format=torch.contiguous_format)


@torch.library.custom_op("ddfast::dsa_triton_fwd", mutates_args=())
def _triton_fwd(x: torch.Tensor, iparams: torch.Tensor, fparams: torch.Tensor, base: torch.Tensor,
                align_corners: bool) -> torch.Tensor:
    from ..kernels.dsa import dsa_forward

    return dsa_forward(x, iparams, fparams, base, align_corners)


@torch.library.custom_op("ddfast::dsa_triton_bwd", mutates_args=())
def _triton_bwd(grad_y: torch.Tensor, iparams: torch.Tensor, fparams: torch.Tensor, base: torch.Tensor,
                align_corners: bool) -> torch.Tensor:
    from ..kernels.dsa import dsa_backward

    return dsa_backward(grad_y, iparams, fparams, base, align_corners)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_fwd.register_autograd(_make_backward(_triton_bwd), setup_context=_setup_context)


def _register_compiled():
    """Python side of the C++ ops (csrc/dsa.cpp), run once after the library loads."""
    torch.library.register_fake("ddfast::dsa_fwd")(_fake_fwd)
    torch.library.register_fake("ddfast::dsa_bwd")(_fake_bwd)
    torch.library.register_autograd("ddfast::dsa_fwd", _make_backward(torch.ops.ddfast.dsa_bwd),
                                    setup_context=_setup_context)


_backend.register_op(_backend.OpSpec(OP, cpu_compiled_is_faster=True, on_load=_register_compiled))


def apply_stages(x: torch.Tensor, stages, align_corners: bool, which: str) -> torch.Tensor:
    """Run the drawn stages with a resolved backend ('torch' | 'triton' | 'compiled')."""
    if which == "torch":
        for ip, fp in stages:
            x = apply_stage_reference(x, ip, fp, align_corners)
        return x
    acc = acc_dtype(x.dtype)
    base = base_grid(x.shape[2], x.shape[3], align_corners, acc, x.device)
    op = torch.ops.ddfast.dsa_triton_fwd if which == "triton" else torch.ops.ddfast.dsa_fwd
    for ip, fp in stages:
        ip_dev = ip.to(device=x.device, dtype=torch.int32).contiguous()
        fp_dev = fp.to(device=x.device, dtype=acc).contiguous()
        x = op(x.contiguous(), ip_dev, fp_dev, base, bool(align_corners))
    return x


def _check_images(x):
    check_float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D image batch (N, C, H, W), got shape {tuple(x.shape)}")


def _check_seeds(seeds) -> List[int]:
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype.is_floating_point or seeds.dtype == torch.bool or seeds.dim() != 1:
            raise TypeError(f"seeds must be a 1-D integer tensor or a sequence of ints, got {seeds.dtype} "
                            f"of shape {tuple(seeds.shape)}")
        seeds = seeds.tolist()
    if isinstance(seeds, int) or not isinstance(seeds, (list, tuple)):
        raise TypeError(f"seeds must be a sequence of ints (one per group), got {type(seeds).__name__}")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"seeds must hold ints, got {type(s).__name__}")
        if s < -1:
            raise ValueError(f"seeds must be -1 (independent per-image draws) or non-negative, got {s}")
        out.append(int(s))
    if not out:
        raise ValueError("seeds is empty: give one seed per group")
    return out


def dsa_augment(x: torch.Tensor, groups: Optional[torch.Tensor], strategy: str, seeds, *,
                align_corners: bool = False, param=None, backend: str = "auto", rng: str = "reference") -> torch.Tensor:
    """DSA on many groups in one call: images with group id g get ``DiffAugment(·, strategy, seeds[g])``.

    x: (N, C, H, W) float images. groups: (N,) integer group ids in [0, len(seeds)) (None: one
    group). seeds: one int per group (−1: independent per-image draws from torch's global CPU
    generator). align_corners: False as DatasetCondensation (modern torch), True as
    mtt-distillation. param: a ``ParamDiffAug`` (default settings if None). rng: "reference"
    (the reference's generator calls per group, bitwise equal to per-group DiffAugment on CPU)
    or "fast" (one generator call for all groups; not the reference's stream).
    Differentiable w.r.t. x in every backend.
    """
    _check_images(x)
    param = ParamDiffAug() if param is None else param
    families = parse_strategy(strategy, param)
    seeds = _check_seeds(seeds)
    check_choice("rng", rng, ("reference", "fast"))
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {type(align_corners).__name__}")
    n = x.shape[0]
    if groups is None:
        groups = torch.zeros(n, dtype=torch.int64)
    elif isinstance(groups, torch.Tensor):
        groups = groups.cpu()  # the draws are made on the CPU: one transfer serves the check and the draws
    check_labels("groups", groups, n, len(seeds))
    if not families:
        return x
    which = _backend.resolve(OP, backend, x.device)
    stages = draw_grouped(families, seeds, groups, x.shape[2], x.shape[3], param, x.dtype, rng)
    y = apply_stages(x, stages, align_corners, which)
    check_result_finite(y, x=x)
    return y


def diff_augment(x: torch.Tensor, strategy: str = "", seed: int = -1, param=None, *, align_corners: bool = False,
                 backend: str = "auto") -> torch.Tensor:
    """The reference ``DiffAugment`` on one batch: the same global-generator calls (on x's device,
    re-seeding torch's global generators like ``set_seed_DiffAug``), the same ``param.batchmode``
    / ``param.latestseed`` side effects, the ops run by the fused kernels (or torch ops)."""
    param = ParamDiffAug() if param is None else param
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (-1: independent per-image draws), got {type(seed).__name__}")
    param.batchmode = seed != -1
    param.latestseed = seed
    families = parse_strategy(strategy, param)
    if not families:
        return x
    _check_images(x)
    which = _backend.resolve(OP, backend, x.device)
    stream = SeedStream(seed)
    stages = draw_stages(families, stream, x.shape[0], x.shape[2], x.shape[3], param, x.dtype, x.device,
                         siamese=seed != -1)
    param.latestseed = stream.latest
    return apply_stages(x, stages, align_corners, which).contiguous()
