"""The eager path of the compiled bandwidth ops: a C++ autograd node (csrc/eager_autograd.h).

An eager call with the compiled backend builds one ``torch::autograd::Function`` node whose
backward runs without Python; torch.compile and torch.func keep the Python-registered autograd of
``ddfast::<op>_fwd``. Both paths call the same kernels, so loss and gradients must be bit-equal.
"""
import pytest
import torch

import ddfast
from ddfast import _backend

from conftest import require_backend


def _param_match(device, dtype):
    g = torch.Generator().manual_seed(0)
    s, a, t = (torch.randn(37, 5, generator=g, dtype=dtype).to(device) for _ in range(3))
    s.requires_grad_(True)
    return [s], lambda b: ddfast.param_match(s, a, t, backend=b)


def _gradient_match(device, dtype):
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 4, 2, 3, 3), (3, 4), (3, 7, 11)]
    syn = [torch.randn(sh, generator=g, dtype=dtype).to(device).requires_grad_(True) for sh in shapes]
    real = [torch.randn(sh, generator=g, dtype=dtype).to(device) for sh in shapes]
    return syn, lambda b: ddfast.gradient_match(syn, real, grouped=True, backend=b)


def _class_means(device, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(23, 6, generator=g, dtype=dtype).to(device).requires_grad_(True)
    y = (torch.arange(23) % 4).to(device)
    w = torch.randn(4, 6, generator=g, dtype=dtype).to(device)
    return [x], lambda b: (ddfast.class_means(x, y, 4, backend=b)[0] * w).sum()


def _class_mean_loss(device, dtype):
    g = torch.Generator().manual_seed(3)
    f_real = torch.randn(30, 2, 3, generator=g, dtype=dtype).to(device)
    f_syn = torch.randn(8, 2, 3, generator=g, dtype=dtype).to(device).requires_grad_(True)
    y_real, y_syn = (torch.arange(30) % 4).to(device), (torch.arange(8) % 4).to(device)
    return [f_syn], lambda b: ddfast.class_mean_loss(f_real, y_real, f_syn, y_syn, 4, backend=b)


def _bn_stat(device, dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=dtype).to(device).requires_grad_(True)
    rm, rv = torch.randn(3, generator=g, dtype=dtype).to(device), (torch.rand(3, generator=g, dtype=dtype) + 0.5).to(device)
    return [x], lambda b: ddfast.bn_stat_loss(x, rm, rv, backend=b)


def _bn_stat_sum(device, dtype):
    """Three layers of other ranks and batch sizes (BatchNorm2d, 1d, 3d inputs), weighted."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(sh, generator=g, dtype=dtype).to(device).requires_grad_(True)
          for sh in ((5, 3, 4, 4), (6, 2), (2, 3, 2, 3, 2))]
    rms = [torch.randn(x.shape[1], generator=g, dtype=dtype).to(device) for x in xs]
    rvs = [(torch.rand(x.shape[1], generator=g, dtype=dtype) + 0.5).to(device) for x in xs]
    return xs, lambda b: ddfast.bn_stat_loss_sum(xs, rms, rvs, [10.0, 1.0, 0.5], backend=b)


CASES = {"param_match": _param_match, "gradient_match": _gradient_match, "class_means": _class_means,
         "class_mean_loss": _class_mean_loss, "bn_stat": _bn_stat, "bn_stat_sum": _bn_stat_sum}
OP_OF = {"bn_stat_sum": "bn_stat"}  # the op whose kernels a case runs
NAME_OF = {"bn_stat": "bn_stat_loss", "bn_stat_sum": "bn_stat_loss_sum"}  # the public name errors give


def _run(make, device, dtype, backend, eager=True, monkeypatch=None):
    leaves, call = make(device, dtype)
    if not eager:
        monkeypatch.setattr(_backend, "eager_path", lambda: False)
    loss = call(backend)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # gradient_match: rank-1 tensors skipped
    if not eager:
        monkeypatch.undo()
    return loss, grads


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_node_equals_the_registered_autograd_bitwise(op, dtype, device, monkeypatch):
    backend = require_backend(OP_OF.get(op, op), "compiled", device)
    leaves, call = CASES[op](device, dtype)
    names, todo = [], [call(backend).grad_fn]
    while todo:  # the graph's nodes (class_means: below the weighting)
        node = todo.pop()
        names.append(node.name())
        todo += [f for f, _ in node.next_functions if f is not None]
    assert any("Eager" in n and "CppNode" in n for n in names), names
    loss, grads = _run(CASES[op], device, dtype, backend)
    loss_reg, grads_reg = _run(CASES[op], device, dtype, backend, eager=False, monkeypatch=monkeypatch)
    assert torch.equal(loss, loss_reg)
    for g, r in zip(grads, grads_reg):
        assert (g is None and r is None) or torch.equal(g, r)
    loss_ref, grads_ref = _run(CASES[op], device, dtype, "torch")  # the formula, same inputs
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    for leaf, g, r in zip(leaves, grads, grads_ref):  # a skipped tensor (None) has gradient 0
        zero = torch.zeros_like(leaf)
        torch.testing.assert_close(zero if g is None else g, zero if r is None else r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("op", sorted(CASES))
def test_backward_with_create_graph_raises_naming_the_op(op, device):
    backend = require_backend(OP_OF.get(op, op), "compiled", device)
    leaves, call = CASES[op](device, torch.float64)
    name = NAME_OF.get(op, op)
    with pytest.raises(RuntimeError, match=f"ddfast.{name}: its backward is not differentiable"):
        torch.autograd.grad(call(backend), leaves, create_graph=True)


@pytest.mark.parametrize("op", sorted(CASES))
def test_no_grad_and_inference_mode_give_the_same_value(op, device):
    backend = require_backend(OP_OF.get(op, op), "compiled", device)
    leaves, call = CASES[op](device, torch.float64)
    want = call(backend).detach()
    with torch.no_grad():
        got = call(backend)
    assert not got.requires_grad and torch.equal(got, want)
    with torch.inference_mode():
        assert torch.equal(call(backend), want)
