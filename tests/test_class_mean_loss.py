"""class_mean_loss against DM's class loop: values, gradients, layers, missing classes, bad input."""
import pytest
import torch

import ddfast
from ddfast.ops.class_mean_loss import class_mean_loss_reference

from conftest import require_backend, tol

OP = "class_mean_loss"


def _features(n_real, n_syn, feat_shape, num_classes, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_real = torch.randn((n_real,) + feat_shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    f_syn = torch.randn((n_syn,) + feat_shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    y_real = torch.randint(0, num_classes, (n_real,), generator=g).to(device)
    y_syn = torch.randint(0, num_classes, (n_syn,), generator=g).to(device)
    return f_real, y_real, f_syn, y_syn


def _compare(f_real, y_real, f_syn, y_syn, backend, device, dtype=torch.float32, **kw):
    s_new = f_syn.detach().clone().requires_grad_(True)
    s_ref = f_syn.detach().clone().requires_grad_(True)
    got = ddfast.class_mean_loss(f_real, y_real, s_new, y_syn, backend=backend, **kw)
    want = class_mean_loss_reference(f_real, y_real, s_ref, y_syn, **kw)
    w = torch.rand(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device) + 0.5
    (got * w.to(got.dtype)).sum().backward()
    (want * w.to(want.dtype)).sum().backward()
    assert got.shape == want.shape and got.dtype == f_syn.dtype
    torch.testing.assert_close(got, want, **tol(device, dtype))
    torch.testing.assert_close(s_new.grad, s_ref.grad, **tol(device, dtype))
    return got


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("n_real, n_syn, feat_shape, num_classes", [
    (40, 13, (15,), 6), (30, 10, (3, 4, 5), 4), (25, 7, (129,), 3), (9, 1, (8,), 2), (64, 20, (2048,), 10),
])
def test_matches_reference(device, backend_kind, reduction, n_real, n_syn, feat_shape, num_classes):
    backend = require_backend(OP, backend_kind, device)
    f_real, y_real, f_syn, y_syn = _features(n_real, n_syn, feat_shape, num_classes, device)
    _compare(f_real, y_real, f_syn, y_syn, backend, device, num_classes=num_classes, reduction=reduction)


def test_class_missing_on_one_side_and_single_samples(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_real, _, f_syn, _ = _features(8, 5, (6,), 5, device)
    y_real = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=device)   # class 4: no real samples
    y_syn = torch.tensor([4, 2, 0, 1, 4], device=device)             # class 3: no syn samples; 0, 1, 2 single
    got = _compare(f_real, y_real, f_syn, y_syn, backend, device, num_classes=5, reduction="none")
    assert got[3] == 0 and got[4] == 0 and (got[:3] > 0).all()


def test_dm_formula_with_default_num_classes(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_real, y_real, f_syn, y_syn = _features(30, 12, (10,), 3, device)
    got = ddfast.class_mean_loss(f_real, y_real, f_syn, y_syn, backend=backend)
    want = sum(torch.sum((f_real[y_real == c].mean(0) - f_syn[y_syn == c].mean(0)) ** 2) for c in range(3))
    torch.testing.assert_close(got, want, **tol(device, torch.float32))


def test_layer_list_with_weights(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_real, y_real, f_syn, y_syn = _features(20, 8, (4, 3, 3), 3, device)
    g_real, _, g_syn, _ = _features(20, 8, (33,), 3, device, seed=5)
    s1, s2 = f_syn.clone().requires_grad_(True), g_syn.clone().requires_grad_(True)
    got = ddfast.class_mean_loss([f_real, g_real], y_real, [s1, s2], y_syn, layer_weights=[0.5, 2.0], backend=backend)
    got.backward()
    r1, r2 = f_syn.clone().requires_grad_(True), g_syn.clone().requires_grad_(True)
    want = class_mean_loss_reference([f_real, g_real], y_real, [r1, r2], y_syn, layer_weights=[0.5, 2.0])
    want.backward()
    want_sep = 0.5 * class_mean_loss_reference(f_real, y_real, f_syn, y_syn) + \
        2.0 * class_mean_loss_reference(g_real, y_real, g_syn, y_syn)
    torch.testing.assert_close(got, want, **tol(device, torch.float32))
    torch.testing.assert_close(want, want_sep, **tol(device, torch.float32))
    torch.testing.assert_close(s1.grad, r1.grad, **tol(device, torch.float32))
    torch.testing.assert_close(s2.grad, r2.grad, **tol(device, torch.float32))


def test_real_side_gets_no_gradient(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_real, y_real, f_syn, y_syn = _features(20, 8, (5,), 3, device)
    f_real.requires_grad_(True)
    f_syn.requires_grad_(True)
    ddfast.class_mean_loss(f_real, y_real, f_syn, y_syn, backend=backend).backward()
    assert f_real.grad is None and f_syn.grad is not None


def test_noncontiguous(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_real, y_real, f_syn, y_syn = _features(16, 9, (7, 5), 3, device)
    f_real, f_syn = f_real.transpose(1, 2), f_syn.transpose(1, 2)
    assert not f_syn.is_contiguous()
    _compare(f_real, y_real, f_syn, y_syn, backend, device)


def test_gradcheck_float64(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_real, y_real, f_syn, y_syn = _features(15, 7, (2, 3), 3, device, dtype=torch.float64)
    f_syn.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: ddfast.class_mean_loss(f_real, y_real, s, y_syn, 4, reduction="none", backend=backend), (f_syn,))


def test_large_values(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_real, y_real, f_syn, y_syn = _features(30, 10, (20,), 3, device)
    f_real, f_syn = f_real * 1e15, f_syn * 1e15
    got = ddfast.class_mean_loss(f_real, y_real, f_syn, y_syn, backend=backend)
    want = class_mean_loss_reference(f_real, y_real, f_syn, y_syn)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(device, backend_kind, dtype):
    if backend_kind == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter runs fp32 only")
    backend = require_backend(OP, backend_kind, device)
    f_real, y_real, f_syn, y_syn = _features(200, 50, (64,), 4, device, dtype=dtype)
    f_syn.requires_grad_(True)
    got = ddfast.class_mean_loss(f_real, y_real, f_syn, y_syn, backend=backend)
    got.backward()
    s32 = f_syn.detach().float().requires_grad_(True)
    want = class_mean_loss_reference(f_real.float(), y_real, s32, y_syn)
    want.backward()
    assert got.dtype == dtype and f_syn.grad.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol(device, dtype))
    torch.testing.assert_close(f_syn.grad.float(), s32.grad, **tol(device, dtype))


def test_opcheck_compiled_and_triton(device):
    for kind in ("compiled", "triton"):
        try:
            backend = require_backend(OP, kind, device)
        except pytest.skip.Exception:
            continue
        f_real, y_real, f_syn, y_syn = _features(20, 8, (6,), 3, device)
        mean_r, count_r = ddfast.class_means(f_real, y_real, 3, backend="torch")
        f_syn.requires_grad_(True)
        name = "class_mean_loss_triton_fwd" if backend == "triton" else "class_mean_loss_fwd"
        torch.library.opcheck(getattr(torch.ops.ddfast, name), (f_syn, y_syn, mean_r, count_r, 3))


@pytest.mark.parametrize("bad, err, match", [
    (lambda fr, yr, fs, ys: (fr, yr.float(), fs, ys), TypeError, "y_real"),
    (lambda fr, yr, fs, ys: (fr, yr, fs, ys[:-1]), ValueError, "y_syn"),
    (lambda fr, yr, fs, ys: (fr, yr, fs, ys + 3, 3), ValueError, "y_syn"),
    (lambda fr, yr, fs, ys: (fr, yr, fs[:, :-1], ys), ValueError, "f_real and f_syn"),
    (lambda fr, yr, fs, ys: (fr.long(), yr, fs, ys), TypeError, "f_real"),
    (lambda fr, yr, fs, ys: ([fr, fr], yr, [fs], ys), ValueError, "layers"),
    (lambda fr, yr, fs, ys: ([fr], yr, [fs], ys, None, "sum", [1.0, 2.0]), ValueError, "layer_weights"),
    (lambda fr, yr, fs, ys: (fr, yr, fs, ys, None, "mean"), ValueError, "reduction"),
    (lambda fr, yr, fs, ys: (fr, yr, "f", ys), TypeError, "f_syn"),
])
def test_bad_input(bad, err, match):
    args = bad(*_features(10, 6, (4,), 3, "cpu"))
    with pytest.raises(err, match=match):
        ddfast.class_mean_loss(*args)


def test_nan_input_is_named(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_real, y_real, f_syn, y_syn = _features(10, 6, (4,), 3, device)
    f_syn[0, 0] = float("inf")
    y_syn[0] = y_real[0]
    with pytest.raises(ValueError, match="f_syn contains NaN"):
        ddfast.class_mean_loss(f_real, y_real, f_syn, y_syn, backend=backend)


def test_compat_dm_loss(device):
    from ddfast.compat.dc import dm_loss

    f_real, y_real, f_syn, y_syn = _features(20, 8, (9,), 3, device)
    one = dm_loss(f_real, f_syn)
    torch.testing.assert_close(one, torch.sum((torch.mean(f_real, dim=0) - torch.mean(f_syn, dim=0)) ** 2))
    torch.testing.assert_close(dm_loss(f_real, f_syn, y_real, y_syn),
                               class_mean_loss_reference(f_real, y_real, f_syn, y_syn), **tol(device, torch.float32))
