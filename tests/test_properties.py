"""Property-based checks (hypothesis): random shapes, ranks, labels and metrics, compiled C++
kernels against the plain references. Complements the hand-picked edge cases of each op file."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddfast
from ddfast.ops.class_mean_loss import class_mean_loss_reference
from ddfast.ops.gradient_match import gradient_match_reference
from ddfast.ops.param_match import param_match_reference

from conftest import require_backend

# derandomize: CI sees the same examples on every run
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


def _cpp(op):
    return require_backend(op, "compiled", "cpu")


def _grads(out, inputs):
    """d out / d inputs, zeros where out does not depend on an input (e.g. only rank-1 layers under
    "ours", or no class on both sides: the references then return a constant, as DC/DM do)."""
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


@SETTINGS
@given(layer_shapes=st.lists(shapes, min_size=1, max_size=4), groups=st.integers(1, 3),
       metric=st.sampled_from(["ours", "mse", "cos"]), seed=st.integers(0, 2**16))
def test_gradient_match_any_layers(layer_shapes, groups, metric, seed):
    backend = _cpp("gradient_match")
    g = torch.Generator().manual_seed(seed)
    real = [torch.randn((groups,) + s, generator=g, dtype=torch.float64) for s in layer_shapes]
    syn = [(r + torch.randn(r.shape, generator=g, dtype=torch.float64)).requires_grad_(True) for r in real]
    got = ddfast.gradient_match(syn, real, metric, grouped=True, reduction="none", backend=backend)
    want = gradient_match_reference(syn, real, metric, grouped=True, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    w = torch.randn(groups, generator=g, dtype=torch.float64)
    got_grads = _grads((got * w).sum(), syn)
    want_grads = _grads((want * w).sum(), syn)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(n_real=st.integers(1, 40), n_syn=st.integers(1, 12), dim=st.integers(1, 70), classes=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_class_mean_loss_any_labels(n_real, n_syn, dim, classes, seed):
    backend = _cpp("class_mean_loss")
    g = torch.Generator().manual_seed(seed)
    f_real = torch.randn(n_real, dim, generator=g, dtype=torch.float64)
    f_syn = torch.randn(n_syn, dim, generator=g, dtype=torch.float64, requires_grad=True)
    y_real = torch.randint(0, classes, (n_real,), generator=g)
    y_syn = torch.randint(0, classes, (n_syn,), generator=g)
    got = ddfast.class_mean_loss(f_real, y_real, f_syn, y_syn, classes, backend=backend)
    want = class_mean_loss_reference(f_real, y_real, f_syn, y_syn, classes)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (ga,), (gb,) = _grads(got, [f_syn]), _grads(want, [f_syn])
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(shape=shapes, scale=st.floats(1e-3, 1e6), seed=st.integers(0, 2**16))
def test_param_match_any_shape_and_scale(shape, scale, seed):
    backend = _cpp("param_match")
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g) * scale
    start = target + torch.randn(shape, generator=g) * scale
    student = (target + 0.5 * torch.randn(shape, generator=g) * scale).requires_grad_(True)
    got = ddfast.param_match(student, start, target, backend=backend)
    want = param_match_reference(student, start, target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (ga,), (gb,) = _grads(got, [student]), _grads(want, [student])
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6 * max(1.0, gb.abs().max().item()))
