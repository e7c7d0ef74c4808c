"""real_precision on GradientMatcher / DistributionMatcher: the real side under autocast.

Bounds the measured effect quoted in the docstrings, and checks that the option really changes the
computation (not a no-op) and leaves float64 alone."""
import pytest
import torch

from ddfast import DistributionMatcher, GradientMatcher
from ddfast.ops.gradient_matcher import ConvNet


def _data(dtype=torch.float32, classes=4, n_real=8, n_syn=2, size=16):
    g = torch.Generator().manual_seed(0)
    x_real = torch.randn(classes * n_real, 3, size, size, generator=g, dtype=dtype)
    y_real = torch.arange(classes).repeat_interleave(n_real)
    x_syn = torch.randn(classes * n_syn, 3, size, size, generator=g, dtype=dtype)
    y_syn = torch.arange(classes).repeat_interleave(n_syn)
    return x_real, y_real, x_syn, y_syn


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return ConvNet(3, 4, width=32, depth=3, im_size=(16, 16)).to(dtype)


def _loss_and_grad(matcher, x_real, y_real, x_syn, y_syn):
    x = x_syn.clone().requires_grad_()
    loss = matcher(x_real, y_real, x, y_syn)
    loss.backward()
    return loss.detach(), x.grad


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# measured (docstrings): GradientMatcher loss 2-3e-4 for both types, image gradient 8.0e-2 (bf16) and
# 2.5e-2 (fp16) with every strategy; DistributionMatcher loss 6.3e-4 / 1.0e-4, gradient 4.0e-3 / 5.0e-4
@pytest.mark.parametrize("strategy", ["segmented", "loop"])
@pytest.mark.parametrize("precision,bound", [("bf16", 0.15), ("fp16", 0.05)])
def test_gradient_matcher_real_precision(strategy, precision, bound):
    data = _data()
    model = _model()
    ref_loss, ref_grad = _loss_and_grad(GradientMatcher(model, strategy=strategy), *data)
    loss, grad = _loss_and_grad(GradientMatcher(model, strategy=strategy, real_precision=precision), *data)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert 0 < _rel(loss, ref_loss) < 2e-3
    assert 0 < _rel(grad, ref_grad) < bound


@pytest.mark.parametrize("precision,bound", [("bf16", 1e-2), ("fp16", 2e-3)])
def test_distribution_matcher_real_precision(precision, bound):
    x_real, y_real, x_syn, y_syn = _data(n_real=16)
    net = _model()
    embed = lambda x: net.features(x).flatten(1)  # noqa: E731
    ref_loss, ref_grad = _loss_and_grad(DistributionMatcher(embed, 4), x_real, y_real, x_syn, y_syn)
    loss, grad = _loss_and_grad(DistributionMatcher(embed, 4, real_precision=precision), x_real, y_real, x_syn,
                                y_syn)
    assert 0 < _rel(loss, ref_loss) < bound
    assert 0 < _rel(grad, ref_grad) < bound


def test_distribution_matcher_real_precision_chunked_equals_whole():
    x_real, y_real, x_syn, y_syn = _data(n_real=16)
    net = _model()
    embed = lambda x: net.features(x).flatten(1)  # noqa: E731
    whole = _loss_and_grad(DistributionMatcher(embed, 4, real_precision="bf16"), x_real, y_real, x_syn, y_syn)
    chunked = _loss_and_grad(DistributionMatcher(embed, 4, real_precision="bf16", real_chunk_size=16), x_real,
                             y_real, x_syn, y_syn)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-4, atol=1e-6)


def test_float64_is_left_alone():
    data = _data(torch.float64)
    model = _model(torch.float64)
    ref = _loss_and_grad(GradientMatcher(model, strategy="segmented"), *data)
    got = _loss_and_grad(GradientMatcher(model, strategy="segmented", real_precision="bf16"), *data)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


def test_bad_real_precision():
    with pytest.raises(ValueError, match="real_precision"):
        GradientMatcher(_model(), real_precision="bfloat16")
    with pytest.raises(ValueError, match="real_precision"):
        DistributionMatcher(lambda x: x, 4, real_precision="fp8")
