"""ddfast.compat.dc match_loss / distance_wb equal DatasetCondensation's utils.py numerically."""
import types

import pytest
import torch

from ddfast.compat.dc import distance_wb, match_loss

from conftest import require_backend


def dc_distance_wb(gwr, gws):
    """DC's per-tensor distance, written from the paper's formula: per output row
    1 − <r, s> / (‖r‖‖s‖ + 1e-6), summed; conv/3-d tensors flattened behind their first axis;
    rank-1 tensors (biases, norm parameters) count 0."""
    if gwr.dim() == 1:
        return torch.tensor(0.0, device=gwr.device)
    r = gwr.reshape(gwr.shape[0], -1) if gwr.dim() in (3, 4) else gwr
    s = gws.reshape(r.shape)
    cosine = (r * s).sum(-1) / (r.norm(dim=-1) * s.norm(dim=-1) + 1e-6)
    return (1 - cosine).sum()


def dc_match_loss(gw_syn, gw_real, metric):
    if metric == "ours":
        return sum(dc_distance_wb(r, s) for r, s in zip(gw_real, gw_syn))
    r = torch.cat([g.reshape(-1) for g in gw_real])
    s = torch.cat([g.reshape(-1) for g in gw_syn])
    if metric == "mse":
        return ((s - r) ** 2).sum()
    return 1 - (r * s).sum() / (r.norm() * s.norm() + 1e-6)


def _convnet3_grads(dtype=torch.float64, seed=0):
    """Gradients of a DC ConvNet-3 (width 8, instance norm affine, 3×16×16 input, 10 classes)."""
    torch.manual_seed(seed)
    layers = []
    c = 3
    for _ in range(3):
        layers += [torch.nn.Conv2d(c, 8, 3, padding=1), torch.nn.GroupNorm(8, 8, affine=True), torch.nn.ReLU(),
                   torch.nn.AvgPool2d(2)]
        c = 8
    net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(8 * 2 * 2, 10)).to(dtype)
    params = list(net.parameters())

    def grads(seed_x, create_graph):
        g = torch.Generator().manual_seed(seed_x)
        x = torch.randn(6, 3, 16, 16, generator=g, dtype=dtype).requires_grad_(create_graph)
        y = torch.randint(0, 10, (6,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        return x, list(torch.autograd.grad(loss, params, create_graph=create_graph))

    _, gw_real = grads(1, False)
    x_syn, gw_syn = grads(2, True)
    return params, x_syn, gw_syn, [g.detach() for g in gw_real]


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_match_loss_convnet_equals_dc(metric):
    params, x_syn, gw_syn, gw_real = _convnet3_grads()
    assert {p.dim() for p in params} == {1, 2, 4}  # conv, norm/bias and fc tensors all present
    args = types.SimpleNamespace(dis_metric=metric, device="cpu")
    got = match_loss(gw_syn, gw_real, args)
    want = dc_match_loss(gw_syn, gw_real, metric)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, x_syn, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, x_syn)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_ours_counts_only_rank2_and_up():
    _, _, gw_syn, gw_real = _convnet3_grads()
    args = types.SimpleNamespace(dis_metric="ours", device="cpu")
    full = match_loss(gw_syn, gw_real, args)
    rows = sum(g.shape[0] for g in gw_real if g.dim() >= 2)
    only_matrices = match_loss([g for g in gw_syn if g.dim() >= 2], [g for g in gw_real if g.dim() >= 2], args)
    torch.testing.assert_close(full, only_matrices)
    assert 0 < full.item() < 2 * rows


@pytest.mark.parametrize("backend_kind", ["torch", "triton", "compiled"])
def test_match_loss_follows_backend_choice(backend_kind):
    import ddfast

    backend = require_backend("gradient_match", backend_kind, "cpu")
    ddfast.set_backend(backend)
    _, _, gw_syn, gw_real = _convnet3_grads(dtype=torch.float32)
    got = match_loss([g.detach() for g in gw_syn], gw_real, types.SimpleNamespace(dis_metric="ours"))
    torch.testing.assert_close(got, dc_match_loss(gw_syn, gw_real, "ours").detach(), rtol=1e-5, atol=1e-6)


def test_identical_small_gradients_give_nonzero_loss():
    g = [torch.full((3, 2, 2, 2), 1e-4)]
    loss = match_loss(g, [t.clone() for t in g], types.SimpleNamespace(dis_metric="ours"))
    torch.testing.assert_close(loss, dc_match_loss(g, g, "ours"))
    assert loss.item() > 1.0


def test_zero_syn_row_contributes_exactly_one():
    real = torch.randn(4, 6)
    syn = real.clone()
    syn[2] = 0
    d = distance_wb(real, syn)
    others = dc_distance_wb(real[[0, 1, 3]], syn[[0, 1, 3]])
    torch.testing.assert_close(d, others + 1.0)


def test_distance_wb_by_rank():
    g = torch.Generator().manual_seed(3)
    for shape in [(5, 3, 3, 3), (4, 6, 7), (10, 20), (1, 33)]:
        r, s = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        torch.testing.assert_close(distance_wb(r, s), dc_distance_wb(r, s), rtol=1e-5, atol=1e-6)
    zero = distance_wb(torch.randn(7), torch.randn(7))
    assert zero.dtype == torch.float32 and zero.item() == 0.0


def test_distance_wb_argument_order_is_real_first():
    r, s = torch.randn(4, 5), torch.randn(4, 5)
    s.requires_grad_(True)
    distance_wb(r, s).backward()
    assert s.grad is not None and bool(s.grad.abs().sum() > 0)


def test_unknown_metric_raises_value_error():
    g = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="dis_metric"):
        match_loss(g, g, types.SimpleNamespace(dis_metric="l1", device="cpu"))
