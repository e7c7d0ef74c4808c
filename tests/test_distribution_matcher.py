"""DistributionMatcher against DM's per-class loop (main_DM.py): loss and image gradients."""
import importlib.util

import pytest
import torch
from torch import nn

import ddfast
from ddfast.ops.distribution_matcher import dm_reference_loop

from conftest import require_backend

OP = "class_mean_loss"
STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _has(module):
    return importlib.util.find_spec(module) is not None


def _convnet_embed(channels=3, width=8, depth=2, dtype=torch.float64, device="cpu"):
    """DC's ConvNet feature extractor: (conv3x3 → instance norm (GroupNorm(w, w)) → ReLU → AvgPool2) × depth."""
    torch.manual_seed(0)
    layers, c = [], channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                   nn.AvgPool2d(2)]
        c = width
    net = nn.Sequential(*layers, nn.Flatten()).to(device=device, dtype=dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _data(num_classes, n_real, ipc, device, dtype=torch.float64, size=8):
    g = torch.Generator().manual_seed(1)
    x_real = torch.randn(num_classes * n_real, 3, size, size, generator=g, dtype=dtype).to(device)
    y_real = torch.arange(num_classes).repeat(n_real)[torch.randperm(num_classes * n_real, generator=g)].to(device)
    x_syn = torch.randn(num_classes * ipc, 3, size, size, generator=g, dtype=dtype).to(device)
    y_syn = torch.arange(num_classes).repeat_interleave(ipc).to(device)  # DM's layout [0,0,..,1,1,..]
    return x_real, y_real, x_syn, y_syn


def _run(fn, x_syn):
    x = x_syn.detach().clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_reference_loop(device, backend_kind, dtype):
    backend = require_backend(OP, backend_kind, device)
    embed = _convnet_embed(dtype=dtype, device=device)
    x_real, y_real, x_syn, y_syn = _data(4, 6, 2, device, dtype)
    matcher = ddfast.DistributionMatcher(embed, 4, backend=backend)
    got, g_got = _run(lambda x: matcher(x_real, y_real, x, y_syn), x_syn)
    want, g_want = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x, y_syn, 4), x_syn)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=rtol, atol=rtol * g_want.abs().max().item())


def test_missing_class_and_single_syn_samples(device):
    embed = _convnet_embed(device=device)
    x_real, y_real, x_syn, _ = _data(3, 4, 2, device)
    y_syn = torch.tensor([0, 2, 2, 0, 0, 2], device=device)  # class 1 has no syn images
    matcher = ddfast.DistributionMatcher(embed)
    got, g_got = _run(lambda x: matcher(x_real, y_real, x[:5], y_syn[:5]), x_syn)
    want, g_want = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x[:5], y_syn[:5], 3), x_syn)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 7, 24])
def test_chunked_real_side_equals_reference_loop(device, chunk):
    embed = _convnet_embed(device=device)
    x_real, y_real, x_syn, y_syn = _data(4, 6, 2, device)
    y_real = y_real.clone()
    y_real[y_real == 3] = 0  # class 3 has synthetic images only: skipped, as in the loop
    matcher = ddfast.DistributionMatcher(embed, 4, real_chunk_size=chunk)
    got, g_got = _run(lambda x: matcher(x_real, y_real, x, y_syn), x_syn)
    want, g_want = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x, y_syn, 4), x_syn)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_chunking_options_are_validated():
    embed = _convnet_embed()
    with pytest.raises(ValueError, match="real_chunk_size"):
        ddfast.DistributionMatcher(embed, real_chunk_size=0)
    with pytest.raises(ValueError, match="real_chunk_size"):
        ddfast.DistributionMatcher(embed, real_chunk_size=8, loss="mmd")


@pytest.mark.skipif(not (_has("ddfast.ops.dsa") and _has("ddfast.compat._dc_dsa")), reason="dsa_augment not present")
def test_dsa_equals_reference_loop_with_per_class_seeds():
    from ddfast.compat.dc import DiffAugment, ParamDiffAug

    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(3, 4, 2, "cpu", size=8)
    seeds = [123, 4567, 89]
    matcher = ddfast.DistributionMatcher(embed, 3, dsa_strategy=STRATEGY, dsa_param=ParamDiffAug())
    got, g_got = _run(lambda x: matcher(x_real, y_real, x, y_syn, seeds=seeds), x_syn)

    def augment(images, seed):
        return DiffAugment(images, STRATEGY, seed=seed, param=ParamDiffAug())

    want, g_want = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x, y_syn, 3, augment, seeds), x_syn)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    # a seed generator gives the same, deterministically
    seeded = ddfast.DistributionMatcher(embed, 3, dsa_strategy=STRATEGY, seed_fn=lambda c: seeds)
    torch.testing.assert_close(seeded(x_real, y_real, x_syn, y_syn), got, rtol=1e-12, atol=0)


@pytest.mark.skipif(not _has("ddfast.ops.mmd"), reason="ddfast.mmd not present")
def test_linear_mmd_equals_class_mean_loss():
    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(3, 5, 2, "cpu")
    mean_loss = ddfast.DistributionMatcher(embed, 3)(x_real, y_real, x_syn, y_syn)
    mmd_loss = ddfast.DistributionMatcher(embed, 3, loss="mmd", mmd_kwargs={"kernel": "linear"})(
        x_real, y_real, x_syn, y_syn)
    torch.testing.assert_close(mmd_loss, mean_loss, rtol=1e-8, atol=1e-10)


def test_bad_input():
    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(2, 3, 1, "cpu")
    matcher = ddfast.DistributionMatcher(embed, 2)
    with pytest.raises(TypeError, match="y_real"):
        matcher(x_real, y_real.double(), x_syn, y_syn)
    with pytest.raises(ValueError, match="y_syn"):
        matcher(x_real, y_real, x_syn, y_syn + 2)
    with pytest.raises(ValueError, match="y_syn"):
        matcher(x_real, y_real, x_syn, y_syn[:1])
    with pytest.raises(TypeError, match="x_syn"):
        matcher(x_real, y_real, x_syn.long(), y_syn)
    with pytest.raises(ValueError, match="loss"):
        ddfast.DistributionMatcher(embed, loss="kl")
    with pytest.raises(TypeError, match="embed"):
        ddfast.DistributionMatcher("net")
    if _has("ddfast.ops.dsa"):
        with pytest.raises(ValueError, match="seeds"):
            ddfast.DistributionMatcher(embed, 2, dsa_strategy=STRATEGY)(x_real, y_real, x_syn, y_syn, seeds=[1])
