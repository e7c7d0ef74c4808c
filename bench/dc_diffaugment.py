"""DatasetCondensation's utils.py ``DiffAugment``, restated op by op: the reference the DSA and DM
benchmarks time and the compat tests check against (what a DC user's run executes).

The same generator calls in the same order: torch's global generators re-seeded through
``torch.random.manual_seed`` with seed, seed+1, … before every draw (``set_seed_DiffAug``), element
0 of each draw broadcast to the batch when seed != −1, scale and rotate drawn on the CPU and the
rest on the images' device, theta built element by element, the crop and cutout index grids.
mtt-distillation's differs only in ``align_corners=True``.
"""
import math

import torch
import torch.nn.functional as F


def dc_diff_augment(x, strategy, seed, param, align_corners=False):
    """DC's ``DiffAugment(x, strategy, seed, param)`` restated op by op (``align_corners=True``:
    mtt-distillation's). See the module doc."""
    param.batchmode = seed != -1
    param.latestseed = seed
    if strategy in ("None", "none") or not strategy:
        return x

    def reseed():
        if param.latestseed != -1:
            torch.random.manual_seed(param.latestseed)
            param.latestseed += 1

    def same_for_batch(t):
        if param.batchmode:
            t[:] = t[0].clone()  # the reference writes t[0] in place, which torch refuses for n == 1
        return t

    n, _, h, w = x.shape

    def sample(x, theta):
        theta = same_for_batch(torch.tensor(theta, dtype=torch.float))
        if x.dtype == torch.float64:  # the reference's float32 grid cannot sample float64 images
            theta = theta.double()
        grid = F.affine_grid(theta, x.shape, align_corners=align_corners).to(x.device)
        return F.grid_sample(x, grid, align_corners=align_corners)

    def scale(x):
        r = param.ratio_scale
        reseed()
        sx = torch.rand(n) * (r - 1.0 / r) + 1.0 / r
        reseed()
        sy = torch.rand(n) * (r - 1.0 / r) + 1.0 / r
        return sample(x, [[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(n)])

    def rotate(x):
        reseed()
        a = (torch.rand(n) - 0.5) * 2 * param.ratio_rotate / 180 * float(math.pi)
        return sample(x, [[[torch.cos(a[i]), torch.sin(-a[i]), 0], [torch.sin(a[i]), torch.cos(a[i]), 0]]
                          for i in range(n)])

    def flip(x):
        reseed()
        r = same_for_batch(torch.rand(n, 1, 1, 1, device=x.device))
        return torch.where(r < param.prob_flip, x.flip(3), x)

    def brightness(x):
        reseed()
        r = same_for_batch(torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device))
        return x + (r - 0.5) * param.brightness

    def saturation(x):
        m = x.mean(dim=1, keepdim=True)
        reseed()
        r = same_for_batch(torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device))
        return (x - m) * (r * param.saturation) + m

    def contrast(x):
        m = x.mean(dim=[1, 2, 3], keepdim=True)
        reseed()
        r = same_for_batch(torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device))
        return (x - m) * (r + param.contrast) + m

    def crop(x):
        ph, pw = int(h * param.ratio_crop_pad + 0.5), int(w * param.ratio_crop_pad + 0.5)
        reseed()
        th = torch.randint(-ph, ph + 1, size=[n, 1, 1], device=x.device)
        reseed()
        tw = torch.randint(-pw, pw + 1, size=[n, 1, 1], device=x.device)
        th, tw = same_for_batch(th), same_for_batch(tw)
        b, gi, gj = torch.meshgrid(*(torch.arange(k, device=x.device) for k in (n, h, w)), indexing="ij")
        gi = torch.clamp(gi + th + 1, 0, h + 1)
        gj = torch.clamp(gj + tw + 1, 0, w + 1)
        return F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1).contiguous()[b, gi, gj].permute(0, 3, 1, 2)

    def cutout(x):
        sh, sw = int(h * param.ratio_cutout + 0.5), int(w * param.ratio_cutout + 0.5)
        reseed()
        oh = torch.randint(0, h + (1 - sh % 2), size=[n, 1, 1], device=x.device)
        reseed()
        ow = torch.randint(0, w + (1 - sw % 2), size=[n, 1, 1], device=x.device)
        oh, ow = same_for_batch(oh), same_for_batch(ow)
        b, gi, gj = torch.meshgrid(*(torch.arange(k, device=x.device) for k in (n, sh, sw)), indexing="ij")
        gi = torch.clamp(gi + oh - sh // 2, min=0, max=h - 1)
        gj = torch.clamp(gj + ow - sw // 2, min=0, max=w - 1)
        mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
        mask[b, gi, gj] = 0
        return x * mask.unsqueeze(1)

    fns = {"color": [brightness, saturation, contrast], "crop": [crop], "cutout": [cutout], "flip": [flip],
           "scale": [scale], "rotate": [rotate]}
    names = strategy.split("_")
    if param.aug_mode == "M":
        chosen = names
    else:
        reseed()
        chosen = [names[torch.randint(0, len(names), size=(1,)).item()]]
    for name in chosen:
        for f in fns[name]:
            x = f(x)
    return x.contiguous()
