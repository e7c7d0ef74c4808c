"""class_means against its reference: values, gradients, empty classes, odd shapes, bad input."""
import pytest
import torch

import ddfast
from ddfast.ops.class_means import class_means_reference

from conftest import require_backend, tol

OP = "class_means"


def _inputs(shape, num_classes, device, dtype=torch.float32, seed=0, drop=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    labels = torch.randint(0, num_classes, (shape[0],), generator=g)
    if drop is not None:
        labels[labels == drop] = (drop + 1) % num_classes
    return x, labels.to(device)


def _check(x, labels, num_classes, backend, device, dtype=torch.float32):
    x_new = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    means, counts = ddfast.class_means(x_new, labels, num_classes, backend=backend)
    want_means, want_counts = class_means_reference(x_ref, labels, num_classes)
    w = torch.randn(want_means.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    (means * w.to(means.dtype)).sum().backward()
    (want_means * w.to(want_means.dtype)).sum().backward()
    assert means.shape == want_means.shape and means.dtype == x.dtype
    torch.testing.assert_close(counts, want_counts)
    torch.testing.assert_close(means, want_means, **tol(device, dtype))
    torch.testing.assert_close(x_new.grad, x_ref.grad, **tol(device, dtype))
    return means, counts


@pytest.mark.parametrize("shape, num_classes", [
    ((37,), 5), ((37, 6), 7), ((13, 3, 4, 5), 4), ((40, 129), 3), ((9, 257), 10), ((1, 11), 3), ((64, 1), 2),
])
def test_matches_reference(device, backend_kind, shape, num_classes):
    backend = require_backend(OP, backend_kind, device)
    x, labels = _inputs(shape, num_classes, device, drop=1 if num_classes > 2 else None)
    means, counts = _check(x, labels, num_classes, backend, device)
    empty = counts == 0
    if shape[0] > 1 and num_classes > 2:
        assert empty[1]
    assert (means[empty] == 0).all()


def test_unordered_and_single_sample_classes(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x = torch.randn(6, 3, 5, device=device)
    labels = torch.tensor([4, 0, 2, 0, 5, 2], device=device)  # classes 1, 3 empty; 4, 5 single samples
    means, counts = _check(x, labels, 6, backend, device)
    torch.testing.assert_close(means[4], x[0])
    assert counts.tolist() == [2, 0, 2, 0, 1, 1]


def test_noncontiguous(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, labels = _inputs((21, 17), 4, device)
    x = x.t().contiguous().t()
    assert not x.is_contiguous()
    _check(x, labels, 4, backend, device)


def test_gradcheck_float64(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, labels = _inputs((11, 2, 3), 4, device, dtype=torch.float64, drop=2)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ddfast.class_means(t, labels, 4, backend=backend)[0], (x,))


def test_large_values(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, labels = _inputs((50, 33), 3, device)
    x = x * 1e30
    means, _ = ddfast.class_means(x, labels, 3, backend=backend)
    want, _ = class_means_reference(x, labels, 3)
    assert torch.isfinite(means).all()
    torch.testing.assert_close(means, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(device, backend_kind, dtype):
    if backend_kind == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter runs fp32 only")
    backend = require_backend(OP, backend_kind, device)
    x, labels = _inputs((300, 40), 5, device, dtype=dtype)
    x.requires_grad_(True)
    means, _ = ddfast.class_means(x, labels, 5, backend=backend)
    means.float().pow(2).sum().backward()
    x32 = x.detach().float().requires_grad_(True)
    want, _ = class_means_reference(x32, labels, 5)
    want.pow(2).sum().backward()
    assert means.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(means.float(), want, **tol(device, dtype))
    torch.testing.assert_close(x.grad.float(), x32.grad, **tol(device, dtype))


def test_opcheck_compiled_and_triton(device):
    for kind in ("compiled", "triton"):
        try:
            backend = require_backend(OP, kind, device)
        except pytest.skip.Exception:
            continue
        x, labels = _inputs((20, 7), 4, device)
        x.requires_grad_(True)
        name = "class_means_triton_fwd" if backend == "triton" else "class_means_fwd"
        torch.library.opcheck(getattr(torch.ops.ddfast, name), (x, labels, 4))


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_torch_compile_with_labels_traces_without_graph_break(device, backend):
    """The label range check reads values, so it stands aside while torch.compile traces."""
    backend = require_backend(OP, backend, device)
    x, labels = _inputs((20, 7), 4, device)
    f = lambda a: ddfast.class_means(a, labels, 4, backend=backend)[0].pow(2).sum()  # noqa: E731
    want = f(x)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad, err, match", [
    (lambda x, y: (x, y.float(), 4), TypeError, "labels"),
    (lambda x, y: (x, y + 4, 4), ValueError, "labels"),
    (lambda x, y: (x, y - 1, 4), ValueError, "labels"),
    (lambda x, y: (x, y[:-1], 4), ValueError, "labels"),
    (lambda x, y: (x.long(), y, 4), TypeError, "x"),
    (lambda x, y: (x[:0], y[:0], 4), ValueError, "x"),
    (lambda x, y: (x, y, 0), ValueError, "num_classes"),
    (lambda x, y: (x, y, 4.0), TypeError, "num_classes"),
])
def test_bad_input(bad, err, match):
    x, labels = _inputs((10, 3), 4, "cpu")
    with pytest.raises(err, match=match):
        ddfast.class_means(*bad(x, labels))


def test_nan_input_is_named(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, labels = _inputs((10, 3), 4, device)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        ddfast.class_means(x, labels, 4, backend=backend)
