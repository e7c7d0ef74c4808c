"""norm_relu_pool (instance norm → ReLU → 2×2 average pool, forward only) against the modules it
replaces, and its use on DistributionMatcher's real side."""
import pytest
import torch
from torch import nn

import ddfast
from ddfast.models import ConvNet
from ddfast.ops.norm_relu_pool import embed_plan, norm_relu_pool_reference, run_plan

from conftest import require_backend

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _modules(c, pool, affine=True):
    layers = [nn.GroupNorm(c, c, affine=affine), nn.ReLU(inplace=True)] + ([nn.AvgPool2d(2)] if pool else [])
    return nn.Sequential(*layers)


def test_reference_is_the_modules():
    x = torch.randn(3, 4, 8, 6, dtype=torch.float64)
    m = _modules(4, True).double()
    nn.init.normal_(m[0].weight)
    nn.init.normal_(m[0].bias)
    with torch.no_grad():
        torch.testing.assert_close(norm_relu_pool_reference(x, m[0].weight, m[0].bias, 1e-5, True), m(x.clone()),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,pool", [((3, 5, 8, 12), True), ((2, 3, 7, 5), False), ((1, 1, 2, 2), True),
                                        ((2, 4, 32, 32), True), ((2, 3, 6, 6), True), ((1, 2, 64, 64), True)])
def test_triton_equals_reference(device, dtype, shape, pool):
    backend = require_backend("norm_relu_pool", "triton", device)
    if device == "cpu" and dtype == torch.bfloat16 and shape[2] * shape[3] > 1024:
        pytest.skip("not applicable: large bf16 planes are slow in the interpreter and add nothing")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 30 + 7).to(device=device, dtype=dtype)  # large offset and scale
    w = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    b = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        for weight, bias in ((w, b), (None, None)):
            got = ddfast.norm_relu_pool(x, weight, bias, 1e-5, pool, backend=backend)
            want = norm_relu_pool_reference(x.double(), None if weight is None else weight.double(),
                                            None if bias is None else bias.double(), 1e-5, pool)
            assert got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got.double(), want, **TOL[dtype])


def test_triton_takes_non_contiguous_empty_and_unfit_inputs(device):
    backend = require_backend("norm_relu_pool", "triton", device)
    x = torch.randn(2, 6, 8, 8, device=device).transpose(2, 3)[:, ::2]  # strided view
    w, b = torch.randn(3, device=device), torch.randn(3, device=device)
    with torch.no_grad():
        torch.testing.assert_close(ddfast.norm_relu_pool(x, w, b, 1e-5, True, backend=backend),
                                   norm_relu_pool_reference(x, w, b, 1e-5, True), **TOL[torch.float32])
        assert ddfast.norm_relu_pool(torch.empty(0, 3, 4, 4, device=device), w, b, backend=backend).shape == (0, 3, 2, 2)
        odd = torch.randn(2, 3, 5, 4, device=device)  # odd height with pool: the reference runs (floor)
        torch.testing.assert_close(ddfast.norm_relu_pool(odd, w, b, 1e-5, True, backend=backend),
                                   norm_relu_pool_reference(odd, w, b, 1e-5, True))
        big = torch.randn(1, 3, 70, 70, device=device)  # a plane past one program: the reference runs
        torch.testing.assert_close(ddfast.norm_relu_pool(big, w, b, 1e-5, True, backend=backend),
                                   norm_relu_pool_reference(big, w, b, 1e-5, True))


def test_bad_input():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="x"):
        ddfast.norm_relu_pool(x.long())
    with pytest.raises(ValueError, match="x must be"):
        ddfast.norm_relu_pool(torch.randn(2, 3, 4, 4, 1))
    with pytest.raises(ValueError, match="weight and bias"):
        ddfast.norm_relu_pool(x, torch.ones(3), None)
    with pytest.raises(ValueError, match="weight and bias must be"):
        ddfast.norm_relu_pool(x, torch.ones(4), torch.ones(4))


def _convnet_embed(depth=2, width=4):
    """DM's embedding of DC's ConvNet (features, flattened), with random norm affine parameters."""
    torch.manual_seed(0)
    net = ConvNet(3, 3, width=width, depth=depth, im_size=(8, 8))
    embed = nn.Sequential(net.features, nn.Flatten())
    for p in embed.parameters():
        if p.dim() == 1:
            nn.init.normal_(p)
        p.requires_grad_(False)
    return embed


def test_plan_fuses_the_convnet_blocks_and_equals_the_embedding():
    backend = require_backend("norm_relu_pool", "triton", "cpu")
    embed = _convnet_embed()
    plan = embed_plan(embed)
    assert [type(s).__name__ for s in plan] == ["_BiaslessConv", "_FusedBlock", "_BiaslessConv", "_FusedBlock",
                                                "Flatten"]
    x = torch.randn(5, 3, 8, 8) * 4
    with torch.no_grad():
        torch.testing.assert_close(run_plan(plan, x, backend), embed(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run_plan(plan, x[:, :, :7, :7], backend), embed(x[:, :, :7, :7]))  # odd maps


def test_conv_bias_before_an_instance_norm_is_dropped_exactly():
    """The instance norm subtracts each plane's mean: a conv bias before it (here 50, against unit
    activations) changes neither the output nor the input gradient, so the plan skips its add.
    A bias that needs a gradient is kept; other convs keep theirs."""
    backend = require_backend("norm_relu_pool", "triton", "cpu")
    embed = _convnet_embed().double()
    with torch.no_grad():
        embed[0][0].bias.fill_(50.0)
    plan = embed_plan(embed)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    got = run_plan(plan, x, backend)
    want = embed(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    up = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, up)[0], torch.autograd.grad(want, x, up)[0],
                               rtol=1e-9, atol=1e-10)
    conv = plan[0].conv
    conv.bias.requires_grad_(True)  # a trained bias: kept, and its (zero) gradient flows
    out = plan[0](x)
    assert out.grad_fn is not None and torch.equal(out, conv(x))
    gb, = torch.autograd.grad(run_plan(plan, x, "torch").sum(), conv.bias)
    assert gb.abs().max() < 1e-8
    assert not isinstance(embed_plan(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
                                                   nn.GroupNorm(4, 4), nn.ReLU()))[0], type(plan[0]))


def test_plan_leaves_hooked_blocks_and_other_embeddings_alone():
    embed = _convnet_embed()
    handle = embed[0][1].register_forward_hook(lambda *a: None)  # the first norm
    plan = embed_plan(embed)
    assert [type(s).__name__ for s in plan][:4] == ["Conv2d", "GroupNorm", "ReLU", "AvgPool2d"]
    handle.remove()
    assert embed_plan(lambda x: x) is None
    assert embed_plan(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())) is None  # nothing to fuse
    assert embed_plan(nn.Sequential(nn.GroupNorm(1, 4), nn.ReLU())) is None  # not one group per channel


def test_distribution_matcher_with_fused_real_side_equals_the_modules():
    """backend "triton" (the interpreter here): both sides through norm_relu_pool (the synthetic
    side with its backward), the loss and the image gradient equal the matcher without fusion; a
    hook added later is honoured."""
    require_backend("norm_relu_pool", "triton", "cpu")
    embed = _convnet_embed()
    g = torch.Generator().manual_seed(1)
    x_real, y_real = torch.randn(12, 3, 8, 8, generator=g), torch.arange(3).repeat(4)
    x_syn, y_syn = torch.randn(6, 3, 8, 8, generator=g), torch.arange(3).repeat_interleave(2)

    def run(matcher):
        x = x_syn.clone().requires_grad_(True)
        loss = matcher(x_real, y_real, x, y_syn)
        loss.backward()
        return loss.detach(), x.grad

    fused = ddfast.DistributionMatcher(embed, 3, backend="triton")
    plain = ddfast.DistributionMatcher(embed, 3, backend="triton", fuse_real=False)
    got, want = run(fused), run(plain)
    assert fused._plan[1] is not None and plain._plan is None
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    seen = []
    handle = embed[0][1].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    run(fused)
    handle.remove()
    assert 12 in seen  # the real batch went through the hooked norm module
    with pytest.raises(TypeError, match="fuse_real"):
        ddfast.DistributionMatcher(embed, 3, fuse_real="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,pool", [((3, 5, 8, 12), True), ((2, 3, 7, 5), False), ((1, 1, 2, 2), True),
                                        ((2, 4, 32, 32), True)])
def test_triton_input_gradient_equals_reference(device, dtype, shape, pool):
    """dx from the fused backward (statistics recomputed from x) against autograd of the modules
    in float64; the output gradient is non-contiguous."""
    backend = require_backend("norm_relu_pool", "triton", device)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(*shape, generator=g) * 30 + 7).to(device=device, dtype=dtype)
    w = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    b = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    out_shape = (shape[0], shape[1], shape[2] // 2, shape[3] // 2) if pool else shape
    grad = torch.randn(*reversed(out_shape), generator=g).to(device=device, dtype=dtype).permute(3, 2, 1, 0)
    for weight, bias in ((w, b), (None, None)):
        xg = x.clone().requires_grad_(True)
        dx, = torch.autograd.grad(ddfast.norm_relu_pool(xg, weight, bias, 1e-5, pool, backend=backend), xg, grad)
        xd = x.double().requires_grad_(True)
        want = norm_relu_pool_reference(xd, None if weight is None else weight.double(),
                                        None if bias is None else bias.double(), 1e-5, pool)
        dx_want, = torch.autograd.grad(want, xd, grad.double())
        assert dx.dtype == dtype
        scale = dx_want.abs().max().item()
        tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2}[dtype]
        assert (dx.double() - dx_want).abs().max().item() <= tol * scale


def test_triton_gradcheck_and_affine_gradients_take_the_reference():
    backend = require_backend("norm_relu_pool", "triton", "cpu")
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ddfast.norm_relu_pool(t, w, b, 1e-5, True, backend=backend), (x,))
    wg = w.clone().requires_grad_(True)  # γ needs a gradient: the modules' path gives it
    out = ddfast.norm_relu_pool(x, wg, b, 1e-5, True, backend=backend)
    gw, = torch.autograd.grad(out.sum(), wg)
    gw_want, = torch.autograd.grad(norm_relu_pool_reference(x, wg, b, 1e-5, True).sum(), wg)
    torch.testing.assert_close(gw, gw_want)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def ieee_convolutions():
    """fp32 convolutions without TF32 (cuDNN's default rounds their operands to 10 mantissa bits)."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    conv.fp32_precision = "ieee"
    yield
    conv.fp32_precision = saved


@cuda
@pytest.mark.parametrize("matcher", ["dc", "dm"])
def test_cuda_matchers_with_fused_blocks_equal_the_modules(matcher, ieee_convolutions):
    """On CUDA the default (backend "auto") fuses: DC's segmented real side and both DM sides give
    the loss and image gradient of the unfused step, in fp32, at a CIFAR-like size (ConvNet-3 on
    32×32: 32×32, 16×16 and 8×8 planes). Convolutions in IEEE fp32: under TF32 (the H200 run of
    2026-11-26) 0.9 % of DC's image gradient differed by up to 1e-4 of its largest entry; an fp32
    rounding difference at a convolution's input can move its TF32 output by 1e-3 relative, which
    this comparison of the norm kernels is not about (not yet rerun on a GPU)."""
    torch.manual_seed(0)
    net = ConvNet(3, 10, width=16, depth=3, im_size=(32, 32)).cuda()
    for m in net.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    g = torch.Generator().manual_seed(1)
    x_real = torch.randn(80, 3, 32, 32, generator=g).cuda()
    y_real = torch.arange(10).repeat(8).cuda()
    x_syn = torch.randn(20, 3, 32, 32, generator=g).cuda()
    y_syn = torch.arange(10).repeat_interleave(2).cuda()

    def run(fuse):
        x = x_syn.clone().requires_grad_(True)
        if matcher == "dc":
            m = ddfast.GradientMatcher(net, strategy="segmented", fuse_real=fuse)
            assert m._fuses(x.device) == fuse
        else:
            embed = nn.Sequential(net.features, nn.Flatten())
            for p in embed.parameters():
                p.requires_grad_(False)
            m = ddfast.DistributionMatcher(embed, 10, fuse_real=fuse)
        loss = m(x_real, y_real, x, y_syn)
        loss.backward()
        return loss.detach(), x.grad

    got, want = run(True), run(False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-3, atol=1e-5 * want[1].abs().max().item())


def test_a_global_compiled_backend_turns_fusion_off_without_a_warning(recwarn):
    """set_backend("cuda"/"cpp") asks for the compiled kernels, which norm_relu_pool lacks: the
    matchers keep the modules instead of falling back to Triton with a warning."""
    embed = _convnet_embed()
    previous = ddfast.get_backend()
    ddfast.set_backend("cpp")
    try:
        assert ddfast.DistributionMatcher(embed, 3)._fusion_plan(torch.device("cpu")) is None
        assert not ddfast.GradientMatcher(ConvNet(3, 3, width=4, depth=2, im_size=(8, 8)))._fuses(torch.device("cpu"))
    finally:
        ddfast.set_backend(previous)
    assert not [w for w in recwarn if "norm_relu_pool" in str(w.message)]


def test_a_failing_kernel_warns_once_and_the_reference_runs(monkeypatch):
    """A Triton kernel that does not build or launch (e.g. an older Triton on the GPU machine) must
    not stop DC/DM steps: one warning, the reason kept, the reference's values and gradient."""
    from ddfast.kernels import norm_relu_pool as kernels
    from ddfast.ops import norm_relu_pool as op

    backend = require_backend("norm_relu_pool", "triton", "cpu")
    monkeypatch.setattr(op, "triton_failure", None)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    out = ddfast.norm_relu_pool(x, w, b, 1e-5, True, backend=backend)  # forward by the kernel

    def broken(*args, **kwargs):
        raise RuntimeError("PTX not supported")
    monkeypatch.setattr(kernels, "norm_relu_pool_backward", broken)
    with pytest.warns(RuntimeWarning, match="PTX not supported"):
        dx, = torch.autograd.grad(out.sum(), x)
    dx_want, = torch.autograd.grad(norm_relu_pool_reference(x, w, b, 1e-5, True).sum(), x)
    torch.testing.assert_close(dx, dx_want)
    monkeypatch.setattr(kernels, "norm_relu_pool", broken)
    import warnings as _warnings
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")  # no second warning: the reference runs directly
        got = ddfast.norm_relu_pool(x, w, b, 1e-5, True, backend=backend)
    torch.testing.assert_close(got, norm_relu_pool_reference(x, w, b, 1e-5, True))
    assert "PTX not supported" in op.triton_failure
    monkeypatch.setattr(op, "triton_failure", None)  # a forward that fails first: the same
    with pytest.warns(RuntimeWarning, match="PTX not supported"):
        got = ddfast.norm_relu_pool(x, w, b, 1e-5, True, backend=backend)
    torch.testing.assert_close(got, norm_relu_pool_reference(x, w, b, 1e-5, True))


@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_float64_keeps_eps_exact_where_it_dominates_the_variance(device, eps):
    """Planes of variance ≪ eps: 1/σ is 1/√eps to first order, so an eps rounded to fp32 (what
    Triton makes of a Python float argument on a GPU) errs by ~1e-9 relative in float64. Zero-mean
    planes: no cancellation in x − mean, so the exact eps shows at 1e-12. (The interpreter keeps
    Python floats: the GPU run and the compile gate's signature check catch the fp32 typing.)"""
    backend = require_backend("norm_relu_pool", "triton", device)
    g = torch.Generator().manual_seed(3)
    x = (1e-6 * torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)).to(device).requires_grad_(True)
    w = torch.randn(3, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(3, generator=g, dtype=torch.float64).to(device)
    up = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64).to(device)
    got = ddfast.norm_relu_pool(x, w, b, eps, True, backend=backend)
    want = norm_relu_pool_reference(x, w, b, eps, True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())
    (gx,), (wx,) = torch.autograd.grad(got, x, up), torch.autograd.grad(want, x, up)
    torch.testing.assert_close(gx, wx, rtol=1e-12, atol=1e-12 * wx.abs().max().item())
