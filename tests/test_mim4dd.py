"""MIM4DD add-on: hooks, projection heads, and equality with supcon_nce on hand-projected features."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddfast

from conftest import require_backend


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 8 * 8, 5)).double()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


LAYERS = ["1", "3"]
DIMS = [4 * 8 * 8, 6 * 8 * 8]


def test_hooks_collect_the_named_layers():
    net = _net()
    mim = ddfast.MIM4DD(net, LAYERS, DIMS)
    x, _ = _data(4, 0)
    feats = mim.syn_features(x)
    assert sorted(feats) == LAYERS
    torch.testing.assert_close(feats["1"], net[1](net[0](x)))
    torch.testing.assert_close(feats["3"], net[:4](x))
    net(x)  # hooks are idle outside loss(): nothing is kept
    assert mim._syn_tap.features == {}


@pytest.mark.parametrize("variant", ["infonce", "nce"])
def test_loss_equals_supcon_nce_on_projected_features(backend_kind, variant):
    backend = require_backend("supcon_nce", backend_kind, "cpu")
    syn_net, real_net = _net(0), _net(1)
    weights = [0.7, 1.3]
    mim = ddfast.MIM4DD(syn_net, LAYERS, DIMS, real_net=real_net, proj_dim=16, layer_weights=weights,
                        temperature=0.2, variant=variant, noise_ratio=2.0, backend=backend).double()
    x_syn, y_syn = _data(6, 2)
    x_real, y_real = _data(10, 3)
    got = mim.loss(x_syn, y_syn, x_real, y_real)
    want = 0.0
    for i, (lo, w) in enumerate(zip((2, 4), weights)):
        z_syn = F.normalize(mim.syn_heads[i](syn_net[:lo](x_syn).flatten(1)), dim=1)
        z_real = F.normalize(mim.real_heads[i](real_net[:lo](x_real).flatten(1)), dim=1)
        want = want + w * ddfast.supcon_nce(z_syn, y_syn, z_real, y_real, temperature=0.2, variant=variant,
                                            noise_ratio=2.0, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_loss_is_differentiable_to_x_syn_and_heads():
    net = _net()
    mim = ddfast.MIM4DD(net, LAYERS, DIMS, proj_dim=8).double()
    x_syn, y_syn = _data(5, 4)
    x_real, y_real = _data(9, 5)
    x_syn.requires_grad_(True)
    x_real.requires_grad_(True)
    loss = mim.loss(x_syn, y_syn, x_real, y_real)
    loss.backward()
    assert x_syn.grad is not None and x_syn.grad.abs().sum() > 0
    assert x_real.grad is None  # the real network runs without grad by default
    for head in list(mim.syn_heads) + list(mim.real_heads):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert {id(p) for p in mim.parameters()} == {id(p) for h in (*mim.syn_heads, *mim.real_heads)
                                                  for p in h.parameters()}


def test_gradcheck_through_the_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    mim = ddfast.MIM4DD(net, ["1", "2"], [5, 4], proj_dim=3).double()
    x_syn, x_real = torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    y_syn, y_real = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1, 3])
    x_syn.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mim.loss(x, y_syn, x_real, y_real), (x_syn,))


def test_lazy_heads_and_real_grad():
    net = _net()
    mim = ddfast.MIM4DD(net, ["1"], real_grad=True).double()
    x_syn, y_syn = _data(4, 8)
    x_real, y_real = _data(6, 9)
    x_real.requires_grad_(True)
    mim(x_syn, y_syn, x_real, y_real).backward()
    assert mim.syn_heads[0].weight.shape == (128, 4 * 8 * 8)
    assert x_real.grad is not None


def test_remove_hooks():
    net = _net()
    mim = ddfast.MIM4DD(net, LAYERS, DIMS)
    mim.remove_hooks()
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


@pytest.mark.parametrize("kwargs, err, match", [
    ({"layers": ["nope"]}, ValueError, "syn_net has no module"),
    ({"layers": []}, ValueError, "layers"),
    ({"layers": ["1"], "feature_dims": [1, 2]}, ValueError, "feature_dims"),
    ({"layers": ["1"], "layer_weights": [1.0, 2.0]}, ValueError, "layer_weights"),
    ({"layers": ["1"], "proj_dim": 0}, ValueError, "proj_dim"),
    ({"layers": ["1"], "real_net": "net"}, TypeError, "real_net"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        ddfast.MIM4DD(_net(), **kwargs)
