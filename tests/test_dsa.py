"""ddfast.dsa_augment: grouped output == per-group DiffAugment calls, gradients, kernels, bad input."""
import pytest
import torch

import ddfast
from ddfast.compat import dc, mtt
from ddfast.ops import dsa

from conftest import require_backend, tol

OP = "dsa"
STRATEGY = "color_crop_cutout_flip_scale_rotate"
ALIGN = {False: dc, True: mtt}


def _images(n, c=3, h=32, w=32, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=dtype).to(device)


def _param(mode):
    p = dc.ParamDiffAug()
    p.aug_mode = mode
    return p


def _per_group(x, groups, strategy, seeds, align, mode, backend="torch"):
    """The reference way: one DiffAugment call per group."""
    out = torch.empty_like(x)
    for g, seed in enumerate(seeds):
        idx = torch.nonzero(groups.cpu() == g).flatten().to(x.device)
        if idx.numel():
            out[idx] = ALIGN[align].DiffAugment(x[idx], strategy, seed, _param(mode), backend=backend)
    return out


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("mode", ["S", "M"])
@pytest.mark.parametrize("strategy", ["color", "crop", "cutout", "flip", "scale", "rotate", STRATEGY])
def test_grouped_equals_per_group_calls_bitwise(align, mode, strategy):
    """torch backend on CPU: identical numbers (same draws, same ops)."""
    x = _images(23, h=16, w=20)
    groups = torch.arange(23) % 7
    seeds = [0, 13, 400, 7, 99999, 5, 2**31]
    got = ddfast.dsa_augment(x, groups, strategy, seeds, align_corners=align, param=_param(mode), backend="torch")
    want = _per_group(x, groups, strategy, seeds, align, mode)
    assert torch.equal(got, want)


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("mode", ["S", "M"])
def test_grouped_kernels_equal_per_group_calls(device, backend_kind, align, mode):
    backend = require_backend(OP, backend_kind, device)
    small = backend_kind == "triton" and device == "cpu"
    n, h, w = (9, 10, 12) if small else (30, 32, 32)
    x = _images(n, h=h, w=w, device=device)
    groups = (torch.arange(n) * 7 % 5).to(device)  # interleaved groups
    for base in ((0,) if small else (0, 1000)):
        seeds = [base + 17 * g for g in range(5)]
        got = ddfast.dsa_augment(x, groups, STRATEGY, seeds, align_corners=align, param=_param(mode), backend=backend)
        want = _per_group(x, groups, STRATEGY, seeds, align, mode)
        torch.testing.assert_close(got, want, **tol(device, torch.float32))


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (3, 1, 28, 28), (4, 3, 64, 64), (5, 3, 20, 33), (300, 3, 8, 8)])
def test_shapes_and_batch_sizes(shape):
    x = _images(*shape)
    groups = torch.arange(shape[0]) % 3
    seeds = [3, 4, 5]
    for backend in ("torch", "cpp"):
        got = ddfast.dsa_augment(x, groups, STRATEGY, seeds, param=_param("M"), backend=backend)
        want = _per_group(x, groups, STRATEGY, seeds, False, "M")
        # contrast's mean is summed in fp64 by the C++ kernel, in fp32 by torch: they differ by
        # ~1e-7·|x|, which the following bilinear steps can leave next to output values near 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_seed_minus_one_groups_draw_per_image_from_global_generator():
    x = _images(1, h=12, w=12).expand(8, -1, -1, -1).contiguous()
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    torch.manual_seed(5)
    got = ddfast.dsa_augment(x, groups, STRATEGY, [-1, -1], param=_param("M"), backend="cpp")
    torch.manual_seed(5)
    want = _per_group(x, groups, STRATEGY, [-1, -1], False, "M")
    torch.testing.assert_close(got, want, **tol("cpu", torch.float32))
    assert not torch.equal(got[0], got[1])  # identical images, independent transforms


def test_siamese_within_group_and_global_generator_untouched():
    x = _images(1, h=12, w=12).expand(6, -1, -1, -1).contiguous()
    groups = torch.tensor([0, 1, 0, 1, 0, 1])
    state = torch.random.get_rng_state()
    for rng in ("reference", "fast"):
        y = ddfast.dsa_augment(x, groups, STRATEGY, [10, 11], param=_param("M"), backend="cpp", rng=rng)
        assert torch.equal(y[0], y[2]) and torch.equal(y[0], y[4]) and torch.equal(y[1], y[5])
        assert not torch.equal(y[0], y[1])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_fast_rng_is_deterministic_and_not_the_reference_stream():
    x = _images(6, h=12, w=12)
    groups = torch.arange(6) % 3
    a = ddfast.dsa_augment(x, groups, STRATEGY, [1, 2, 3], param=_param("M"), rng="fast", backend="torch")
    b = ddfast.dsa_augment(x, groups, STRATEGY, [1, 2, 3], param=_param("M"), rng="fast", backend="cpp")
    c = ddfast.dsa_augment(x, groups, STRATEGY, [1, 2, 4], param=_param("M"), rng="fast", backend="cpp")
    ref = ddfast.dsa_augment(x, groups, STRATEGY, [1, 2, 3], param=_param("M"), backend="cpp")
    torch.testing.assert_close(a, b, **tol("cpu", torch.float32))
    assert not torch.equal(b, c) and not torch.equal(b, ref)


@pytest.mark.parametrize("align", [False, True])
def test_gradients_match_reference_autograd(device, backend_kind, align):
    backend = require_backend(OP, backend_kind, device)
    small = backend_kind == "triton" and device == "cpu"
    n, h, w = (6, 9, 11) if small else (16, 16, 16)
    x = _images(n, h=h, w=w, device=device)
    groups = (torch.arange(n) % 4).to(device)
    weight = _images(n, h=h, w=w, seed=1, device=device)
    for mode in ("S", "M"):
        seeds = [1, 2, 3, 4] if mode == "M" else [0, 1, 2, 5]
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        (_per_group(a, groups, STRATEGY, seeds, align, mode) * weight).sum().backward()
        (ddfast.dsa_augment(b, groups, STRATEGY, seeds, align_corners=align, param=_param(mode),
                            backend=backend) * weight).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5 if device == "cpu" else 1e-4)


def _one_op_params(code, n):
    ip = torch.zeros(n, 5, dtype=torch.int32)
    fp = torch.zeros(n, 6, dtype=torch.float64)
    ip[:, 0] = code
    if code == dsa.OP_COLOR:
        fp[:, :3] = torch.tensor([[0.2, 1.3, 0.8], [-0.4, 0.5, 1.2], [0.0, 1.9, 0.6]])[:n]
    elif code == dsa.OP_CROP:
        ip[:, 1:3] = torch.tensor([[1, -2], [-1, 0], [2, 3]], dtype=torch.int32)[:n]
    elif code == dsa.OP_CUTOUT:
        ip[:, 1:5] = torch.tensor([[0, 2, 1, 3], [3, 4, 0, 0], [1, 0, 0, 4]], dtype=torch.int32)[:n]
    elif code == dsa.OP_AFFINE:
        fp[:] = torch.tensor([[1.1, 0.0, 0.0, 0.0, 0.9, 0.0], [0.96, -0.27, 0.0, 0.27, 0.96, 0.0],
                              [0.8, 0.3, 0.1, -0.2, 1.15, -0.05]])[:n]
    return ip, fp


@pytest.mark.parametrize("code", [dsa.OP_IDENTITY, dsa.OP_COLOR, dsa.OP_CROP, dsa.OP_CUTOUT, dsa.OP_FLIP,
                                  dsa.OP_AFFINE])
@pytest.mark.parametrize("align", [False, True])
def test_gradcheck_float64(device, backend_kind, code, align):
    backend = require_backend(OP, backend_kind, device)
    ip, fp = _one_op_params(code, 3)
    x = _images(3, c=2, h=5, w=6, dtype=torch.float64, device=device).requires_grad_(True)
    stages = [(ip.long(), fp)]
    which = "compiled" if backend in ("cpp", "cuda") else backend
    assert torch.autograd.gradcheck(lambda t: dsa.apply_stages(t, stages, align, which), (x,),
                                    fast_mode=backend_kind == "triton")


@pytest.mark.parametrize("code", [dsa.OP_COLOR, dsa.OP_CROP, dsa.OP_CUTOUT, dsa.OP_FLIP, dsa.OP_AFFINE])
def test_each_kernel_op_matches_torch_ops_float64(device, backend_kind, code):
    backend = require_backend(OP, backend_kind, device)
    which = "compiled" if backend in ("cpp", "cuda") else backend
    ip, fp = _one_op_params(code, 3)
    x = _images(3, c=3, h=7, w=9, dtype=torch.float64, device=device)
    for align in (False, True):
        got = dsa.apply_stages(x, [(ip.long(), fp)], align, which)
        want = dsa.apply_stage_reference(x, ip.long(), fp, align)
        torch.testing.assert_close(got, want, **tol(device, torch.float64))


def test_opcheck(device):
    ip, fp = _one_op_params(dsa.OP_AFFINE, 3)
    ip[1, 0] = dsa.OP_COLOR
    ip[2, 0] = dsa.OP_CROP
    x = _images(3, c=2, h=5, w=6, device=device).requires_grad_(True)
    base = dsa.base_grid(5, 6, False, torch.float32, device)
    args = (x, ip.to(device), fp.float().to(device), base, False)
    for kind, name in (("compiled", "dsa_fwd"), ("triton", "dsa_triton_fwd")):
        try:
            require_backend(OP, kind, device)
        except pytest.skip.Exception:
            continue
        torch.library.opcheck(getattr(torch.ops.ddfast, name), args)


def test_noncontiguous_and_channels_last(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x = _images(4, h=10, w=8, device=device)
    groups = torch.tensor([0, 1, 1, 0], device=device)
    want = ddfast.dsa_augment(x, groups, STRATEGY, [4, 9], param=_param("M"), backend="torch")
    for view in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        got = ddfast.dsa_augment(view, groups, STRATEGY, [4, 9], param=_param("M"), backend=backend)
        torch.testing.assert_close(got, want, **tol(device, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(device, backend_kind, dtype):
    if backend_kind != "compiled":
        pytest.skip("the torch reference's grid_sample and the Triton interpreter are checked in fp32")
    backend = require_backend(OP, backend_kind, device)
    x = _images(6, h=12, w=12, device=device)
    groups = torch.arange(6, device=device) % 2
    xh = x.to(dtype).requires_grad_(True)
    got = ddfast.dsa_augment(xh, groups, STRATEGY, [1, 2], param=_param("M"), backend=backend)
    got.float().sum().backward()
    assert got.dtype == dtype and xh.grad.dtype == dtype
    x32 = xh.detach().float().requires_grad_(True)
    # same draws as the half call: the color factors are drawn in the input dtype
    stages = dsa.draw_grouped(["color", "crop", "cutout", "flip", "scale", "rotate"], [1, 2], groups, 12, 12,
                              _param("M"), dtype, "reference")
    want = dsa.apply_stages(x32, stages, False, "torch")
    want.sum().backward()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(xh.grad.float(), x32.grad, rtol=2e-2, atol=3e-2)


def test_large_values(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x = _images(4, h=8, w=8, device=device) * 1e30
    groups = torch.tensor([0, 1, 2, 3], device=device)
    got = ddfast.dsa_augment(x, groups, STRATEGY, [0, 1, 2, 3], param=_param("M"), backend=backend)
    want = ddfast.dsa_augment(x, groups, STRATEGY, [0, 1, 2, 3], param=_param("M"), backend="torch")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e24)


def test_identity_strategies_return_input():
    x = _images(2)
    for strategy in ("", "None", "none"):
        assert ddfast.dsa_augment(x, torch.tensor([0, 0]), strategy, [1]) is x


def test_torch_compile_traces_without_graph_break():
    require_backend(OP, "compiled", "cpu")
    x = _images(3, h=6, w=6).requires_grad_(True)
    ip, fp = _one_op_params(dsa.OP_AFFINE, 3)
    base = dsa.base_grid(6, 6, False, torch.float32, "cpu")

    def f(t):
        return torch.ops.ddfast.dsa_fwd(t, ip, fp.float(), base, False) * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    got.sum().backward()
    g = x.grad.clone()
    x.grad = None
    f(x).sum().backward()
    torch.testing.assert_close(g, x.grad)


@pytest.mark.parametrize("bad, err, match", [
    (lambda x, g, s: (x[0], g, "color", s), ValueError, "x"),
    (lambda x, g, s: (x.long(), g, "color", s), TypeError, "x"),
    (lambda x, g, s: (x[:0], g[:0], "color", s), ValueError, "empty"),
    (lambda x, g, s: (x, g.float(), "color", s), TypeError, "groups"),
    (lambda x, g, s: (x, g[:-1], "color", s), ValueError, "groups"),
    (lambda x, g, s: (x, g + 5, "color", s), ValueError, "groups"),
    (lambda x, g, s: (x, g, "color_blur", s), ValueError, "strategy"),
    (lambda x, g, s: (x, g, 3, s), TypeError, "strategy"),
    (lambda x, g, s: (x, g, "color", 7), TypeError, "seeds"),
    (lambda x, g, s: (x, g, "color", [1.0, 2.0]), TypeError, "seeds"),
    (lambda x, g, s: (x, g, "color", [-2, 0]), ValueError, "seeds"),
    (lambda x, g, s: (x, g, "color", []), ValueError, "seeds"),
])
def test_bad_input(bad, err, match):
    x = _images(4, h=8, w=8)
    args = bad(x, torch.tensor([0, 1, 0, 1]), [3, 4])
    with pytest.raises(err, match=match):
        ddfast.dsa_augment(*args)


def test_bad_options():
    x = _images(2, h=8, w=8)
    g = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="rng"):
        ddfast.dsa_augment(x, g, "color", [1], rng="slow")
    with pytest.raises(TypeError, match="align_corners"):
        ddfast.dsa_augment(x, g, "color", [1], align_corners=1)


def test_nan_input_is_named():
    x = _images(2, h=8, w=8)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        ddfast.dsa_augment(x, torch.tensor([0, 1]), "flip", [1, 2], backend="cpp")


def test_fast_rng_parameter_ranges():
    p = _param("M")
    seeds = list(range(400))
    groups = torch.arange(400)
    stages = dsa.draw_grouped(["color", "crop", "cutout", "flip", "scale", "rotate"], seeds, groups, 32, 28, p,
                              torch.float32, "fast")
    (c_ip, c_fp), (cr_ip, _), (cu_ip, _), (f_ip, _), (s_ip, s_fp), (r_ip, r_fp) = stages
    assert (c_fp[:, 0].abs() <= 0.5).all() and (c_fp[:, 1] >= 0).all() and (c_fp[:, 1] <= 2).all()
    assert (c_fp[:, 2] >= 0.5).all() and (c_fp[:, 2] <= 1.5).all()
    assert cr_ip[:, 1].abs().max() == 4 and cr_ip[:, 2].abs().max() == 4  # int(32·0.125+.5), int(28·0.125+.5)
    assert (cu_ip[:, 1] >= 0).all() and (cu_ip[:, 2] <= 31).all() and (cu_ip[:, 4] <= 27).all()
    assert 0.35 < (f_ip[:, 0] == dsa.OP_FLIP).double().mean() < 0.65
    for col in (0, 4):
        assert (s_fp[:, col] >= 1 / 1.2).all() and (s_fp[:, col] <= 1.2).all()
    angle = torch.atan2(r_fp[:, 3], r_fp[:, 0]) * 180 / torch.pi
    assert angle.abs().max() <= 15.0 + 1e-9 and angle.abs().max() > 10
