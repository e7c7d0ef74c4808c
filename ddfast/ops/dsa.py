"""dsa_augment — Differentiable Siamese Augmentation for many groups in one call (SPEC 3.5).

DatasetCondensation's ``DiffAugment(x, strategy, seed, param)`` draws random parameters with
a fixed sequence of torch generator calls and applies color / crop / cutout / flip / scale /
rotate. ``dsa_augment(x, groups, strategy, seeds)`` does that for many groups at once: the
images with group id ``g`` get the transform of ``seeds[g]``, so the output for group g equals
``DiffAugment(x[groups == g], strategy, seeds[g])``.

Structure:
  1. draw (rng "reference": the reference's call sequence per group, tables on the CPU; rng
     "device": Philox on x's device, see ``draw_device``): every op becomes one *stage*; each
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

RNG: ``rng="device"`` (the default) draws on the device (see ``dsa_augment``). With
``rng="reference"`` the groups are drawn one after another with the
generator calls of ``DiffAugment(x[groups == g], strategy, seeds[g], param)``: torch's global
generators, re-seeded with seed, seed+1, … exactly where the reference calls ``set_seed_DiffAug``
(``torch.random.manual_seed``; ``SeedStream`` seeds the CPU and CUDA generators directly and the
other backends once per call, the same end state without a formatted Python stack per draw),
every draw of the group's full size on x's device (flip, color, crop, cutout) or on the CPU
(scale, rotate, the mode-'S' pick). So the parameters of every group (seeded, or seed −1 drawing
from wherever the previous groups left the generator) and the state of every generator afterwards
are those of the per-group reference calls, on CPU and CUDA. A group without images makes no
call. Cost: host work and small launches per group, and on CUDA one device-to-host read per call
(``HostReads``) of draws made on a side stream (``draw_stream``), so the read does not wait for
the work queued before the call; a groups tensor on the device is read once while it is unchanged
(``host_copy``). ``rng="fast"`` draws every parameter of every group
from one CPU generator in a single call: same distributions, not the reference's stream.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _backend
from .._checks import acc_dtype, check_choice, check_float_tensor, check_labels, check_result_finite
from .._tensor_cache import host_copy

OP = "dsa"

OP_IDENTITY, OP_COLOR, OP_CROP, OP_CUTOUT, OP_FLIP, OP_AFFINE = range(6)
RNG_MODES = ("reference", "device", "fast")
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
    next seed.

    With the global generators a re-seed sets the CPU generator and, unless ``cpu_draws`` (every
    draw made on the CPU), the initialised CUDA devices' generators, directly; ``finish`` then
    seeds the rest once with the last seed (``seed_other_devices``). That leaves every generator as
    the per-draw ``torch.random.manual_seed`` calls leave it, without their cost: each one also
    queues a lazy seed for every backend not initialised here (XPU, MTIA; CUDA too when it is not),
    formatting the Python stack each time: 160 µs per call, 650 µs 40 frames deep (CPU, 2026-11-26),
    about 4 per group, which made the reference-stream DSA host-bound on an H100 (8.7 ms of host
    time for 10 groups against 0.24 ms of kernels)."""

    def __init__(self, seed: int, generator: Optional[torch.Generator] = None, cpu_draws: bool = False):
        self.latest = seed
        self.generator = generator
        self.cpu_draws = cpu_draws and generator is None
        self.last_global = None

    def reseed(self):
        if self.latest == -1:
            return
        if self.generator is not None:
            self.generator.manual_seed(self.latest)
        elif self.cpu_draws or torch.cuda.is_initialized():
            torch.default_generator.manual_seed(self.latest)
            if not self.cpu_draws:
                torch.cuda.manual_seed_all(self.latest)  # initialised: no lazy queue, no stack
            self.last_global = self.latest
        else:  # draws on another device type: torch's own call
            torch.random.manual_seed(self.latest)
        self.latest += 1

    def finish(self):
        """Seed the generators ``reseed`` skipped as the last ``torch.random.manual_seed`` would have."""
        if self.last_global is not None:
            seed_other_devices(self.last_global, keep_cuda=not self.cpu_draws)
            self.last_global = None

    def rand(self, *size, dtype=None, device="cpu"):
        return torch.rand(*size, dtype=dtype, device=device, generator=self.generator)

    def randint(self, low, high, size, device="cpu"):
        return torch.randint(low, high, size=size, device=device, generator=self.generator)


# torch.random.manual_seed's devices besides the CPU, each (module, its seed-all function)
_SEEDED_DEVICES = (("cuda", "manual_seed_all"), ("mps", "manual_seed"), ("xpu", "manual_seed_all"),
                   ("mtia", "manual_seed_all"))


@functools.lru_cache(maxsize=None)
def _fast_seeding_matches_torch() -> bool:
    """Whether ``torch.random.manual_seed`` seeds exactly the devices ``_SEEDED_DEVICES`` lists (and
    the custom one): read once from its source, so a torch that seeds another device falls back."""
    import inspect
    import re

    try:
        source = inspect.getsource(torch.random.manual_seed)
        impl = getattr(torch.random, "_manual_seed_impl", None)
        source += inspect.getsource(impl) if impl is not None else ""
    except (OSError, TypeError):  # no source (frozen install): torch's own call
        return False
    seeded = set(re.findall(r"torch\.(\w+)\.manual_seed", source))
    # CUDA must be among them: an empty match means the seeding moved where this cannot see
    return ("cuda" in seeded and seeded <= {name for name, _ in _SEEDED_DEVICES}
            and hasattr(torch.random, "_seed_custom_device"))


def _device_compiled(module) -> bool:
    """False only when this build cannot run the device at all (its queued lazy seed never runs)."""
    compiled = getattr(module, "_is_compiled", None)
    return True if compiled is None else bool(compiled())


def seed_other_devices(seed: int, keep_cuda: bool = False) -> None:
    """``torch.random.manual_seed(seed)``'s effect on every generator but the CPU one (and, with
    ``keep_cuda``, the initialised CUDA ones), which keep their state.

    Devices this build was compiled without are skipped: torch would only queue a lazy seed for
    them (formatting the Python stack, about 40 µs each), which no later call can run."""
    if not _fast_seeding_matches_torch():
        state = torch.random.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if keep_cuda and torch.cuda.is_initialized() else None
        torch.random.manual_seed(seed)
        torch.random.set_rng_state(state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        return
    seed = int(seed)
    for name, seed_all in _SEEDED_DEVICES:
        module = getattr(torch, name)
        if module._is_in_bad_fork() or not _device_compiled(module):
            continue
        if name == "cuda" and keep_cuda and torch.cuda.is_initialized():
            continue
        getattr(module, seed_all)(seed)
    torch.random._seed_custom_device(seed)


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


class HostReads:
    """Device draws read on the host once per call instead of once per draw (each read was a sync:
    about 8 per group, 69 per DM step side on an H200). ``read(t, fill)`` queues a draw's values
    and the function that writes them into the CPU tables; ``flush`` copies every queued draw in
    one transfer and runs the fills in order. CPU draws are filled at once. The draws travel as
    their bytes (one concatenation, no conversion launch per draw), so the values are bitwise
    the drawn ones."""

    def __init__(self):
        self.items: List[tuple] = []

    def read(self, t: torch.Tensor, fill: Callable[[torch.Tensor], None]) -> None:
        if t.device.type == "cpu":
            fill(t)
        else:
            self.items.append((t, fill))

    def flush(self) -> None:
        if not self.items:
            return
        # widest elements first, so every draw starts at a multiple of its element size in the
        # byte buffer (a byte view can only be reinterpreted at an aligned offset)
        order = sorted(range(len(self.items)), key=lambda i: -self.items[i][0].element_size())
        raw = torch.cat([self.items[i][0].reshape(-1).contiguous().view(torch.uint8) for i in order]).cpu()
        values, start = [None] * len(self.items), 0
        for i in order:
            t = self.items[i][0]
            nbytes = t.numel() * t.element_size()
            values[i] = raw[start:start + nbytes].view(t.dtype)
            start += nbytes
        for (_, fill), v in zip(self.items, values):
            fill(v)
        self.items = []


_DRAW_STREAMS: dict = {}  # CUDA device index -> the side stream of its reference-stream draws


def draw_stream(device) -> contextlib.AbstractContextManager:
    """Where the reference stream's device draws run. On CUDA: a side stream of their own. The draws
    read nothing the current stream writes (only the generator's state, which is the host's), so
    ``HostReads.flush``'s read waits for the draws alone, not for the work queued before them: the
    host draws the next augmentation while the GPU still runs the previous step. The values are
    the same on any stream (the generator's offset advances on the host at each launch). Elsewhere,
    or while a CUDA graph is being captured, the current stream."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return contextlib.nullcontext()
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _DRAW_STREAMS.get(index)
    if stream is None:  # high priority: torch's pool of those is one a user's streams rarely share
        stream = _DRAW_STREAMS[index] = torch.cuda.Stream(device=index, priority=-1)
    return torch.cuda.stream(stream)


def draw_family(family: str, stream: SeedStream, n: int, keep: int, height: int, width: int, param,
                dtype: torch.dtype, device, reads: HostReads) -> List[tuple]:
    """One op family's draws, in the reference's order (sizes, dtypes, devices as it uses them).

    Every draw has the batch size ``n``, as the reference's (so the generators advance exactly as
    its calls advance them); the first ``keep`` rows become parameters (1 for a Siamese call:
    element 0 applies to the whole batch). Returns a list of (iparams (keep, 5) int64 CPU,
    fparams (keep, 6) float64 CPU) stages; the color family is one stage (the three fused). Device
    draws reach the tables at ``reads.flush()``."""
    ip = torch.zeros(keep, N_IPARAMS, dtype=torch.int64)
    fp = torch.zeros(keep, N_FPARAMS, dtype=torch.float64)

    def per_image(t, fill):
        reads.read(t.reshape(n, -1)[:keep, 0], fill)

    def set_column(table, col, convert=lambda v: v):
        def fill(values):
            table[:, col] = convert(values)
        return fill

    if family == "color":
        stream.reseed()
        b = (stream.rand(n, 1, 1, 1, dtype=dtype, device=device) - 0.5) * param.brightness
        stream.reseed()
        s = stream.rand(n, 1, 1, 1, dtype=dtype, device=device) * param.saturation
        stream.reseed()
        c = stream.rand(n, 1, 1, 1, dtype=dtype, device=device) + param.contrast
        ip[:, 0] = OP_COLOR
        for col, t in enumerate((b, s, c)):
            per_image(t, set_column(fp, col, lambda v: v.double()))
    elif family == "crop":
        shift_h, shift_w = _pixels(height, param.ratio_crop_pad), _pixels(width, param.ratio_crop_pad)
        stream.reseed()
        th = stream.randint(-shift_h, shift_h + 1, [n, 1, 1], device=device)
        stream.reseed()
        tw = stream.randint(-shift_w, shift_w + 1, [n, 1, 1], device=device)
        ip[:, 0] = OP_CROP
        per_image(th, set_column(ip, 1))
        per_image(tw, set_column(ip, 2))
    elif family == "cutout":
        size_h, size_w = _pixels(height, param.ratio_cutout), _pixels(width, param.ratio_cutout)
        stream.reseed()
        oh = stream.randint(0, height + (1 - size_h % 2), [n, 1, 1], device=device)
        stream.reseed()
        ow = stream.randint(0, width + (1 - size_w % 2), [n, 1, 1], device=device)
        ip[:, 0] = OP_CUTOUT
        for col, offset, size, extent in ((1, oh, size_h, height), (3, ow, size_w, width)):
            def fill(values, col=col, size=size, extent=extent):
                ip[:, col], ip[:, col + 1] = _cutout_rows(values, size, extent)
            per_image(offset, fill)
    elif family == "flip":
        stream.reseed()
        randf = stream.rand(n, 1, 1, 1, device=device)
        per_image(randf, set_column(ip, 0, lambda v: torch.where(v < param.prob_flip, OP_FLIP, OP_IDENTITY)))
    elif family == "scale":
        ratio = param.ratio_scale
        stream.reseed()
        sx = stream.rand(n)[:keep] * (ratio - 1.0 / ratio) + 1.0 / ratio
        stream.reseed()
        sy = stream.rand(n)[:keep] * (ratio - 1.0 / ratio) + 1.0 / ratio
        ip[:, 0] = OP_AFFINE
        fp[:, 0], fp[:, 4] = sx.double(), sy.double()
    elif family == "rotate":
        stream.reseed()
        angle = (stream.rand(n)[:keep] - 0.5) * 2 * param.ratio_rotate / 180 * float(math.pi)
        ip[:, 0] = OP_AFFINE
        # element by element on 0-d tensors, as the reference builds theta (bitwise the same cos/sin)
        for i in range(keep):
            a = angle[i]
            fp[i, 0], fp[i, 1] = float(torch.cos(a)), float(torch.sin(-a))
            fp[i, 3], fp[i, 4] = float(torch.sin(a)), float(torch.cos(a))
    return [(ip, fp)]


def draw_stages(families: Sequence[str], stream: SeedStream, n: int, height: int, width: int, param,
                dtype: torch.dtype, device, siamese: bool, reads: Optional[HostReads] = None) -> List[tuple]:
    """The reference DiffAugment's draws for one call on n images: a list of stages (ip, fp) with
    one row (Siamese: element 0 of every draw applies to the whole batch) or n rows. With
    ``reads`` the device draws reach the tables at the caller's ``reads.flush()`` (one host read
    for many calls); without, before this returns."""
    if not families:
        return []
    if reads is None:
        reads = HostReads()
        with draw_stream(device):
            stages = draw_stages(families, stream, n, height, width, param, dtype, device, siamese, reads)
            reads.flush()
        return stages
    if param.aug_mode == "M":
        chosen = list(families)
    else:
        stream.reseed()
        chosen = [families[int(torch.randint(0, len(families), size=(1,), generator=stream.generator).item())]]
    keep = 1 if siamese else n
    stages = []
    for family in chosen:
        stages += draw_family(family, stream, n, keep, height, width, param, dtype, device, reads)
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


def row_layout(seeds: Sequence[int], groups: torch.Tensor):
    """Parameter-table layout of a grouped call: a seeded (Siamese) group owns one row, a seed −1
    group one row per image, in group order. Returns (row_of_image (N,), first row of each group
    (G,), rows in all), computed with tensor ops on ``groups``' device (no loop over images)."""
    num_groups = len(seeds)
    dev = groups.device
    groups = groups.long()
    counts = torch.zeros(num_groups, dtype=torch.int64, device=dev).scatter_add_(0, groups, torch.ones_like(groups))
    siamese = torch.tensor([s != -1 for s in seeds], device="cpu").to(dev, non_blocking=True)
    rows_of_group = torch.where(siamese, torch.ones_like(counts), counts)
    first_row = torch.cumsum(rows_of_group, 0) - rows_of_group
    # rank of each image within its group (stable: the order of x), for the per-image rows
    order = torch.sort(groups, stable=True).indices
    rank_sorted = torch.arange(groups.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[groups[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    row_of_image = first_row[groups] + torch.where(siamese[groups], torch.zeros_like(rank), rank)
    return row_of_image, first_row, rows_of_group.sum()


def reference_group_draws(strategy: str, seed: int, n: int, height: int, width: int, param,
                          dtype: torch.dtype, device) -> List[tuple]:
    """The generator calls of ``DiffAugment(x, strategy, seed, param)`` on a batch of ``n`` images
    of ``dtype`` on ``device``: torch's global generators, re-seeded through
    ``torch.random.manual_seed`` exactly where the reference re-seeds, draws of the full batch
    size (so every generator is left in the state the reference call leaves). Returns the stages
    (one row when ``seed != -1``, else n rows), for ``apply_group_draws``."""
    families = parse_strategy(strategy, param)
    stream = SeedStream(seed, cpu_draws=torch.device(device).type == "cpu")
    stages = draw_stages(families, stream, n, height, width, param, dtype, device, siamese=seed != -1)
    stream.finish()
    return stages


def apply_group_draws(x: torch.Tensor, groups: torch.Tensor, seeds: Sequence[int], group_draws: Sequence,
                      *, align_corners: bool = False, backend: str = "auto") -> torch.Tensor:
    """Apply per-group draws (``reference_group_draws`` of each group, None for an empty group) to
    the images of each group, all groups in one pass per stage."""
    which = _backend.resolve(OP, backend, x.device)
    stages = _per_image_tables(seeds, host_copy(groups), group_draws)
    y = apply_stages(x, stages, align_corners, which)
    check_result_finite(y, x=x)
    return y


def _per_image_tables(seeds, groups_cpu, group_draws) -> List[tuple]:
    row_of_image, first_row, rows = row_layout(seeds, groups_cpu)
    drawn = [d for d in group_draws if d is not None]
    if not drawn:
        return []
    rows = int(rows)
    tables = [(torch.zeros(rows, N_IPARAMS, dtype=torch.int64), torch.zeros(rows, N_FPARAMS, dtype=torch.float64))
              for _ in drawn[0]]
    for row, stages in zip(first_row.tolist(), group_draws):
        for (ip_t, fp_t), (ip, fp) in zip(tables, stages or ()):
            ip_t[row:row + ip.shape[0]] = ip
            fp_t[row:row + fp.shape[0]] = fp
    return [(ip[row_of_image], fp[row_of_image]) for ip, fp in tables]


def draw_grouped(families, seeds: List[int], groups: torch.Tensor, height: int, width: int, param,
                 dtype: torch.dtype, rng: str, device="cpu") -> List[tuple]:
    """Per-image (iparams, fparams) of every stage for ``dsa_augment`` (CPU tensors).

    rng "reference": group by group, the generator calls of ``DiffAugment(x[groups == g],
    strategy, seeds[g], param)`` on ``device`` (``reference_group_draws``), so the parameters and
    the generator states left behind are the per-group calls'. A group without images makes no
    call (the reference cannot be called on an empty batch)."""
    groups_cpu = groups.cpu()
    if rng == "fast":
        row_of_image, _, rows = row_layout(seeds, groups_cpu)
        tables = _draw_fast(families, seeds, int(rows), height, width, param)
        return [(ip[row_of_image], fp[row_of_image]) for ip, fp in tables]
    counts = torch.bincount(groups_cpu, minlength=len(seeds)).tolist()
    cpu_draws = torch.device(device).type == "cpu"
    group_draws, last_seed, reads = [], None, HostReads()
    with draw_stream(device):
        for seed, count in zip(seeds, counts):
            stream = SeedStream(seed, cpu_draws=cpu_draws)
            group_draws.append(draw_stages(families, stream, count, height, width, param, dtype, device,
                                           siamese=seed != -1, reads=reads) if count else None)
            last_seed = stream.last_global if stream.last_global is not None else last_seed
        reads.flush()  # every group's device draws in one host read
    if last_seed is not None:  # the other generators, once for all groups (SeedStream.finish)
        seed_other_devices(last_seed, keep_cuda=not cpu_draws)
    return _per_image_tables(seeds, groups_cpu, group_draws)


# --- rng="device": counter-based draws on the images' device ------------------------------------
#
# Every parameter row is one Philox4x32-10 block: key = the group's seed (a per-call key drawn from
# torch's global CPU generator for seed −1 groups), counter = (stage, image, group, domain) with image
# 0 for a Siamese group (so all its images share the row) and 1 + the image's position in x for a
# seed −1 group. The four 32-bit outputs become uniforms u = word · 2⁻³² in [0, 1) (exact in
# float64); u0..u2 give the op's parameters with the reference's formulas, u3 the mode-'S' pick.

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
_DOMAIN_SEEDED, _DOMAIN_FREE = 0x44534131, 0x44534132  # "DSA1", "DSA2": seeded vs seed −1 keys
_MASK32 = 0xFFFFFFFF


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 (Salmon et al., SC'11) on int64 tensors holding uint32 values (broadcastable).

    One round: (hi0, lo0) = M0·c0, (hi1, lo1) = M1·c2 (32×32→64-bit products; int64 products wrap
    modulo 2⁶⁴, and the shift-and-mask recovers their high word), then
    c = (hi1 ⊕ c1 ⊕ k0, lo1, hi0 ⊕ c3 ⊕ k1, lo0); the key is bumped by the Weyl constants between
    rounds. Returns the four output words."""
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W[0]) & _MASK32
            k1 = (k1 + PHILOX_W[1]) & _MASK32
        p0 = c0 * PHILOX_M[0]
        p1 = c2 * PHILOX_M[1]
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK32) ^ c1 ^ k0, p1 & _MASK32, ((p0 >> 32) & _MASK32) ^ c3 ^ k1, p0 & _MASK32
    return c0, c1, c2, c3


def _host_int64(values: Sequence[int]) -> torch.Tensor:
    """A CPU int64 tensor of Python ints, built from a buffer (no tensor-from-Python-data op)."""
    import array

    return torch.frombuffer(bytearray(array.array("q", values)), dtype=torch.int64)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """An asynchronous copy to ``device`` (pinned source) where one is needed."""
    device = torch.device(device)
    if device.type == "cpu" or t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True)


def device_keys(seeds: Sequence[int], device) -> torch.Tensor:
    """(G, 3) int64 on ``device``: the Philox key words and the domain word of every group. Seed −1
    groups share one key drawn per call from torch's global CPU generator (no host read of it)."""
    seeds_t = _host_int64(seeds)
    free_key = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)  # global CPU generator
    free = seeds_t == -1
    key = torch.where(free, free_key, seeds_t)
    table = torch.stack([key & _MASK32, (key >> 32) & _MASK32,
                         torch.where(free, _DOMAIN_FREE, _DOMAIN_SEEDED)], dim=1)
    return _to_device(table, device)


def device_uniforms(keys: torch.Tensor, groups: torch.Tensor, n_stages: int) -> torch.Tensor:
    """(n_stages, N, 4) float64 uniforms in [0, 1) for the N images (see the section comment)."""
    groups = groups.long()
    n = groups.shape[0]
    row_keys = keys[groups]                                   # (N, 3)
    siamese = row_keys[:, 2] == _DOMAIN_SEEDED
    image = torch.where(siamese, 0, torch.arange(1, n + 1, device=groups.device, dtype=torch.int64))
    stage = torch.arange(n_stages, device=groups.device, dtype=torch.int64).unsqueeze(1)
    words = philox4x32(stage, image.unsqueeze(0), groups.unsqueeze(0), row_keys[:, 2].unsqueeze(0),
                       row_keys[:, 0].unsqueeze(0), row_keys[:, 1].unsqueeze(0))
    words = [w.expand(n_stages, n) for w in words]
    return torch.stack(words, dim=2).to(torch.float64) * (2.0 ** -32)


def _randint_from(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Uniform integer in [low, high) from u in [0, 1)."""
    return low + torch.clamp((u * (high - low)).floor().long(), max=high - low - 1)


def family_params(family: str, u: torch.Tensor, height: int, width: int, param):
    """(iparams (R, 5) int64, fparams (R, 6) float64) of one family from uniforms u (R, ≥3), with
    the reference's distributions; tensor ops on u's device (no data-dependent shapes)."""
    rows = u.shape[0]
    zero_i = torch.zeros(rows, dtype=torch.int64, device=u.device)
    zero_f = torch.zeros(rows, dtype=torch.float64, device=u.device)
    cols_i, cols_f = [zero_i] * N_IPARAMS, [zero_f] * N_FPARAMS
    if family == "color":
        cols_i[0] = zero_i + OP_COLOR
        cols_f[:3] = [(u[:, 0] - 0.5) * param.brightness, u[:, 1] * param.saturation, u[:, 2] + param.contrast]
    elif family == "crop":
        sh, sw = _pixels(height, param.ratio_crop_pad), _pixels(width, param.ratio_crop_pad)
        cols_i[:3] = [zero_i + OP_CROP, _randint_from(u[:, 0], -sh, sh + 1), _randint_from(u[:, 1], -sw, sw + 1)]
    elif family == "cutout":
        cols_i[0] = zero_i + OP_CUTOUT
        for col, extent, v in ((1, height, u[:, 0]), (3, width, u[:, 1])):
            size = _pixels(extent, param.ratio_cutout)
            first, last = _cutout_rows(_randint_from(v, 0, extent + (1 - size % 2)), size, extent)
            cols_i[col], cols_i[col + 1] = zero_i + first, zero_i + last
    elif family == "flip":
        cols_i[0] = torch.where(u[:, 0] < param.prob_flip, OP_FLIP, OP_IDENTITY)
    elif family == "scale":
        r = param.ratio_scale
        cols_i[0] = zero_i + OP_AFFINE
        cols_f[0], cols_f[4] = u[:, 0] * (r - 1 / r) + 1 / r, u[:, 1] * (r - 1 / r) + 1 / r
    elif family == "rotate":
        a = (u[:, 0] - 0.5) * 2 * param.ratio_rotate / 180 * math.pi
        cols_i[0] = zero_i + OP_AFFINE
        cols_f[0], cols_f[1], cols_f[3], cols_f[4] = torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)
    return torch.stack(cols_i, dim=1), torch.stack(cols_f, dim=1)


def draw_device(families, seeds: Sequence[int], groups: torch.Tensor, height: int, width: int, param) -> List[tuple]:
    """rng="device": per-image (iparams, fparams) stages on ``groups``' device, no host sync and no
    host work per image (see the section comment for the stream)."""
    keys = device_keys(seeds, groups.device)
    n_stages = len(families) if param.aug_mode == "M" else 1
    u = device_uniforms(keys, groups, n_stages)
    stages = []
    for k in range(n_stages):
        if param.aug_mode == "M":
            stages.append(family_params(families[k], u[k], height, width, param))
            continue
        pick = torch.clamp((u[k, :, 3] * len(families)).floor().long(), max=len(families) - 1)
        ip, fp = None, None
        for position, family in enumerate(families):
            ip_f, fp_f = family_params(family, u[k], height, width, param)
            chosen = (pick == position).unsqueeze(1)
            ip = ip_f if ip is None else torch.where(chosen, ip_f, ip)
            fp = fp_f if fp is None else torch.where(chosen, fp_f, fp)
        stages.append((ip, fp))
    return stages


_DEVICE_CONSTANTS: dict = {}  # small per-call constants, uploaded once per value and device


def _device_constant(values, dtype, device) -> torch.Tensor:
    key = (tuple(values), dtype, torch.device(device))
    if key not in _DEVICE_CONSTANTS:
        if len(_DEVICE_CONSTANTS) > 256:
            _DEVICE_CONSTANTS.clear()
        _DEVICE_CONSTANTS[key] = torch.tensor(list(values), dtype=dtype).to(device)
    return _DEVICE_CONSTANTS[key]


def draw_device_fused(families, seeds: Sequence[int], groups: torch.Tensor, height: int, width: int, param,
                      acc: torch.dtype) -> List[tuple]:
    """``draw_device``'s tables from one Triton launch (kernels/dsa_rng.py), ready for the kernels:
    (iparams int32, fparams in ``acc``) per stage."""
    from ..kernels.dsa_rng import dsa_draw

    device = groups.device
    keys = device_keys(seeds, device)
    pick = param.aug_mode != "M"
    codes = _device_constant([FAMILIES.index(f) for f in families], torch.int32, device)
    r = param.ratio_scale
    cfg = _device_constant([param.brightness, param.saturation, param.contrast, param.prob_flip, r - 1 / r, 1 / r,
                            param.ratio_rotate, math.pi], torch.float64, device)
    n_stages = 1 if pick else len(families)
    shifts = (_pixels(height, param.ratio_crop_pad), _pixels(width, param.ratio_crop_pad))
    sizes = (_pixels(height, param.ratio_cutout), _pixels(width, param.ratio_cutout))
    ip, fp = dsa_draw(groups.long().contiguous(), keys.contiguous(), codes, cfg, n_stages, pick, height, width,
                      shifts, sizes, acc)
    return [(ip[k], fp[k]) for k in range(n_stages)]


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

_BASE_GRIDS: dict = {}  # (H, W, align_corners, dtype, device) -> base grid on the device


def base_grid(height: int, width: int, align_corners: bool, dtype, device) -> torch.Tensor:
    """affine_grid's normalised pixel coordinates (x along W, then y along H), computed with the
    same torch ops as ``affine_grid`` (on the CPU, as the reference builds its grid) so the kernels
    sample where the reference samples. Cached per shape and device: after the first call no
    host-to-device copy (read-only for the kernels)."""
    key = (height, width, bool(align_corners), dtype, torch.device(device))
    if torch.compiler.is_compiling():
        return _base_grid(height, width, align_corners, dtype, device)
    if key not in _BASE_GRIDS:
        if len(_BASE_GRIDS) > 64:
            _BASE_GRIDS.clear()
        _BASE_GRIDS[key] = _base_grid(height, width, align_corners, dtype, device)
    return _BASE_GRIDS[key]


def _base_grid(height, width, align_corners, dtype, device) -> torch.Tensor:
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
    fwd, bwd = _backend.op_pair(OP, which)
    backward = _make_backward(bwd)
    for ip, fp in stages:
        # host tables (the reference stream's) are converted on the host and copied asynchronously
        ip_dev = _to_device(ip.to(torch.int32).contiguous(), x.device)
        fp_dev = _to_device(fp.to(acc).contiguous(), x.device)
        x = _backend.call_registered(fwd, _setup_context, backward, x.contiguous(), ip_dev, fp_dev, base,
                                     bool(align_corners))
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
        if s < -1 or s >= 2 ** 63:
            raise ValueError(f"seeds must be -1 (independent per-image draws) or in [0, 2**63), got {s}")
        out.append(int(s))
    if not out:
        raise ValueError("seeds is empty: give one seed per group")
    return out


def dsa_augment(x: torch.Tensor, groups: Optional[torch.Tensor], strategy: str, seeds, *,
                align_corners: bool = False, param=None, backend: str = "auto", rng: str = "device") -> torch.Tensor:
    """DSA on many groups in one call: images with group id g get ``DiffAugment(·, strategy, seeds[g])``.

    x: (N, C, H, W) float images. groups: (N,) integer group ids in [0, len(seeds)) (None: one
    group). seeds: one int per group (−1: independent per-image draws from torch's global CPU
    generator). align_corners: False as DatasetCondensation (modern torch), True as
    mtt-distillation. param: a ``ParamDiffAug`` (default settings if None). rng: "device"
    (default: Philox draws on x's device from (seed, group, draw index): no host sync, no host
    work per image; same distributions as the reference, not its stream; seed −1 groups use a key
    drawn per call from torch's global CPU generator), "reference" (the reference's generator
    calls per group: equal to the per-group DiffAugment calls, and leaves torch's generators where
    they leave them; see the module doc; what the ``ddfast.compat`` drop-ins use) or "fast" (one
    CPU generator call for all groups). With "reference" or "fast", groups on a GPU are read on
    the host once per tensor and version: write new ids in place through torch ops (which bump the
    version) or pass a new tensor, not through ``.data`` or a raw pointer.
    Differentiable w.r.t. x in every backend.
    """
    _check_images(x)
    param = ParamDiffAug() if param is None else param
    families = parse_strategy(strategy, param)
    seeds = _check_seeds(seeds)
    check_choice("rng", rng, RNG_MODES)
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {type(align_corners).__name__}")
    n = x.shape[0]
    if groups is None:
        groups = torch.zeros(n, dtype=torch.int64, device=x.device if rng == "device" else "cpu")
    elif isinstance(groups, torch.Tensor) and rng != "device":
        # the draws are made on the CPU: one transfer serves the check and the draws, and a loop
        # that passes the same groups tensor every step reads it once (host_copy)
        groups = host_copy(groups)
    check_labels("groups", groups, n, len(seeds))
    if not families:
        return x
    which = _backend.resolve(OP, backend, x.device)
    if rng == "device":
        if groups.device != x.device:
            raise ValueError(f"groups must be on x's device ({x.device}) with rng='device', got {groups.device}")
        if which == "triton" or (x.is_cuda and which != "torch" and _backend.available(OP, "triton", x.device)):
            # one launch for the whole table (same numbers as draw_device's torch ops)
            stages = draw_device_fused(families, seeds, groups, x.shape[2], x.shape[3], param, acc_dtype(x.dtype))
        else:
            stages = draw_device(families, seeds, groups, x.shape[2], x.shape[3], param)
    else:
        stages = draw_grouped(families, seeds, groups, x.shape[2], x.shape[3], param, x.dtype, rng, x.device)
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
    stream = SeedStream(seed, cpu_draws=x.device.type == "cpu")
    stages = draw_stages(families, stream, x.shape[0], x.shape[2], x.shape[3], param, x.dtype, x.device,
                         siamese=seed != -1)
    stream.finish()
    stages = [(ip.expand(x.shape[0], -1), fp.expand(x.shape[0], -1)) for ip, fp in stages]
    param.latestseed = stream.latest
    return apply_stages(x, stages, align_corners, which).contiguous()
