"""param_match against its reference: values, gradients, dtypes, odd shapes, bad input."""
import pytest
import torch

import ddfast
from ddfast.ops.param_match import param_match_reference

from conftest import require_backend, tol

OP = "param_match"


def _inputs(n, device, dtype=torch.float32, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (n,)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    start = target + torch.randn(shape, generator=g, dtype=torch.float64)
    student = target + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (student, start, target)]


@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 100_003])
def test_matches_reference(device, backend_kind, n):
    backend = require_backend(OP, backend_kind, device)
    student, start, target = _inputs(n, device)
    s_ref = student.clone().requires_grad_(True)
    s_new = student.clone().requires_grad_(True)
    want = param_match_reference(s_ref, start, target)
    got = ddfast.param_match(s_new, start, target, backend=backend)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, **tol(device, torch.float32))
    torch.testing.assert_close(s_new.grad, s_ref.grad, **tol(device, torch.float32))


def test_multidim_and_noncontiguous(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    student, start, target = _inputs(0, device, shape=(33, 65))
    student, start, target = student.t(), start.t(), target.t()  # non-contiguous views
    assert not student.is_contiguous()
    s_new = student.detach().clone().t().contiguous().t().requires_grad_(True)
    got = ddfast.param_match(s_new, start, target, backend=backend)
    got.backward()
    s_ref = student.detach().clone().requires_grad_(True)
    want = param_match_reference(s_ref, start, target)
    want.backward()
    torch.testing.assert_close(got, want, **tol(device, torch.float32))
    torch.testing.assert_close(s_new.grad, s_ref.grad, **tol(device, torch.float32))


def test_gradcheck_float64(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    student, start, target = _inputs(37, device, dtype=torch.float64)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: ddfast.param_match(s, start, target, backend=backend), (student,))


def test_large_values(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    student, start, target = (t * 1e15 for t in _inputs(5000, device))
    got = ddfast.param_match(student, start, target, backend=backend)
    want = param_match_reference(student, start, target)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, **tol(device, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(device, backend_kind, dtype):
    if backend_kind == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter runs fp32 only")
    backend = require_backend(OP, backend_kind, device)
    student, start, target = _inputs(10_000, device, dtype=dtype)
    student.requires_grad_(True)
    got = ddfast.param_match(student, start, target, backend=backend)
    got.backward()
    s32 = student.detach().float().requires_grad_(True)
    want = param_match_reference(s32, start.float(), target.float())
    want.backward()
    assert got.dtype == dtype and student.grad.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol(device, dtype))
    torch.testing.assert_close(student.grad.float(), s32.grad, **tol(device, dtype))


def test_start_and_target_are_constants(device):
    student, start, target = _inputs(50, device)
    student.requires_grad_(True)
    target.requires_grad_(True)
    ddfast.param_match(student, start, target).backward()
    assert student.grad is not None and target.grad is None


def test_opcheck_compiled_and_triton(device):
    for kind in ("compiled", "triton"):
        try:
            backend = require_backend(OP, kind, device)
        except pytest.skip.Exception:
            continue
        student, start, target = _inputs(300, device)
        student.requires_grad_(True)
        name = "param_match_triton_fwd" if backend == "triton" else "param_match_fwd"
        torch.library.opcheck(getattr(torch.ops.ddfast, name), (student, start, target))


def test_torch_compile_traces_without_graph_break(device):
    backend = require_backend(OP, "compiled", device)
    student, start, target = _inputs(300, device)
    student.requires_grad_(True)

    def f(s):
        return ddfast.param_match(s, start, target, backend=backend) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(student)
    got.backward()
    g = student.grad.clone()
    student.grad = None
    want = f(student)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, student.grad)


@pytest.mark.parametrize("bad, err, match", [
    (lambda s, a, t: (s, a[:-1], t), ValueError, "start"),
    (lambda s, a, t: (s.long(), a, t), TypeError, "student"),
    (lambda s, a, t: (s, a.double(), t), TypeError, "dtype"),
    (lambda s, a, t: (s[:0], a[:0], t[:0]), ValueError, "empty"),
    (lambda s, a, t: ([s], a, t), TypeError, "student"),
])
def test_bad_input(bad, err, match):
    args = bad(*_inputs(10, "cpu"))
    with pytest.raises(err, match=match):
        ddfast.param_match(*args)


def test_nan_input_is_named(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    student, start, target = _inputs(10, device)
    target[3] = float("nan")
    with pytest.raises(ValueError, match="target contains NaN"):
        ddfast.param_match(student, start, target, backend=backend)
