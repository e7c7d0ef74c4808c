"""GradientMatcher: equality with DC's class loop (loss and x_syn.grad), DC outer iterations, compat."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddfast
from ddfast.ops.gradient_matcher import ConvNet, GradientMatcher, class_loop_reference

from conftest import require_backend

METRICS = ["ours", "mse", "cos"]
STRATEGIES = ["segmented", "vmap", "loop"]


def _data(num_classes, real_per_class, syn_per_class, shape, dtype, device, seed=0, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    y_real = torch.arange(num_classes).repeat_interleave(real_per_class)
    y_syn = torch.arange(num_classes).repeat_interleave(syn_per_class)
    if shuffle:
        y_real = y_real[torch.randperm(len(y_real), generator=g)]
        y_syn = y_syn[torch.randperm(len(y_syn), generator=g)]
    x_real = torch.randn((len(y_real),) + shape, generator=g, dtype=dtype)
    x_syn = torch.randn((len(y_syn),) + shape, generator=g, dtype=dtype)
    return (x_real.to(device), y_real.to(device), x_syn.to(device).requires_grad_(True), y_syn.to(device))


def _both(model, x_real, y_real, x_syn, y_syn, metric, **kw):
    """(reference loss, reference grad, matcher loss, matcher grad)."""
    ref = class_loop_reference(model, x_real, y_real, x_syn, y_syn, metric)
    (ref_grad,) = torch.autograd.grad(ref, x_syn)
    got = GradientMatcher(model, metric, **kw)(x_real, y_real, x_syn, y_syn)
    (got_grad,) = torch.autograd.grad(got, x_syn)
    return ref, ref_grad, got, got_grad


def _rel_l2(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _net(dtype, device, seed=0, **kw):
    torch.manual_seed(seed)
    return ConvNet(**kw).to(device=device, dtype=dtype)


# --- float64: tight equality with the loop -------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("config", [
    dict(channel=3, width=8, depth=2, norm="instancenorm", im_size=8),
    dict(channel=1, width=16, depth=1, norm="groupnorm", im_size=6),
    dict(channel=3, width=4, depth=3, norm="none", im_size=8),
])
def test_convnet_float64_matches_loop(device, metric, strategy, config):
    model = _net(torch.float64, device, num_classes=3, **config)
    shape = (config["channel"], config["im_size"], config["im_size"])
    data = _data(3, 5, 2, shape, torch.float64, device, shuffle=True)
    ref, ref_grad, got, got_grad = _both(model, *data, metric, strategy=strategy)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_width_128_depth_3_float64(device, strategy):
    model = _net(torch.float64, device, channel=3, num_classes=2, width=128, depth=3, im_size=8)
    data = _data(2, 3, 1, (3, 8, 8), torch.float64, device)
    ref, ref_grad, got, got_grad = _both(model, *data, "ours", strategy=strategy)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend_kind", ["torch", "triton", "compiled"])
def test_distance_backends(device, backend_kind):
    backend = require_backend("gradient_match", backend_kind, device)
    model = _net(torch.float64, device, channel=3, num_classes=3, width=8, depth=2, im_size=8)
    data = _data(3, 4, 2, (3, 8, 8), torch.float64, device, shuffle=True)
    ref, ref_grad, got, got_grad = _both(model, *data, "ours", backend=backend)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-8, atol=1e-10)


# --- float32: loss tight-ish, image gradient loose (ill-conditioned with "ours", SPEC 3.1) --------

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_convnet_float32(device, metric, strategy):
    model = _net(torch.float32, device, channel=3, num_classes=4, width=16, depth=2, im_size=8)
    data = _data(4, 6, 2, (3, 8, 8), torch.float32, device, shuffle=True)
    ref, ref_grad, got, got_grad = _both(model, *data, metric, strategy=strategy)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert _rel_l2(got_grad, ref_grad) < 5e-2


# --- label layouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unequal_counts_and_missing_classes(device, strategy):
    model = _net(torch.float64, device, channel=3, num_classes=5, width=8, depth=2, im_size=8)
    g = torch.Generator().manual_seed(1)
    # class 4 has no real images, class 3 no synthetic ones; counts differ per class
    y_real = torch.tensor([0, 2, 1, 0, 3, 2, 2, 0, 1, 3, 0, 2, 2])
    y_syn = torch.tensor([1, 4, 0, 2, 1, 1, 0])
    x_real = torch.randn(len(y_real), 3, 8, 8, generator=g, dtype=torch.float64).to(device)
    x_syn = torch.randn(len(y_syn), 3, 8, 8, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    ref, ref_grad, got, got_grad = _both(model, x_real, y_real.to(device), x_syn, y_syn.to(device), "ours",
                                         strategy=strategy)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-8, atol=1e-10)
    assert torch.all(got_grad[1] == 0)  # the class-4 image matches no real class: skipped


def test_single_sample_per_class(device):
    model = _net(torch.float64, device, channel=1, num_classes=2, width=4, depth=1, im_size=4)
    data = _data(2, 1, 1, (1, 4, 4), torch.float64, device)
    ref, ref_grad, got, got_grad = _both(model, *data, "ours")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-8, atol=1e-10)


def test_no_common_class_is_zero(device):
    model = _net(torch.float64, device, channel=1, num_classes=3, width=4, depth=1, im_size=4)
    x_real = torch.randn(2, 1, 4, 4, dtype=torch.float64, device=device)
    x_syn = torch.randn(2, 1, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
    y_real = torch.tensor([0, 0], device=device)
    y_syn = torch.tensor([1, 2], device=device)
    loss = GradientMatcher(model)(x_real, y_real, x_syn, y_syn)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x_syn.grad == 0)


def test_non_contiguous_inputs(device):
    model = _net(torch.float64, device, channel=3, num_classes=2, width=4, depth=1, im_size=6)
    x_real, y_real, x_syn, y_syn = _data(2, 3, 2, (6, 6, 3), torch.float64, device)
    x_real = x_real.permute(0, 3, 1, 2)
    x_syn = x_syn.permute(0, 3, 1, 2)
    ref, ref_grad, got, got_grad = _both(model, x_real, y_real, x_syn, y_syn, "ours")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-8, atol=1e-10)


def test_model_parameters_get_no_grad(device):
    model = _net(torch.float64, device, channel=1, num_classes=2, width=4, depth=1, im_size=4)
    data = _data(2, 2, 1, (1, 4, 4), torch.float64, device)
    for strategy in STRATEGIES:
        GradientMatcher(model, strategy=strategy)(*data).backward()
        assert all(p.grad is None for p in model.parameters())


# --- modules other than ConvNet (general path) ----------------------------------------------------

class _MLP(nn.Module):
    def __init__(self, inputs, classes):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(inputs, 12), nn.Linear(12, classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


class _ResBlockNet(nn.Module):
    def __init__(self, channel, classes):
        super().__init__()
        self.stem = nn.Conv2d(channel, 6, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.norm(self.conv(h)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("make", [lambda: _MLP(2 * 5 * 5, 3), lambda: _ResBlockNet(2, 3)], ids=["mlp", "resblock"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_general_modules_float64(device, make, metric, strategy):
    torch.manual_seed(0)
    model = make().to(device=device, dtype=torch.float64)
    data = _data(3, 4, 2, (2, 5, 5), torch.float64, device, shuffle=True)
    if strategy == "segmented" and isinstance(model, _ResBlockNet):  # a residual add: not a chain of layers
        with pytest.raises(ValueError, match="segmented.*custom forward"):
            GradientMatcher(model, metric, strategy=strategy)(*data)
        return
    ref, ref_grad, got, got_grad = _both(model, *data, metric, strategy=strategy)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-8, atol=1e-10)


def test_frozen_parameters_are_left_out(device):
    model = _net(torch.float64, device, channel=1, num_classes=2, width=4, depth=2, im_size=4)
    model.features[0].weight.requires_grad_(False)
    data = _data(2, 3, 2, (1, 4, 4), torch.float64, device)
    ref, ref_grad, got, got_grad = _both(model, *data, "ours")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batchnorm_follows_dc(device, strategy):
    """DC main.py: running stats from 16 real images per class in train mode, then BN in eval."""
    model = _net(torch.float64, device, channel=3, num_classes=3, width=4, depth=2, norm="batchnorm", im_size=8)
    reference = _net(torch.float64, device, channel=3, num_classes=3, width=4, depth=2, norm="batchnorm", im_size=8)
    x_real, y_real, x_syn, y_syn = _data(3, 20, 2, (3, 8, 8), torch.float64, device, shuffle=True)
    reference.train()
    reference(torch.cat([x_real[y_real == c][:16] for c in range(3)]))
    reference.features[1].eval()
    reference.features[5].eval()
    ref = class_loop_reference(reference, x_real, y_real, x_syn, y_syn)
    (ref_grad,) = torch.autograd.grad(ref, x_syn)
    got = GradientMatcher(model, strategy=strategy)(x_real, y_real, x_syn, y_syn)
    (got_grad,) = torch.autograd.grad(got, x_syn)
    assert not model.features[1].training
    torch.testing.assert_close(model.features[1].running_mean, reference.features[1].running_mean)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-8, atol=1e-10)


# --- a few outer iterations of DC give the same synthetic images ------------------------------------

def _dc_run(device, loss_fn, iterations=2, outer_loop=3, seed=0):
    torch.manual_seed(seed)
    num_classes, ipc = 3, 2
    net = ConvNet(1, num_classes, width=6, depth=2, im_size=8).to(device=device, dtype=torch.float64)
    images_all = torch.randn(num_classes * 7, 1, 8, 8, dtype=torch.float64).to(device)
    labels_all = torch.arange(num_classes).repeat(7).to(device)
    image_syn = torch.randn(num_classes * ipc, 1, 8, 8, dtype=torch.float64).to(device).requires_grad_(True)
    label_syn = torch.arange(num_classes).repeat_interleave(ipc).to(device)
    opt_img = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
    initial = image_syn.detach().clone()
    g = torch.Generator().manual_seed(seed)

    def get_images(c, n):
        idx = torch.nonzero(labels_all == c).flatten().cpu()
        return images_all[idx[torch.randperm(len(idx), generator=g)][:n].to(device)]

    args = SimpleNamespace(batch_real=5, dis_metric="ours", dsa=False, device=device)
    for _ in range(iterations):
        opt_net = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)
        for ol in range(outer_loop):
            loss = loss_fn(net, get_images, image_syn, label_syn, args)
            opt_img.zero_grad()
            loss.backward()
            opt_img.step()
            if ol == outer_loop - 1:
                break
            opt_net.zero_grad()
            F.cross_entropy(net(image_syn.detach()), label_syn).backward()
            opt_net.step()
    return initial, image_syn.detach()


def _loop_loss(net, get_images, image_syn, label_syn, args):
    classes = torch.unique(label_syn).tolist()
    real = [get_images(c, args.batch_real) for c in classes]
    y_real = torch.cat([torch.full((len(r),), c, device=image_syn.device) for c, r in zip(classes, real)])
    return class_loop_reference(net, torch.cat(real), y_real, image_syn, label_syn, args.dis_metric)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dc_outer_iterations_same_images(device, strategy):
    from ddfast.compat.dc import dc_class_loop_loss

    initial, want = _dc_run(device, _loop_loss)
    _, got = _dc_run(device, lambda *a: dc_class_loop_loss(*a, strategy=strategy))
    assert (want - initial).abs().max() > 1e-3  # the images did move
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_compat_dsa_equals_per_class_diffaugment_loop(device):
    """One grouped dsa_augment call per side == DC's two DiffAugment calls per class (same seeds)."""
    from ddfast.compat import dc

    model = _net(torch.float64, device, channel=3, num_classes=3, width=4, depth=1, im_size=8)
    x_real, y_real, x_syn, y_syn = _data(3, 4, 2, (3, 8, 8), torch.float64, device, shuffle=True)
    strategy, param, seeds = "color_crop_cutout_flip_scale_rotate", dc.ParamDiffAug(), [11, 2024, 77]
    args = SimpleNamespace(batch_real=3, dis_metric="ours", dsa=True, dsa_strategy=strategy, dsa_param=param)
    get_images = lambda c, n: x_real[y_real == c][:n]  # noqa: E731
    loss = dc.dc_class_loop_loss(model, get_images, x_syn, y_syn, args, seeds=seeds)
    loss.backward()
    got = x_syn.grad.clone()
    x_syn.grad = None
    want = x_syn.new_zeros(())
    for c, seed in zip(range(3), seeds):
        img_real = dc.DiffAugment(get_images(c, 3), strategy, seed=seed, param=param)
        img_syn = dc.DiffAugment(x_syn[y_syn == c], strategy, seed=seed, param=param)
        y_r = torch.full((len(img_real),), c, device=device)
        y_s = torch.full((len(img_syn),), c, device=device)
        want = want + class_loop_reference(model, img_real, y_r, img_syn, y_s, "ours")
    want.backward()
    if device == "cpu":  # the draws are the reference's stream only on CPU
        torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got, x_syn.grad, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="seeds"):
        dc.dc_class_loop_loss(model, get_images, x_syn, y_syn, args, seeds=[1])


# --- bad input --------------------------------------------------------------------------------------

def test_bad_input():
    model = ConvNet(1, 2, width=4, depth=1, im_size=4)
    x = torch.randn(4, 1, 4, 4)
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(TypeError, match="model"):
        GradientMatcher("net")
    with pytest.raises(ValueError, match="metric"):
        GradientMatcher(model, metric="l2")
    with pytest.raises(ValueError, match="strategy"):
        GradientMatcher(model, strategy="fast")
    with pytest.raises(ValueError, match="real_chunk_size"):
        GradientMatcher(model, real_chunk_size=0)
    with pytest.raises(ValueError, match="eps"):
        GradientMatcher(model, eps=-1.0)
    m = GradientMatcher(model)
    with pytest.raises(TypeError, match="y_real"):
        m(x, y.float(), x, y)
    with pytest.raises(TypeError, match="x_syn"):
        m(x, y, x.long(), y)
    with pytest.raises(ValueError, match="y_syn"):
        m(x, y, x, y[:3])
    with pytest.raises(ValueError, match="x_real"):
        m(torch.empty(0, 1, 4, 4), y[:0], x, y)
    with pytest.raises(ValueError, match="per-sample shape"):
        m(x, y, torch.randn(4, 1, 5, 5), y)
    with pytest.raises(TypeError, match="dtype"):
        m(x, y, x.double(), y)
    with pytest.raises(ValueError, match="y_real"):
        m(x, torch.tensor([0, -1, 0, 1]), x, y)
    with pytest.raises(ValueError, match="x_syn"):
        m(x, y, torch.full_like(x, float("nan")), y)


def test_public_name():
    assert ddfast.GradientMatcher is GradientMatcher
