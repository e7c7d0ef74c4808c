"""LowRankImages: factor shapes, budget formula, SVD initialisation (Eckart–Young), gradients."""
import pytest
import torch

import ddfast
from ddfast import LowRankImages, low_rank_budget_ipc


def test_shapes_and_gradients_reach_the_factors():
    lr = LowRankImages(5, 3, 8, 6, rank=2)
    x = lr()
    assert x.shape == (5, 3, 8, 6) and torch.linalg.matrix_rank(x[0, 0].detach(), atol=1e-5) <= 2  # fp32 noise aside
    x.square().sum().backward()
    assert lr.A.grad.shape == (5, 3, 8, 2) and lr.B.grad.shape == (5, 3, 2, 6)
    assert sum(p.numel() for p in lr.parameters()) == 5 * 3 * 2 * (8 + 6)


def test_budget_formula():
    assert low_rank_budget_ipc(10, 32, 32, 2) == 10 * (1024 // 128)  # 80 images in the space of 10
    assert low_rank_budget_ipc(1, 28, 28, 4) == 784 // 224
    with pytest.raises(ValueError, match="rank"):
        low_rank_budget_ipc(1, 4, 4, 3)


def test_full_rank_svd_init_reproduces_the_images():
    x = torch.randn(4, 2, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(LowRankImages.from_images(x, rank=5)(), x, rtol=1e-10, atol=1e-10)


def test_svd_init_is_the_best_rank_r_approximation():
    x = torch.randn(3, 3, 9, 7, dtype=torch.float64)
    r = 2
    approx = LowRankImages.from_images(x, rank=r)().detach()
    s = torch.linalg.svdvals(x)
    # Eckart–Young: the Frobenius error is the norm of the discarded singular values
    torch.testing.assert_close(torch.linalg.matrix_norm(x - approx), s[..., r:].norm(dim=-1), rtol=1e-9, atol=1e-9)
    assert (torch.linalg.matrix_rank(approx) <= r).all()


def test_works_as_a_synthetic_set_with_class_mean_loss():
    torch.manual_seed(0)
    real = torch.randn(40, 1, 8, 8)
    y_real = torch.arange(4).repeat(10)
    syn = LowRankImages(8, 1, 8, 8, rank=2)
    y_syn = torch.arange(4).repeat(2)
    opt = torch.optim.SGD(syn.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        loss = ddfast.class_mean_loss(real.flatten(1), y_real, syn().flatten(1), y_syn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        LowRankImages(1, 1, 4, 4, rank=5)
    with pytest.raises(ValueError, match="channels"):
        LowRankImages(1, 0, 4, 4)
    with pytest.raises(ValueError, match="images"):
        LowRankImages.from_images(torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match="images"):
        LowRankImages.from_images(torch.ones(1, 1, 4, 4, dtype=torch.long))
