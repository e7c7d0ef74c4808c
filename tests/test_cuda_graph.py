"""cuda_graph=True on GradientMatcher / DistributionMatcher.

CPU: the option runs eagerly with one warning and gives the eager numbers. CUDA (skipped without a
GPU): replays equal eager steps, in-place parameter updates are seen, a new configuration captures
again."""
import gc
import warnings

import pytest
import torch

from ddfast import DistributionMatcher, GradientMatcher
from ddfast.ops._cuda_graph import GraphedStep
from ddfast.ops.gradient_matcher import ConvNet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _data(device="cpu", classes=3, n_real=6, n_syn=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_real = torch.randn(classes * n_real, 3, size, size, generator=g).to(device)
    y_real = torch.arange(classes).repeat_interleave(n_real).to(device)
    x_syn = torch.randn(classes * n_syn, 3, size, size, generator=g).to(device)
    y_syn = torch.arange(classes).repeat_interleave(n_syn).to(device)
    return x_real, y_real, x_syn, y_syn


def _net(device="cpu"):
    torch.manual_seed(0)
    return ConvNet(3, 3, width=8, depth=2, im_size=(8, 8)).to(device)


def _loss_grad(matcher, x_real, y_real, x_syn, y_syn):
    x = x_syn.detach().clone().requires_grad_()
    loss = matcher(x_real, y_real, x, y_syn)
    loss.backward()
    return loss.detach(), x.grad


def test_cpu_falls_back_with_one_warning_and_equal_numbers():
    data = _data()
    net = _net()
    ref = _loss_grad(GradientMatcher(net), *data)
    matcher = GradientMatcher(net, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="need CUDA tensors"):
        got = _loss_grad(matcher, *data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per matcher
        again = _loss_grad(matcher, *data)
    for a, b in ((got, ref), (again, ref)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert matcher._graph.captures == 0 and matcher._graph.fallback_reason is not None


def test_distribution_matcher_cpu_fallback():
    x_real, y_real, x_syn, y_syn = _data()
    net = _net()
    embed = lambda x: net.features(x).flatten(1)  # noqa: E731
    ref = _loss_grad(DistributionMatcher(embed, 3), x_real, y_real, x_syn, y_syn)
    with pytest.warns(RuntimeWarning, match="cuda_graph"):
        got = _loss_grad(DistributionMatcher(embed, 3, cuda_graph=True), x_real, y_real, x_syn, y_syn)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


def test_bad_cuda_graph_argument():
    with pytest.raises(TypeError, match="cuda_graph"):
        GradientMatcher(_net(), cuda_graph="yes")
    with pytest.raises(TypeError, match="cuda_graph"):
        DistributionMatcher(lambda x: x, 3, cuda_graph=1)


def test_graphed_step_on_cpu_runs_eagerly():
    step = GraphedStep("Test")
    x = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="CUDA tensors"):
        assert step(lambda t: t * 2, ("k",), (x,)).tolist() == [2.0, 2.0, 2.0]
    assert step.captures == 0


class _FakeCudaTensor:
    """Passes GraphedStep's argument checks, so its capture logic runs without a GPU."""
    is_cuda = requires_grad = True

    def detach(self):
        return self

    def clone(self):
        return self

    def requires_grad_(self, flag=True):
        return self


def _fake_capture(monkeypatch, fail=False):
    log = []

    def make_graphed_callables(fn, static, allow_unused_input=False):
        log.append(("capture", gc.isenabled()))
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return lambda *args: torch.ones(1)

    real_collect = gc.collect
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make_graphed_callables)
    monkeypatch.setattr(gc, "collect", lambda *a: (log.append(("collect", gc.isenabled())), real_collect(*a))[1])
    return log


@pytest.mark.parametrize("enabled_before", [True, False])
def test_a_failed_capture_is_not_retried_for_the_same_key(monkeypatch, enabled_before):
    log = _fake_capture(monkeypatch, fail=True)
    step, x, eager = GraphedStep("Test"), _FakeCudaTensor(), lambda t: torch.zeros(1)
    was = gc.isenabled()
    try:
        (gc.enable if enabled_before else gc.disable)()
        with pytest.warns(RuntimeWarning, match="capture failed .*stream is capturing"):
            assert step(eager, "a", (x,)).tolist() == [0.0]
        assert gc.isenabled() == enabled_before  # restored after a failed capture too
    finally:
        (gc.enable if was else gc.disable)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        for _ in range(3):
            assert step(eager, "a", (x,)).tolist() == [0.0]
    assert [e for e, _ in log] == ["capture"] and step.captures == 0
    assert "stream is capturing" in step.fallback_reason
    step(eager, "b", (x,))  # a new configuration tries again
    assert [e for e, _ in log] == ["capture", "capture"]


def test_a_failed_key_stays_failed_after_another_key_captures(monkeypatch):
    """A fails, B captures: going back to A runs eagerly (no retry, B's graph kept)."""
    log = []

    def make_graphed_callables(fn, static, allow_unused_input=False):
        log.append(fn.__name__)
        if fn.__name__ == "a":
            raise RuntimeError("operation not permitted when stream is capturing")
        return lambda *args: torch.ones(1)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make_graphed_callables)

    def a(t):
        return torch.zeros(1)

    def b(t):
        return torch.zeros(1)
    step, x = GraphedStep("Test"), _FakeCudaTensor()
    with pytest.warns(RuntimeWarning, match="capture failed"):
        for _ in range(3):
            assert step(a, "a", (x,)).tolist() == [0.0]
            assert step(b, "b", (x,)).tolist() == [1.0]
    assert log == ["a", "b"] and step.captures == 1 and step.replays == 3


@pytest.mark.parametrize("enabled_before", [True, False])
def test_capture_runs_with_the_collector_off_after_collecting_the_old_graph(monkeypatch, enabled_before):
    """The old graph is collected before a re-capture, never inside it (pytorch/pytorch#161037)."""
    log = _fake_capture(monkeypatch)
    step, x, eager = GraphedStep("Test"), _FakeCudaTensor(), lambda t: torch.zeros(1)
    was = gc.isenabled()
    try:
        (gc.enable if enabled_before else gc.disable)()
        assert step(eager, "a", (x,)).tolist() == [1.0]
        assert step(eager, "a", (x,)).tolist() == [1.0]  # a replay
        assert step(eager, "b", (x,)).tolist() == [1.0]
        assert gc.isenabled() == enabled_before
    finally:
        (gc.enable if was else gc.disable)()
    # first capture: nothing to collect; the re-capture collects (collector as it was), then captures with it off
    assert log == [("capture", False), ("collect", enabled_before), ("capture", False)]
    assert step.captures == 2 and step.replays == 3


@cuda
def test_gradient_matcher_replays_equal_eager_steps_with_in_place_updates():
    data = _data("cuda")
    net_a, net_b = _net("cuda"), _net("cuda")
    eager, graphed = GradientMatcher(net_a), GradientMatcher(net_b, cuda_graph=True)
    opt_a = torch.optim.SGD(net_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.1)
    for step in range(4):
        ref = _loss_grad(eager, *data)
        got = _loss_grad(graphed, *data)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6)
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):  # DC trains the network in place between steps
            opt.zero_grad()
            net(data[0]).logsumexp(1).mean().backward()
            opt.step()
    assert graphed._graph.captures == 1 and graphed._graph.replays == 4
    x_real, y_real, x_syn, y_syn = data
    _loss_grad(graphed, x_real, y_real, torch.cat([x_syn, x_syn]), torch.cat([y_syn, y_syn]))
    assert graphed._graph.captures == 2, graphed._graph.fallback_reason  # a new configuration captures again


@cuda
@pytest.mark.parametrize("chunked", [False, True])
def test_distribution_matcher_replays_equal_eager_steps(chunked, monkeypatch):
    """Also with the real side in "auto" chunks (the first GPU run of them failed to capture: the
    chunks' label checks read the device)."""
    from ddfast.ops import distribution_matcher as dm

    x_real, y_real, x_syn, y_syn = _data("cuda")
    net = _net("cuda")
    embed = lambda x: net.features(x).flatten(1)  # noqa: E731
    if chunked:
        monkeypatch.setattr(dm, "AUTO_CHUNK_ELEMENTS", x_real[0].numel() * 5)  # 18 images: 4 chunks
        embed = net.features  # a Module: "auto" may chunk it
    eager, graphed = DistributionMatcher(embed, 3), DistributionMatcher(embed, 3, cuda_graph=True)
    assert (eager.chunk_size(x_real) is not None) == chunked
    for _ in range(3):
        ref = _loss_grad(eager, x_real, y_real, x_syn, y_syn)
        got = _loss_grad(graphed, x_real, y_real, x_syn, y_syn)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6)
    assert graphed._graph.captures == 1 and graphed._graph.replays == 3


@cuda
def test_graph_leaves_callers_tensors_and_earlier_losses_alone():
    x_real, y_real, x_syn, y_syn = _data("cuda")
    matcher = GradientMatcher(_net("cuda"), cuda_graph=True)
    first = x_syn.clone().requires_grad_()
    second = (x_syn * 0.5).requires_grad_()
    kept = first.detach().clone()
    loss1 = matcher(x_real, y_real, first, y_syn)
    value1 = loss1.detach().clone()
    matcher(x_real, y_real, second, y_syn)
    assert torch.equal(first.detach(), kept)  # the graph copies into its own input buffers
    assert torch.equal(loss1.detach(), value1)  # an earlier output is not rewritten by a replay
