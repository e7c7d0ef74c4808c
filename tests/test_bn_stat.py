"""bn_stat_loss against SRe2L's BNFeatureHook formula, and BNStatMatcher against hooks written that way."""
import pytest
import torch
from torch import nn

import ddfast
from ddfast.ops.bn_stat import bn_stat_loss_reference

from conftest import LaunchSpy, require_backend, tol

OP = "bn_stat"


def _inputs(shape, device, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7) * scale
    rm = torch.randn(c, generator=g, dtype=torch.float64) * scale
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5) * scale * scale
    return x.to(device=device, dtype=dtype), rm.to(device), rv.to(device)


def _sre2l_hook_loss(x, rm, rv):
    """SRe2L BNFeatureHook.hook_fn for 4-D inputs."""
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
    return torch.norm(rm - mean, 2) + torch.norm(rv - var, 2)


def _compare(x, rm, rv, backend, device, dtype=torch.float32):
    x_new = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    got = ddfast.bn_stat_loss(x_new, rm.to(dtype), rv.to(dtype), backend=backend)
    want = bn_stat_loss_reference(x_ref, rm.to(dtype), rv.to(dtype))
    got.backward()
    want.backward()
    assert got.shape == () and got.dtype == dtype
    torch.testing.assert_close(got, want, **tol(device, dtype))
    torch.testing.assert_close(x_new.grad, x_ref.grad, **tol(device, dtype))


# (6, 2, 40, 40): several forward splits per channel (Triton: 3, whose last arrival merges) and more
# backward tiles than programs; (2, 130, 3): more channels than one block of the loss sum
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 7, 9, 11), (17, 5), (3, 4, 13), (2, 3, 2, 3, 4), (6, 2, 40, 40),
                                   (2, 130, 3)])
def test_matches_reference(device, backend_kind, shape):
    backend = require_backend(OP, backend_kind, device)
    _compare(*_inputs(shape, device), backend, device)


def test_reference_is_sre2l_hook():
    x, rm, rv = _inputs((5, 4, 3, 3), "cpu", dtype=torch.float64)
    torch.testing.assert_close(bn_stat_loss_reference(x, rm, rv), _sre2l_hook_loss(x, rm, rv))


def test_noncontiguous_channels_last(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, rm, rv = _inputs((3, 6, 5, 7), device)
    x = x.to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    _compare(x, rm, rv, backend, device)


def test_gradcheck_float64(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, rm, rv = _inputs((3, 4, 2, 3), device, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ddfast.bn_stat_loss(t, rm, rv, backend=backend), (x,))


def test_stats_equal_running_stats_give_zero_and_finite_grad(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, _, _ = _inputs((4, 3, 5, 5), device, dtype=torch.float64)
    flat = x.transpose(0, 1).reshape(3, -1)
    x.requires_grad_(True)
    loss = ddfast.bn_stat_loss(x, flat.mean(1), flat.var(1, unbiased=False), backend=backend)
    loss.backward()
    assert loss.abs() < 1e-12
    assert torch.isfinite(x.grad).all()


def test_large_offset_and_values(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    # a mean far above the spread: E[x²] − E[x]² in fp32 would lose the variance entirely
    x, rm, rv = _inputs((8, 3, 16, 16), device)
    x = x + 1e4
    got = ddfast.bn_stat_loss(x, rm + 1e4, rv, backend=backend)
    want = bn_stat_loss_reference(x.double(), (rm + 1e4).double(), rv.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # the fp32 reference overflows in its norms from ~1e10 on; the kernels take the norms in fp64
    for scale in (1e9,) if backend == "torch" else (1e9, 1e15):
        x, rm, rv = _inputs((4, 3, 8, 8), device, scale=scale)
        got = ddfast.bn_stat_loss(x, rm.float(), rv.float(), backend=backend)
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), bn_stat_loss_reference(x.double(), rm, rv), rtol=1e-4, atol=0)


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("kind", ["triton", "compiled"])
def test_loss_has_no_cancellation_when_x_is_near_a_large_running_mean(device, kind, seed):
    """x ≈ running_mean ≈ 1e3 in fp32: the loss measures μ − rm, which an fp32 μ rounded at 1e3
    gives only to ~3e-5 (the fp32 reference's error here is 3e-5 to 1e-4). The Triton kernel
    accumulates x − rm_c and the C++ CPU kernel shifted fp64 sums, so both are within 5e-6 of
    float64. (The CUDA C++ kernel rounds μ first: not covered.)"""
    if kind == "compiled" and device != "cpu":
        pytest.skip("the CUDA C++ kernel's loss takes the deviation from the rounded fp32 mean")
    backend = require_backend(OP, kind, device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64) * 2 + 1e3
    rm = torch.randn(6, generator=g, dtype=torch.float64) + 1e3
    rv = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    x32, rm32, rv32 = (t.float().to(device) for t in (x, rm, rv))
    truth = bn_stat_loss_reference(x32.double(), rm32.double(), rv32.double())
    got = ddfast.bn_stat_loss(x32, rm32, rv32, backend=backend)
    assert abs(float(got.double() - truth)) < 5e-6, (float(got), float(truth))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(device, backend_kind, dtype):
    if backend_kind == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter runs fp32 only")
    backend = require_backend(OP, backend_kind, device)
    x, rm, rv = _inputs((8, 4, 12, 12), device, dtype=dtype)
    x.requires_grad_(True)
    got = ddfast.bn_stat_loss(x, rm.float(), rv.float(), backend=backend)
    got.backward()
    x32 = x.detach().float().requires_grad_(True)
    want = bn_stat_loss_reference(x32, rm.float(), rv.float())
    want.backward()
    assert got.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(got, want, **tol(device, dtype))
    torch.testing.assert_close(x.grad.float(), x32.grad, **tol(device, dtype))


def test_opcheck_compiled_and_triton(device):
    for kind in ("compiled", "triton"):
        try:
            backend = require_backend(OP, kind, device)
        except pytest.skip.Exception:
            continue
        x, rm, rv = _inputs((3, 4, 10), device)
        x.requires_grad_(True)
        name = "bn_stat_triton_fwd" if backend == "triton" else "bn_stat_fwd"
        torch.library.opcheck(getattr(torch.ops.ddfast, name), (x, rm.float(), rv.float()))


@pytest.mark.parametrize("bad, err, match", [
    (lambda x, m, v: (x, m[:-1], v), ValueError, "running_mean"),
    (lambda x, m, v: (x, m, v[None]), ValueError, "running_var"),
    (lambda x, m, v: (x.long(), m, v), TypeError, "x"),
    (lambda x, m, v: (x[0, 0, 0], m, v), ValueError, "x"),
    (lambda x, m, v: (x[:0], m, v), ValueError, "x"),
    (lambda x, m, v: (x, m.long(), v), TypeError, "running_mean"),
])
def test_bad_input(bad, err, match):
    x, rm, rv = _inputs((3, 4, 5, 5), "cpu")
    with pytest.raises(err, match=match):
        ddfast.bn_stat_loss(*bad(x, rm.float(), rv.float()))


def test_nan_input_is_named(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, rm, rv = _inputs((3, 4, 5, 5), device)
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        ddfast.bn_stat_loss(x, rm.float(), rv.float(), backend=backend)


# --- one launch each way: the last-program epilogue and its arrival counters ---------------------

def test_triton_forward_and_backward_launch_one_kernel_each(monkeypatch, device):
    from ddfast.kernels import bn_stat as kernels

    backend = require_backend(OP, "triton", device)
    log = []
    for name in ("_bn_forward_kernel", "_bn_backward_kernel"):
        monkeypatch.setattr(kernels, name, LaunchSpy(name, getattr(kernels, name), log))
    x, rm, rv = _inputs((6, 2, 40, 40), device)  # 3 splits per channel, 24 backward tiles
    x.requires_grad_(True)
    loss = ddfast.bn_stat_loss(x, rm.float(), rv.float(), backend=backend)
    assert log == ["_bn_forward_kernel"]
    loss.backward()
    assert log == ["_bn_forward_kernel", "_bn_backward_kernel"]
    torch.testing.assert_close(loss, bn_stat_loss_reference(x.detach(), rm.float(), rv.float()),
                               **tol(device, torch.float32))


def test_triton_counters_return_to_zero_and_results_repeat_bitwise(device):
    from ddfast.kernels._common import arrival_counters
    from ddfast.kernels.bn_stat import bn_stat_backward, bn_stat_forward

    require_backend(OP, "triton", device)
    x, rm, rv = _inputs((1, 3, 20000), device)  # 5 splits per channel arrive at each counter
    rm, rv = rm.float(), rv.float()
    counters = torch.zeros(4, dtype=torch.int32, device=device)
    first = bn_stat_forward(x, rm, rv, counters=counters)
    assert torch.equal(counters, torch.zeros_like(counters))
    second = bn_stat_forward(x, rm, rv, counters=counters)
    assert torch.equal(counters, torch.zeros_like(counters))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    default = bn_stat_forward(x, rm, rv)  # the shared counters (cached per stream on CUDA)
    assert torch.equal(default[0], first[0])
    if device == "cuda":  # on CPU arrival_counters hands out fresh zeros, so only CUDA can fail here
        assert not arrival_counters(4, torch.device(device)).any()
    # the counters drive which program folds: with counts no arrival can complete, every program
    # bumps its channel's counter and none folds, so the loss counter is never touched (on a GPU a
    # fold fired one arrival early may still read every partial, so a value check would be a race)
    never = 1 << 20
    stale = torch.full((4,), never, dtype=torch.int32, device=device)
    bn_stat_forward(x, rm, rv, counters=stale)
    assert bool((stale[:3] > never).all()) and int(stale[3]) == never, stale
    if device == "cpu":  # the interpreter runs programs in order: an early fold misses a partial
        stale = torch.ones(4, dtype=torch.int32, device=device)
        wrong = bn_stat_forward(x, rm, rv, counters=stale)
        assert not torch.equal(wrong[0], first[0]), "the counters must drive which program folds the loss"
    tolerance = tol(device, torch.float32)
    torch.testing.assert_close(first[0], bn_stat_loss_reference(x, rm, rv), **tolerance)
    torch.testing.assert_close(first[1], x.mean((0, 2)), **tolerance)
    torch.testing.assert_close(first[2], x.var((0, 2), unbiased=False), **tolerance)
    grad = torch.tensor(0.75, device=device)
    g1 = bn_stat_backward(grad, x, rm, rv, first[1], first[2])
    g2 = bn_stat_backward(grad, x, rm, rv, first[1], first[2])
    assert torch.equal(g1, g2)
    xr = x.clone().requires_grad_(True)
    (0.75 * bn_stat_loss_reference(xr, rm, rv)).backward()
    torch.testing.assert_close(g1, xr.grad, **tolerance)


def test_triton_backward_zero_norms_give_zero_gradient(device):
    from ddfast.kernels.bn_stat import bn_stat_backward

    require_backend(OP, "triton", device)
    x, _, _ = _inputs((3, 4, 5), device)
    mean, var = x.mean((0, 2)), x.var((0, 2), unbiased=False)
    out = bn_stat_backward(torch.tensor(1.0, device=device), x, mean, var, mean, var)  # stats = running stats
    assert torch.equal(out, torch.zeros_like(x))


# CUDA only: the compiled kernels' vector and scalar paths, the global-memory coefficients (more
# channels than the shared-memory table holds), and repeatable results
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape, offset", [((4, 3, 8, 8), 0), ((4, 3, 8, 8), 1), ((3, 5, 7, 5), 0),
                                           ((2, 5000, 3), 0), ((16, 3, 64, 64), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_paths_match_reference_and_repeat(shape, offset, dtype):
    backend = require_backend(OP, "compiled", "cuda")
    x, rm, rv = _inputs(shape, "cuda", dtype=dtype)
    if offset:  # a view 1 element into a buffer: not 16-byte aligned, the scalar paths
        x = torch.cat([x.new_zeros(offset), x.flatten()])[offset:].view(shape)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = rm.to(acc), rv.to(acc)
    grads, losses = [], []
    for _ in range(2):
        leaf = x.detach().clone().requires_grad_(True) if not offset else x.detach().requires_grad_(True)
        loss = ddfast.bn_stat_loss(leaf, rm, rv, backend=backend)
        loss.backward()
        losses.append(loss.detach())
        grads.append(leaf.grad)
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    x32 = x.detach().to(acc).requires_grad_(True)
    want = bn_stat_loss_reference(x32, rm, rv)
    want.backward()
    tolerance = tol("cuda", dtype)
    torch.testing.assert_close(losses[0], want, **tolerance)
    torch.testing.assert_close(grads[0].to(acc), x32.grad, **tolerance)


# --- BNStatMatcher -----------------------------------------------------------------------------

class _SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.bn3 = nn.BatchNorm1d(6)
        self.free = nn.BatchNorm2d(8, track_running_stats=False)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.free(x)
        return self.bn3(self.fc(x.mean((2, 3))))


def _trained_net(device, dtype=torch.float32):
    torch.manual_seed(0)
    net = _SmallNet().to(device=device, dtype=dtype)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 8, 8, device=device, dtype=dtype) * 2 + 1)
    return net.eval()


class _SRe2LHook:
    """SRe2L's BNFeatureHook (recover/utils.py), transcribed: every call overwrites r_feature."""

    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, inputs, _output):
        nch = inputs[0].shape[1]
        mean = inputs[0].mean([0, 2, 3])
        var = inputs[0].permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


def _sre2l_reference(net, x, first_bn_multiplier):
    """SRe2L recover/data_synthesis.py: hooks on the BatchNorm2d modules in model.modules() order,
    ``rescale = [first_bn_multiplier] + [1.] * (len - 1)``, loss = Σ r_feature · rescale."""
    # (a BatchNorm2d without running statistics would make SRe2L's hook fail; both leave it out)
    hooks = [_SRe2LHook(m) for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    out = net(x)
    for h in hooks:
        h.hook.remove()
    rescale = [first_bn_multiplier] + [1. for _ in range(len(hooks) - 1)]
    return out, sum([mod.r_feature * rescale[idx] for (idx, mod) in enumerate(hooks)])


def _every_call_reference(net, x, first_bn_multiplier):
    """The other rules: every BatchNorm (1d too), every call summed, the multiplier on the first call."""
    feats = []

    def hook(module, inputs, _out):
        inp = inputs[0]
        flat = inp.transpose(0, 1).reshape(inp.shape[1], -1)
        feats.append(torch.norm(module.running_mean.data - flat.mean(1), 2) +
                     torch.norm(module.running_var.data - flat.var(1, unbiased=False), 2))

    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    handles = [m.register_forward_hook(hook) for m in layers]
    out = net(x)
    for h in handles:
        h.remove()
    return out, sum(f * (first_bn_multiplier if i == 0 else 1.0) for i, f in enumerate(feats))


class _ReorderedNet(nn.Module):
    """modules() order ≠ call order (bn_late is declared first, runs second), a BatchNorm2d called
    twice (shared), a BatchNorm1d and a BatchNorm2d without running statistics."""

    def __init__(self):
        super().__init__()
        self.bn_late = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_early = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.shared = nn.BatchNorm2d(8)
        self.free = nn.BatchNorm2d(8, track_running_stats=False)
        self.fc = nn.Linear(8, 6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        x = torch.relu(self.bn_early(self.conv1(x)))
        x = torch.relu(self.bn_late(self.conv2(x)))
        x = self.shared(x)
        x = self.shared(torch.tanh(x) * 2 + 0.5)
        x = self.free(x)
        return self.bn1d(self.fc(x.mean((2, 3))))


def _trained(net_cls, device, dtype=torch.float32):
    torch.manual_seed(0)
    net = net_cls().to(device=device, dtype=dtype)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 8, 8, device=device, dtype=dtype) * 2 + 1)
    return net.eval()


def _grad_and_loss(fn, x):
    x = x.clone().requires_grad_(True)
    out, loss = fn(x)
    (loss + out.sum()).backward()
    return loss.detach(), x.grad


def test_matcher_default_is_sre2l_float64():
    net = _trained(_ReorderedNet, "cpu", torch.float64)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64) * 1.5
    with ddfast.BNStatMatcher(net, first_layer_weight=10.0) as matcher:
        assert matcher.layers == [net.bn_late, net.bn_early, net.shared]  # BatchNorm2d, modules() order
        got, g_got = _grad_and_loss(matcher, x)
        assert len(matcher.losses) == 4  # four hooked calls, the shared layer's last one kept
    want, g_want = _grad_and_loss(lambda t: _sre2l_reference(net, t, 10.0), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_matcher_other_rules_float64():
    net = _trained(_ReorderedNet, "cpu", torch.float64)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64) * 1.5
    matcher = ddfast.BNStatMatcher(net, 10.0, layers="all", first_layer="executed", repeated_calls="sum")
    got, g_got = _grad_and_loss(matcher, x)
    matcher.remove()
    want, g_want = _grad_and_loss(lambda t: _every_call_reference(net, t, 10.0), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    default, _ = _grad_and_loss(ddfast.BNStatMatcher(net, 10.0), x)
    assert abs(float(default - got)) > 1e-3  # the rules matter on this net


def test_matcher_equals_sre2l_hooks(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    net = _trained_net(device)
    x = torch.randn(6, 3, 8, 8, device=device)
    x_new, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with ddfast.BNStatMatcher(net, first_layer_weight=10.0, backend=backend) as matcher:
        assert len(matcher.layers) == 2  # bn3 is a BatchNorm1d, `free` has no running statistics
        out, loss = matcher(x_new)
        (loss + out.sum()).backward()
        assert len(matcher.losses) == 2
        net(x_new.detach())  # a new forward starts a fresh list
        assert len(matcher.losses) == 2
    net(x_new.detach())
    assert len(matcher.losses) == 2  # hooks removed: nothing appended
    out_ref, loss_ref = _sre2l_reference(net, x_ref, 10.0)
    (loss_ref + out_ref.sum()).backward()
    torch.testing.assert_close(loss, loss_ref, **tol(device, torch.float32))
    torch.testing.assert_close(x_new.grad, x_ref.grad, **tol(device, torch.float32))


def test_matcher_bad_input():
    with pytest.raises(TypeError, match="model"):
        ddfast.BNStatMatcher(lambda x: x)
    with pytest.raises(ValueError, match="BatchNorm"):
        ddfast.BNStatMatcher(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="BatchNorm2d"):
        ddfast.BNStatMatcher(nn.BatchNorm1d(3))
    for option in ("layers", "first_layer", "repeated_calls"):
        with pytest.raises(ValueError, match=option):
            ddfast.BNStatMatcher(_SmallNet(), **{option: "bogus"})
    matcher = ddfast.BNStatMatcher(_SmallNet())
    with pytest.raises(RuntimeError, match="forward"):
        matcher.loss()


@pytest.mark.parametrize("backend_kind", ["torch", "compiled", "triton"])
def test_no_host_sync_after_warm_up(device, backend_kind):
    """bn_stat_loss and a BNStatMatcher forward + backward: 0 host syncs once warmed up."""
    from ddfast._sync import count_syncs

    if backend_kind == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter reads tensors on the host by design")
    backend = require_backend(OP, backend_kind, device)
    x, rm, rv = _inputs((4, 3, 5, 5), device)
    x.requires_grad_(True)
    net = _trained_net(device)
    matcher = ddfast.BNStatMatcher(net, first_layer_weight=3.0, backend=backend)
    images = torch.randn(4, 3, 8, 8, device=device, requires_grad=True)

    def step():
        ddfast.bn_stat_loss(x, rm.float(), rv.float(), backend=backend).backward()
        _, loss = matcher(images)
        loss.backward()

    step()  # warm-up
    with count_syncs() as syncs:
        step()
    assert syncs.count == 0, syncs.events


# --- bn_stat_loss_sum and the deferred matcher loss ------------------------------------------

def _layers(device, dtype=torch.float32, shapes=((4, 3, 5, 6), (17, 5), (2, 3, 2, 3, 4), (1, 7, 9, 11))):
    out = [_inputs(sh, device, dtype, seed=i) for i, sh in enumerate(shapes)]
    xs = [x.requires_grad_(True) for x, _, _ in out]
    return xs, [rm.to(dtype) for _, rm, _ in out], [rv.to(dtype) for _, _, rv in out]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_equals_weighted_sum_of_the_reference(device, backend_kind, dtype):
    backend = require_backend(OP, backend_kind, device)
    xs, rms, rvs = _layers(device, dtype)
    weights = [10.0, 1.0, 0.25, 1.0]
    got = ddfast.bn_stat_loss_sum(xs, rms, rvs, weights, backend=backend)
    g_got = torch.autograd.grad(got, xs)
    want = sum(w * bn_stat_loss_reference(x, rm, rv) for x, rm, rv, w in zip(xs, rms, rvs, weights))
    g_want = torch.autograd.grad(want, xs)
    assert got.shape == () and got.dtype == dtype
    t = tol(device, dtype)
    torch.testing.assert_close(got, want, **t)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **t)


def test_sum_is_bit_equal_to_the_per_layer_sum(device, backend_kind):
    """One call gives the per-layer losses summed in layer order, bit for bit (fp32), weights default 1."""
    backend = require_backend(OP, backend_kind, device)
    xs, rms, rvs = _layers(device)
    got = ddfast.bn_stat_loss_sum(xs, rms, rvs, backend=backend)
    g_got = torch.autograd.grad(got, xs)
    want = None
    for x, rm, rv in zip(xs, rms, rvs):
        loss = ddfast.bn_stat_loss(x, rm, rv, backend=backend)
        want = loss if want is None else want + loss
    g_want = torch.autograd.grad(want, xs)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(g_got, g_want))


def test_sum_gradcheck_float64(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    xs, rms, rvs = _layers(device, torch.float64, shapes=((3, 2, 2, 3), (5, 3)))
    assert torch.autograd.gradcheck(lambda a, b: ddfast.bn_stat_loss_sum([a, b], rms, rvs, [2.0, 1.0],
                                                                         backend=backend), tuple(xs))


def test_sum_noncontiguous_single_layer_and_mixed_dtypes(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, rm, rv = _inputs((4, 6, 5, 5), device)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_(True)
    got = ddfast.bn_stat_loss_sum([x_cl], [rm.float()], [rv.float()], [3.0], backend=backend)
    torch.testing.assert_close(got, 3.0 * bn_stat_loss_reference(x, rm.float(), rv.float()), **tol(device, torch.float32))
    # an fp32 layer with float64 statistics promotes the sum to float64, as bn_stat_loss does
    y, rm2, rv2 = _inputs((3, 2, 4), device)
    mixed = ddfast.bn_stat_loss_sum([x_cl, y], [rm.float(), rm2], [rv.float(), rv2], backend=backend)
    assert mixed.dtype == torch.float64


@pytest.mark.parametrize("bad, err, match", [
    (lambda x, rm, rv: ddfast.bn_stat_loss_sum(x, [rm], [rv]), TypeError, "xs must be a list"),
    (lambda x, rm, rv: ddfast.bn_stat_loss_sum([], [], []), ValueError, "xs is empty"),
    (lambda x, rm, rv: ddfast.bn_stat_loss_sum([x, x], [rm], [rv, rv]), ValueError, "one entry per layer"),
    (lambda x, rm, rv: ddfast.bn_stat_loss_sum([x], [rm], [rv], weights=2.0), TypeError, "weights must be a list"),
    (lambda x, rm, rv: ddfast.bn_stat_loss_sum([x], [rm], [rv], weights=["a"]), TypeError, r"weights\[0\]"),
    (lambda x, rm, rv: ddfast.bn_stat_loss_sum([x], [rm[:2]], [rv]), ValueError, r"running_means\[0\]"),
    (lambda x, rm, rv: ddfast.bn_stat_loss_sum([x, x[0]], [rm, rm], [rv, rv]), ValueError, r"xs\[1\]"),
    (lambda x, rm, rv: ddfast.bn_stat_loss_sum([x, x.long()], [rm, rm], [rv, rv]), TypeError, r"xs\[1\]"),
])
def test_sum_bad_input(bad, err, match):
    x, rm, rv = _inputs((4, 3, 5, 5), "cpu")
    with pytest.raises(err, match=match):
        bad(x, rm, rv)


def test_sum_on_two_devices_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, rm, rv = _inputs((4, 3, 5, 5), "cpu")
    with pytest.raises(ValueError, match="one device"):
        ddfast.bn_stat_loss_sum([x, x.cuda()], [rm, rm.cuda()], [rv, rv.cuda()])


def test_matcher_loss_is_one_call_and_bit_equal_to_the_per_layer_losses(device, backend_kind):
    """A recover step (images that require grad): the hooks only record, loss() is one
    bn_stat_loss_sum (with compiled kernels one C++ node whatever the depth), bit-equal (fp32) to
    summing the per-call losses with the first layer weighted."""
    backend = require_backend(OP, backend_kind, device)
    net = _trained(_ReorderedNet, device)
    x = torch.randn(5, 3, 8, 8, device=device, requires_grad=True)
    with ddfast.BNStatMatcher(net, first_layer_weight=10.0, backend=backend) as matcher:
        net(x)
        loss = matcher.loss()
        per_call = matcher.losses  # four calls; the shared layer's second one is kept
        g = torch.autograd.grad(loss, x, retain_graph=True)[0]
    if backend_kind == "compiled":
        assert "BnStatSumEager" in loss.grad_fn.name()
    kept = {index: value for (index, _), value in zip(matcher.calls, per_call)}  # a layer's last call
    want = None
    for index in sorted(kept):
        term = kept[index] * 10.0 if index == 0 else kept[index]
        want = term if want is None else want + term
    assert torch.equal(loss, want)
    assert torch.equal(g, torch.autograd.grad(want, x)[0])


def test_matcher_without_grad_keeps_no_activation():
    net = _trained_net("cpu")
    matcher = ddfast.BNStatMatcher(net)
    with torch.no_grad():
        net(torch.randn(4, 3, 8, 8))
    assert all(isinstance(entry, torch.Tensor) for _, entry in matcher.calls)  # losses, not inputs
    net.requires_grad_(False)  # a frozen teacher and plain inputs: no BatchNorm input needs grad
    net(torch.randn(4, 3, 8, 8))
    assert all(isinstance(entry, torch.Tensor) for _, entry in matcher.calls)
    with_grad = torch.randn(4, 3, 8, 8, requires_grad=True)
    net(with_grad)
    assert not any(isinstance(entry, torch.Tensor) for _, entry in matcher.calls)
    matcher.remove()


def test_matcher_refuses_an_input_modified_in_place_after_the_forward():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv(x)
            out = self.bn(h)
            h.mul_(2)  # the BatchNorm's input, changed after its hook recorded it
            return out + h

    net = InPlace().eval()
    with ddfast.BNStatMatcher(net) as matcher:
        net(torch.randn(2, 3, 5, 5, requires_grad=True))
        with pytest.raises(RuntimeError, match="modified in place"):
            matcher.loss()


def test_matcher_train_mode_uses_each_call_s_running_statistics():
    """Train mode moves the running statistics at every call: a layer called twice is matched to the
    statistics as they were after each call, as the per-call hooks of the former matcher computed."""
    net = _trained(_ReorderedNet, "cpu", torch.float64).train()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    expected = []

    def hook(module, inputs, _out):
        expected.append(bn_stat_loss_reference(inputs[0], module.running_mean.clone(), module.running_var.clone()))

    handle = net.shared.register_forward_hook(hook)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with ddfast.BNStatMatcher(net, repeated_calls="sum") as matcher:
        net(x)
        got = matcher.loss()
    handle.remove()
    net.load_state_dict(state)
    with ddfast.BNStatMatcher(net, repeated_calls="sum") as plain:
        with torch.no_grad():
            net(x)  # computed at once (no grad): the reference of the deferred path
        want = plain.loss()
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
    shared = [v for (i, _), v in zip(matcher.calls, matcher.losses) if matcher.layers[i] is net.shared]
    torch.testing.assert_close(torch.stack(shared).detach(), torch.stack(expected).detach(), rtol=1e-12, atol=1e-12)


def test_bn_matcher_host_tool_runs():
    """bench/bn_matcher_host.py (the README's host-time numbers) runs and times every variant."""
    from ddfast.bench.bn_matcher_host import measure

    layers, best = measure(batch=1, size=16, width=4, rounds=1, calls=1)
    assert layers == 20 and set(best) == {"plain", "per-layer", "matcher", "fused", "sre2l"}
    assert all(0 < v < float("inf") for v in best.values())
