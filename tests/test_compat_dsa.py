"""ddfast.compat.dc / mtt DiffAugment against a transcription of the reference semantics.

``_reference_diff_augment`` below restates DatasetCondensation's utils.py DiffAugment (and
mtt-distillation's, with align_corners=True) op by op: the same generator calls in the same
order, torch's global generators re-seeded with seed, seed+1, … before every draw, element 0
of each draw broadcast when seed != −1. On CPU the compat shim must give the same random
parameters bit for bit (so equal outputs), the same param side effects and the same global
generator state afterwards.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ddfast.compat import dc, mtt

from conftest import require_backend, tol

OP = "dsa"
STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _reference_diff_augment(x, strategy, seed, param, align_corners):
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
        b, gi, gj = torch.meshgrid(torch.arange(n), torch.arange(h), torch.arange(w), indexing="ij")
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
        b, gi, gj = torch.meshgrid(torch.arange(n), torch.arange(sh), torch.arange(sw), indexing="ij")
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


def _images(n, c=3, h=32, w=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=dtype)


def _compare(module, align, x, strategy, seed, mode="S", backend="torch", exact=True, **settings):
    p_ref, p_new = module.ParamDiffAug(), module.ParamDiffAug()
    for p in (p_ref, p_new):
        p.aug_mode = mode
        for k, v in settings.items():
            setattr(p, k, v)
    torch.manual_seed(1234)
    want = _reference_diff_augment(x, strategy, seed, p_ref, align)
    state_ref = torch.random.get_rng_state()
    torch.manual_seed(1234)
    got = module.DiffAugment(x, strategy, seed, p_new, backend=backend)
    assert torch.equal(torch.random.get_rng_state(), state_ref), "global generator state differs"
    assert (p_new.batchmode, p_new.latestseed) == (p_ref.batchmode, p_ref.latestseed)
    if exact:
        assert torch.equal(got, want), f"{strategy} seed={seed}: max diff {(got - want).abs().max()}"
    else:
        torch.testing.assert_close(got, want, **tol(x.device, x.dtype))
    return got


@pytest.mark.parametrize("module, align", [(dc, False), (mtt, True)])
@pytest.mark.parametrize("strategy", ["color", "crop", "cutout", "flip", "scale", "rotate", STRATEGY])
def test_every_op_many_seeds_bitwise(module, align, strategy):
    x = _images(4)
    for seed in range(0, 400, 37):
        _compare(module, align, x, strategy, seed)


@pytest.mark.parametrize("module, align", [(dc, False), (mtt, True)])
@pytest.mark.parametrize("mode", ["S", "M"])
def test_independent_draws_seed_minus_one(module, align, mode):
    x = _images(6)
    got = _compare(module, align, x, STRATEGY, -1, mode=mode)
    if mode == "M":  # every op on every image: identical inputs must come out different
        same = _images(1).expand(6, -1, -1, -1).contiguous()
        torch.manual_seed(3)
        out = module.DiffAugment(same, STRATEGY, -1, module.ParamDiffAug())
        assert not torch.equal(out[0], out[1]) and got.shape == x.shape


@pytest.mark.parametrize("module, align", [(dc, False), (mtt, True)])
@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (7, 3, 32, 32), (2, 3, 64, 64), (5, 3, 20, 33), (2, 1, 31, 16)])
def test_shapes_mode_m(module, align, shape):
    x = _images(*shape)
    for seed in (0, 99):
        _compare(module, align, x, STRATEGY, seed, mode="M")
        _compare(module, align, x, "rotate_crop_color_scale_flip_cutout", seed, mode="M")


@pytest.mark.parametrize("module, align", [(dc, False), (mtt, True)])
def test_large_batch(module, align):
    x = _images(300, h=16, w=16)
    _compare(module, align, x, STRATEGY, 2, mode="M")
    _compare(module, align, x, STRATEGY, -1, mode="M")


def test_custom_param_settings():
    x = _images(3, h=17, w=12)
    for settings in ({"ratio_cutout": 0.0}, {"ratio_cutout": 0.3, "ratio_crop_pad": 0.4},
                     {"ratio_cutout": 1.5}, {"prob_flip": 1.0, "ratio_scale": 2.0, "ratio_rotate": 90.0}):
        for seed in (0, 11):
            _compare(dc, False, x, STRATEGY, seed, mode="M", **settings)


def test_none_and_empty_strategy_return_input():
    x = _images(2)
    p = dc.ParamDiffAug()
    for strategy in ("None", "none", ""):
        assert dc.DiffAugment(x, strategy, 3, p) is x
        assert p.batchmode and p.latestseed == 3


@pytest.mark.parametrize("module, align", [(dc, False), (mtt, True)])
def test_fused_backends_match_reference(device, backend_kind, module, align):
    backend = require_backend(OP, backend_kind, device)
    small = backend_kind == "triton" and device == "cpu"
    x = _images(3 if small else 10, h=12 if small else 32, w=10 if small else 32).to(device)
    for seed in ((0, 4) if small else (0, 7, 19, 101)):
        for mode in ("S", "M"):
            _compare(module, align, x, STRATEGY, seed, mode=mode, backend=backend, exact=False)


def test_gradient_matches_reference():
    x = _images(5, h=16, w=16)
    for seed in (0, 3, 8):
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        p = dc.ParamDiffAug()
        p.aug_mode = "M"
        torch.manual_seed(0)
        (_reference_diff_augment(a, STRATEGY, seed, p, False) ** 2).sum().backward()
        (dc.DiffAugment(b, STRATEGY, seed, p, backend="cpp") ** 2).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)


def test_bad_input():
    x = _images(2)
    p = dc.ParamDiffAug()
    with pytest.raises(ValueError, match="strategy"):
        dc.DiffAugment(x, "color_noise", 0, p)
    with pytest.raises(TypeError, match="seed"):
        dc.DiffAugment(x, "color", 1.5, p)
    with pytest.raises(ValueError, match="x"):
        dc.DiffAugment(x[0], "color", 0, p)
    with pytest.raises(TypeError, match="x"):
        dc.DiffAugment(x.long(), "color", 0, p)
    p.aug_mode = "Q"
    with pytest.raises(ValueError, match="aug_mode"):
        dc.DiffAugment(x, "color", 0, p)
