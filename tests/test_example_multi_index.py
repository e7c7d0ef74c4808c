"""The multi-index example: principal angles, the task, and a tiny distillation that finds the subspace."""
import math

import torch

from ddfast.examples import multi_index as mi


def test_principal_angles_of_known_subspaces():
    task = mi.make_task(6, 2, seed=1)
    inside = torch.randn(5, 2, dtype=torch.float64) @ task.U.T  # points in span(U)
    assert mi.principal_angles(inside, task.U).max() < 1e-5
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    outside = torch.randn(5, 6, dtype=torch.float64)
    outside = outside - (outside @ task.U) @ task.U.T  # orthogonal to span(U)
    torch.testing.assert_close(mi.principal_angles(outside, task.U), torch.full((2,), 90.0, dtype=torch.float64))
    assert abs(mi.relevant_energy(inside, task.U) - 1) < 1e-12


def test_task_depends_only_on_the_subspace():
    task = mi.make_task(8, 3, seed=0)
    x = torch.randn(10, 8, dtype=torch.float64)
    shifted = x + torch.randn(10, 8, dtype=torch.float64) @ (torch.eye(8, dtype=torch.float64) - task.U @ task.U.T)
    torch.testing.assert_close(task.target(x), task.target(shifted))
    params = mi.init_params(8, 6, torch.Generator().manual_seed(0))
    assert mi.forward(params, x).abs().max() < 1e-12  # symmetric init: f = 0


def test_tiny_distillation_aligns_with_the_relevant_subspace():
    task = mi.make_task(8, 2, seed=0)
    x_real, y_real = task.sample(1024, torch.Generator().manual_seed(1))
    x_syn, y_syn, losses = mi.distill(task, 4, width=16, outer=12, steps=5, seed=0, x_real=x_real, y_real=y_real)
    assert x_syn.shape == (4, 8) and y_syn.shape == (4,) and all(math.isfinite(v) for v in losses)
    angles = mi.principal_angles(x_syn, task.U)
    x_rand = x_real[:4]
    # distilled points concentrate in span(U): more energy there than random points (r/d = 0.25)
    assert mi.relevant_energy(x_syn, task.U) > 2 * mi.relevant_energy(x_rand, task.U)
    assert angles.max() < mi.principal_angles(x_rand, task.U).max()
