"""ddfast.compat.dc / mtt DiffAugment against a transcription of the reference semantics.

``_reference_diff_augment`` (``bench/dc_diffaugment.py``) restates DatasetCondensation's utils.py
DiffAugment (and mtt-distillation's, with align_corners=True) op by op: the same generator calls in the same
order, torch's global generators re-seeded with seed, seed+1, … before every draw, element 0
of each draw broadcast when seed != −1. On CPU the compat shim must give the same random
parameters bit for bit (so equal outputs), the same param side effects and the same global
generator state afterwards.
"""
import pytest
import torch
import torch.nn.functional as F

from ddfast.compat import dc, mtt
from ddfast.ops import dsa

from ddfast.bench.dc_diffaugment import dc_diff_augment as _reference_diff_augment

from conftest import assert_close_fp32, require_backend

OP = "dsa"
STRATEGY = "color_crop_cutout_flip_scale_rotate"


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
    if module is dc and strategy not in ("", "none", "None"):  # DC names the flag Siamese
        assert p_new.Siamese == (seed != -1)
    if exact:
        assert torch.equal(got, want), f"{strategy} seed={seed}: max diff {(got - want).abs().max()}"
    else:  # the same draws applied in float64
        torch.manual_seed(1234)
        stages = dsa.draw_stages(dsa.parse_strategy(strategy, p_ref), dsa.SeedStream(seed), x.shape[0], x.shape[2],
                                 x.shape[3], p_ref, x.dtype, x.device, siamese=seed != -1)
        stages = [(ip.expand(x.shape[0], -1), fp.expand(x.shape[0], -1)) for ip, fp in stages]
        assert_close_fp32(got, want, x.device, exact=dsa.apply_stages(x.double(), stages, align, "torch"))
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


# --- DC main.py outer iterations with DSA: the drop-in reproduces the run ---------------------------

def _dc_dsa_run(loss_fn, dtype, ipc=2, iterations=2, outer_loop=2, perturb=0.0):
    """DC main.py with DSA on a tiny problem: per outer step the class-loop loss (``loss_fn``), the
    image update, then the inner net update on the synthetic set shuffled by torch's global
    generator and augmented with ``DiffAugment(seed=-1)`` as DC's ``epoch(aug=True)`` does, so the
    global generator state every class loop leaves behind feeds the rest of the run."""
    from types import SimpleNamespace

    from ddfast.ops.gradient_matcher import ConvNet

    torch.manual_seed(0)
    num_classes = 3
    images_all = torch.randn(num_classes * 6, 3, 12, 12, dtype=dtype)
    labels_all = torch.arange(num_classes).repeat(6)
    image_syn = (torch.randn(num_classes * ipc, 3, 12, 12, dtype=dtype) * (1 + perturb)).requires_grad_(True)
    label_syn = torch.arange(num_classes).repeat_interleave(ipc)
    initial = image_syn.detach().clone()
    opt_img = torch.optim.SGD([image_syn], lr=0.5, momentum=0.5)
    picker = torch.Generator().manual_seed(1)  # DC's get_images uses numpy: not torch's global generator

    def get_images(c, n):
        idx = torch.nonzero(labels_all == c).flatten()
        return images_all[idx[torch.randperm(len(idx), generator=picker)][:n]]

    param = dc.ParamDiffAug()
    args = SimpleNamespace(batch_real=4, dis_metric="ours", dsa=True, dsa_strategy=STRATEGY, dsa_param=param)
    clock = iter(range(100, 100000, 7919))  # stands for DC's clock seeds, the same in both runs
    for _ in range(iterations):
        net = ConvNet(3, num_classes, width=6, depth=2, im_size=12).to(dtype)
        opt_net = torch.optim.SGD(net.parameters(), lr=0.05)
        for ol in range(outer_loop):
            seeds = [next(clock) for _ in range(num_classes)]
            loss = loss_fn(net, get_images, image_syn, label_syn, args, seeds)
            opt_img.zero_grad()
            loss.backward()
            opt_img.step()
            if ol == outer_loop - 1:
                break
            order = torch.randperm(len(label_syn))  # DataLoader(shuffle=True)
            for start in range(0, len(order), 4):
                idx = order[start:start + 4]
                img = _reference_diff_augment(image_syn.detach()[idx], STRATEGY, -1, param, False)
                opt_net.zero_grad()
                F.cross_entropy(net(img), label_syn[idx]).backward()
                opt_net.step()
    return initial, image_syn.detach(), torch.random.get_rng_state()


def _dc_reference_class_loop(net, get_images, image_syn, label_syn, args, seeds):
    """DC main.py's class loop: two DiffAugment calls per class with the class's seed."""
    from ddfast.ops.gradient_matcher import class_loop_reference

    loss = image_syn.new_zeros(())
    for c, seed in enumerate(seeds):
        img_real = get_images(c, args.batch_real)
        img_syn = image_syn[label_syn == c]
        img_real = _reference_diff_augment(img_real, args.dsa_strategy, seed, args.dsa_param, False)
        img_syn = _reference_diff_augment(img_syn, args.dsa_strategy, seed, args.dsa_param, False)
        y_r = torch.full((len(img_real),), c)
        y_s = torch.full((len(img_syn),), c)
        loss = loss + class_loop_reference(net, img_real, y_r, img_syn, y_s, args.dis_metric)
    return loss


def _dc_dropin(net, get_images, image_syn, label_syn, args, seeds):
    return dc.dc_class_loop_loss(net, get_images, image_syn, label_syn, args, seeds=seeds)


def _rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def test_dc_outer_iterations_with_dsa_reproduce_the_run_float64():
    initial, want, state_want = _dc_dsa_run(_dc_reference_class_loop, torch.float64)
    _, got, state_got = _dc_dsa_run(_dc_dropin, torch.float64)
    assert (want - initial).abs().max() > 1e-2  # the images did move
    assert torch.equal(state_got, state_want)  # the generator state the run goes on with
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("ipc", [1, 3])
def test_dc_outer_iterations_with_dsa_fp32_within_reference_sensitivity(ipc):
    """fp32: the drop-in's images differ from DC's run by no more than DC's own run differs from
    itself when its initial images change by one part in 1e7 (its sensitivity to fp32 rounding)."""
    initial, want, _ = _dc_dsa_run(_dc_reference_class_loop, torch.float32, ipc=ipc)
    _, nudged, _ = _dc_dsa_run(_dc_reference_class_loop, torch.float32, ipc=ipc, perturb=1e-7)
    _, got, _ = _dc_dsa_run(_dc_dropin, torch.float32, ipc=ipc)
    sensitivity = _rel_l2(nudged, want)
    assert _rel_l2(want, initial) > 1e-3
    assert _rel_l2(got, want) <= 2 * sensitivity
