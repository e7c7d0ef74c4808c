"""ddfast.compat.mtt.trajectory_loss equals mtt-distillation distill.py's param_loss / param_dist."""
import pytest
import torch

from ddfast.compat.mtt import trajectory_loss


def distill_py_loss(student_params, starting_params, target_params):
    """distill.py: sum-reduced MSE of the last student and of the start to the target, each divided
    by the number of parameters, then the ratio."""
    num_params = target_params.numel()
    param_loss = torch.tensor(0.0, dtype=target_params.dtype)
    param_dist = torch.tensor(0.0, dtype=target_params.dtype)
    param_loss = param_loss + torch.nn.functional.mse_loss(student_params[-1], target_params, reduction="sum")
    param_dist = param_dist + torch.nn.functional.mse_loss(starting_params, target_params, reduction="sum")
    return (param_loss / num_params) / (param_dist / num_params)


def _trajectory(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (10, 32), (10,)]
    start = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    target = [p + 0.1 * torch.randn(p.shape, generator=g, dtype=dtype) for p in start]
    return start, target


def test_flat_vectors_equal_distill_py():
    start, target = _trajectory()
    start_flat = torch.cat([p.reshape(-1) for p in start])
    target_flat = torch.cat([p.reshape(-1) for p in target])
    student0 = start_flat.clone().requires_grad_(True)
    student = [student0, student0 - 0.01 * torch.sin(student0)]  # distill.py's list of student steps
    got = trajectory_loss(student[-1], start_flat, target_flat)
    want = distill_py_loss(student, start_flat, target_flat)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (g_got,) = torch.autograd.grad(got, student0, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, student0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_lists_of_tensors_are_concatenated(backend):
    start, target = _trajectory(torch.float32)
    student = [p + 0.05 for p in target]
    flat = lambda ps: torch.cat([p.reshape(-1) for p in ps])  # noqa: E731
    got = trajectory_loss(student, start, target, backend=backend)
    torch.testing.assert_close(got, distill_py_loss([flat(student)], flat(start), flat(target)), rtol=1e-5, atol=1e-6)


def test_bad_input_is_named():
    start, target = _trajectory()
    with pytest.raises(TypeError, match="student_params"):
        trajectory_loss("weights", start, target)
    with pytest.raises(TypeError, match=r"target_params\[1\]"):
        trajectory_loss(start, start, [target[0], 3.0])
    with pytest.raises(ValueError, match="start"):
        trajectory_loss(torch.cat([p.reshape(-1) for p in start]), start[:2], target)
