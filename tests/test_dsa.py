"""ddfast.dsa_augment: grouped output == per-group DiffAugment calls, gradients, kernels, bad input."""
import math

import pytest
import torch

import ddfast
from ddfast.compat import dc, mtt
from ddfast.ops import dsa

from conftest import assert_close_fp32, require_backend, tol

OP = "dsa"
STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _reference_stream(*args, **kwargs):
    """dsa_augment with the reference's generator calls (the default is rng="device")."""
    return ddfast.dsa_augment(*args, rng="reference", **kwargs)
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
    got = _reference_stream(x, groups, strategy, seeds, align_corners=align, param=_param(mode), backend="torch")
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
        got = _reference_stream(x, groups, STRATEGY, seeds, align_corners=align, param=_param(mode), backend=backend)
        want = _per_group(x, groups, STRATEGY, seeds, align, mode)
        stages = dsa.draw_grouped(dsa.parse_strategy(STRATEGY, _param(mode)), seeds, groups, h, w, _param(mode),
                                  torch.float32, "reference", device)
        assert_close_fp32(got, want, device, exact=dsa.apply_stages(x.double(), stages, align, "torch"))


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (3, 1, 28, 28), (4, 3, 64, 64), (5, 3, 20, 33), (300, 3, 8, 8)])
def test_shapes_and_batch_sizes(shape):
    x = _images(*shape)
    groups = torch.arange(shape[0]) % 3
    seeds = [3, 4, 5]
    # the exact result of these draws: the same parameters applied in float64
    stages = dsa.draw_grouped(dsa.parse_strategy(STRATEGY, _param("M")), seeds, groups, shape[2], shape[3],
                              _param("M"), torch.float32, "reference")
    exact = dsa.apply_stages(x.double(), stages, False, "torch")
    want = _per_group(x, groups, STRATEGY, seeds, False, "M")
    assert torch.equal(_reference_stream(x, groups, STRATEGY, seeds, param=_param("M"), backend="torch"), want)
    got = _reference_stream(x, groups, STRATEGY, seeds, param=_param("M"), backend="cpp")
    # contrast's mean is summed in fp64 by the C++ kernel, in fp32 by torch: the kernel is at
    # least as close to the exact result as the fp32 reference is
    ref_error = float((want.double() - exact).abs().max())
    assert float((got.double() - exact).abs().max()) <= max(1.5 * ref_error, 1e-6)


def test_seed_minus_one_groups_draw_per_image_from_global_generator():
    x = _images(1, h=12, w=12).expand(8, -1, -1, -1).contiguous()
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    torch.manual_seed(5)
    got = _reference_stream(x, groups, STRATEGY, [-1, -1], param=_param("M"), backend="cpp")
    torch.manual_seed(5)
    want = _per_group(x, groups, STRATEGY, [-1, -1], False, "M")
    assert_close_fp32(got, want, "cpu")
    assert not torch.equal(got[0], got[1])  # identical images, independent transforms


def test_siamese_within_group():
    x = _images(1, h=12, w=12).expand(6, -1, -1, -1).contiguous()
    groups = torch.tensor([0, 1, 0, 1, 0, 1])
    for rng in ("reference", "fast"):
        y = ddfast.dsa_augment(x, groups, STRATEGY, [10, 11], param=_param("M"), backend="cpp", rng=rng)
        assert torch.equal(y[0], y[2]) and torch.equal(y[0], y[4]) and torch.equal(y[1], y[5])
        assert not torch.equal(y[0], y[1])


def _transcribed_per_group(x, groups, strategy, seeds, mode):
    """Per-group calls of the plain-PyTorch transcription of DC's DiffAugment (test_compat_dsa)."""
    from test_compat_dsa import _reference_diff_augment

    out = torch.empty_like(x)
    for g, seed in enumerate(seeds):
        idx = torch.nonzero(groups == g).flatten()
        if idx.numel():
            out[idx] = _reference_diff_augment(x[idx], strategy, seed, _param(mode), False)
    return out


@pytest.mark.parametrize("mode", ["S", "M"])
@pytest.mark.parametrize("seeds", [[5, -1, 7, -1], [-1, 3, -1, -1], [9, -1, -1, 2]])
def test_mixed_seeds_and_generator_state_equal_per_group_calls_float64(mode, seeds):
    """A seed −1 group draws from the global generator as the reference leaves it, i.e. re-seeded
    by the seeded group before it; afterwards every generator is where the per-group calls leave it."""
    x = _images(11, h=10, w=12, dtype=torch.float64)
    groups = torch.tensor([0, 1, 2, 3, 1, 0, 3, 3, 2, 1, 1])
    torch.manual_seed(42)
    want = _transcribed_per_group(x, groups, STRATEGY, seeds, mode)
    state_want = torch.random.get_rng_state()
    for backend in ("torch", "cpp"):
        torch.manual_seed(42)
        got = _reference_stream(x, groups, STRATEGY, seeds, param=_param(mode), backend=backend)
        assert torch.equal(torch.random.get_rng_state(), state_want), backend
        if backend == "torch":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["S", "M"])
def test_cuda_reference_stream_leaves_cpu_and_cuda_generators_as_the_per_group_calls(mode):
    """On CUDA the re-seeds set the CPU and CUDA generators directly (no torch.random.manual_seed
    per draw); the draws, the output and both generators' states equal the reference's calls."""
    x = _images(11, h=10, w=12, dtype=torch.float64, device="cuda")
    groups = torch.tensor([0, 1, 2, 3, 1, 0, 3, 3, 2, 1, 1], device="cuda")
    seeds = [5, -1, 7, -1]
    torch.manual_seed(42)
    want = _transcribed_per_group(x, groups, STRATEGY, seeds, mode)
    states_want = torch.random.get_rng_state(), torch.cuda.get_rng_state_all()
    torch.manual_seed(42)
    got = _reference_stream(x, groups, STRATEGY, seeds, param=_param(mode), backend="torch")
    assert torch.equal(got, want)
    assert torch.equal(torch.random.get_rng_state(), states_want[0])
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), states_want[1]))


@pytest.mark.parametrize("mode", ["S", "M"])
def test_device_draw_reseeds_skip_torch_manual_seed(monkeypatch, mode):
    """The re-seed path of device draws (CUDA initialised, emulated here on CPU tensors): the CPU
    generator and CUDA's manual_seed_all get every seed directly, the other devices are seeded
    once at the end (seed_other_devices, never torch.random.manual_seed, which formats the Python
    stack for each backend not initialised), and the draws and the CPU generator equal the
    per-draw torch.random.manual_seed path."""
    # read torch's seeding source now: under the patch below it would see counting_manual_seed's
    # and cache False for the whole process (seen on an H200, depending on test order)
    assert dsa._fast_seeding_matches_torch()
    real_manual_seed = torch.random.manual_seed
    calls = {"manual_seed": 0, "cuda_seeds": [], "others": []}
    real_others = dsa.seed_other_devices

    def counting_manual_seed(seed):
        calls["manual_seed"] += 1
        return torch.default_generator.manual_seed(seed)  # the CPU part (no backend queues)

    def draw(initialised):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
        torch.default_generator.manual_seed(3)
        calls.update(manual_seed=0, cuda_seeds=[], others=[])
        stream = dsa.SeedStream(11, cpu_draws=False)
        stages = dsa.draw_stages(dsa.parse_strategy(STRATEGY, _param(mode)), stream, 6, 10, 12, _param(mode),
                                 torch.float32, "cpu", siamese=True)
        stream.finish()
        return stages, torch.random.get_rng_state(), dict(calls)

    monkeypatch.setattr(torch.random, "manual_seed", counting_manual_seed)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls["cuda_seeds"].append(seed))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: None)
    monkeypatch.setattr(dsa, "seed_other_devices",
                        lambda seed, keep_cuda=False: (calls["others"].append(seed), real_others(seed, keep_cuda)))
    want, state_want, per_draw = draw(False)
    got, state_got, direct = draw(True)
    monkeypatch.setattr(torch.random, "manual_seed", real_manual_seed)
    assert per_draw["manual_seed"] >= 2 and per_draw["cuda_seeds"] == []
    assert direct["manual_seed"] == 0 and direct["cuda_seeds"] == list(range(11, 11 + per_draw["manual_seed"]))
    assert direct["others"] == [10 + per_draw["manual_seed"]]  # once, with the last seed
    assert torch.equal(state_got, state_want)
    for (ip_g, fp_g), (ip_w, fp_w) in zip(got, want):
        assert torch.equal(ip_g, ip_w) and torch.equal(fp_g, fp_w)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("keep_cuda,cuda_initialised", [(False, False), (True, False), (True, True)])
def test_seed_other_devices_seeds_what_torch_manual_seed_seeds(monkeypatch, compiled, keep_cuda, cuda_initialised):
    """seed_other_devices calls the device seeders torch.random.manual_seed calls, in its order,
    but leaves the CPU generator (and, with keep_cuda, initialised CUDA) alone, and skips devices
    this build was compiled without (their lazy seed could never run)."""
    assert dsa._fast_seeding_matches_torch()  # a torch seeding another device would fall back
    calls = []
    for name, seed_all in dsa._SEEDED_DEVICES:
        module = getattr(torch, name)
        monkeypatch.setattr(module, seed_all, lambda seed, name=name: calls.append((name, seed)))
        monkeypatch.setattr(module, "_is_in_bad_fork", lambda: False)
        if name != "mps":  # mps has no _is_compiled: it returns early itself when absent
            monkeypatch.setattr(module, "_is_compiled", lambda: compiled, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda_initialised)
    monkeypatch.setattr(torch.random, "_seed_custom_device", lambda seed: calls.append(("custom", seed)))
    torch.default_generator.manual_seed(3)
    torch.random.manual_seed(17)
    want = list(calls)
    calls.clear()
    torch.default_generator.manual_seed(3)
    state = torch.random.get_rng_state()
    dsa.seed_other_devices(17, keep_cuda=keep_cuda)
    assert torch.equal(torch.random.get_rng_state(), state)
    skipped = set() if compiled else {"cuda", "xpu", "mtia"}
    if keep_cuda and cuda_initialised:
        skipped.add("cuda")
    assert calls == [c for c in want if c[0] not in skipped]
    assert ("mps", 17) in calls and ("custom", 17) in calls


def test_empty_group_makes_no_call():
    x = _images(5, h=8, w=8, dtype=torch.float64)
    groups = torch.tensor([0, 2, 0, 2, 2])  # group 1 has no image: the reference would make no call
    seeds = [4, 6, -1]
    torch.manual_seed(0)
    want = _transcribed_per_group(x, groups, STRATEGY, seeds, "M")
    state_want = torch.random.get_rng_state()
    torch.manual_seed(0)
    got = _reference_stream(x, groups, STRATEGY, seeds, param=_param("M"), backend="torch")
    assert torch.equal(got, want) and torch.equal(torch.random.get_rng_state(), state_want)


def test_fast_rng_is_deterministic_and_not_the_reference_stream():
    x = _images(6, h=12, w=12)
    groups = torch.arange(6) % 3
    a = ddfast.dsa_augment(x, groups, STRATEGY, [1, 2, 3], param=_param("M"), rng="fast", backend="torch")
    b = ddfast.dsa_augment(x, groups, STRATEGY, [1, 2, 3], param=_param("M"), rng="fast", backend="cpp")
    c = ddfast.dsa_augment(x, groups, STRATEGY, [1, 2, 4], param=_param("M"), rng="fast", backend="cpp")
    ref = _reference_stream(x, groups, STRATEGY, [1, 2, 3], param=_param("M"), backend="cpp")
    assert_close_fp32(a, b, "cpu")
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
        (_reference_stream(b, groups, STRATEGY, seeds, align_corners=align, param=_param(mode),
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
    want = _reference_stream(x, groups, STRATEGY, [4, 9], param=_param("M"), backend="torch")
    for view in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        got = _reference_stream(view, groups, STRATEGY, [4, 9], param=_param("M"), backend=backend)
        assert_close_fp32(got, want, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(device, backend_kind, dtype):
    if backend_kind != "compiled":
        pytest.skip("not applicable: the torch reference's grid_sample and the Triton interpreter are checked in fp32")
    backend = require_backend(OP, backend_kind, device)
    x = _images(6, h=12, w=12, device=device)
    groups = torch.arange(6, device=device) % 2
    xh = x.to(dtype).requires_grad_(True)
    got = _reference_stream(xh, groups, STRATEGY, [1, 2], param=_param("M"), backend=backend)
    got.float().sum().backward()
    assert got.dtype == dtype and xh.grad.dtype == dtype
    x32 = xh.detach().float().requires_grad_(True)
    # same draws as the half call: the color factors are drawn in the input dtype
    stages = dsa.draw_grouped(["color", "crop", "cutout", "flip", "scale", "rotate"], [1, 2], groups, 12, 12,
                              _param("M"), dtype, "reference", device=device)
    want = dsa.apply_stages(x32, stages, False, "torch")
    want.sum().backward()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(xh.grad.float(), x32.grad, rtol=2e-2, atol=3e-2)


def test_large_values(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x = _images(4, h=8, w=8, device=device) * 1e30
    groups = torch.tensor([0, 1, 2, 3], device=device)
    got = _reference_stream(x, groups, STRATEGY, [0, 1, 2, 3], param=_param("M"), backend=backend)
    want = _reference_stream(x, groups, STRATEGY, [0, 1, 2, 3], param=_param("M"), backend="torch")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e24)


def test_identity_strategies_return_input():
    x = _images(2)
    for strategy in ("", "None", "none"):
        assert _reference_stream(x, torch.tensor([0, 0]), strategy, [1]) is x


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
        _reference_stream(*args)


def test_bad_options():
    x = _images(2, h=8, w=8)
    g = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="rng"):
        ddfast.dsa_augment(x, g, "color", [1], rng="slow")
    with pytest.raises(TypeError, match="align_corners"):
        _reference_stream(x, g, "color", [1], align_corners=1)


def test_nan_input_is_named():
    x = _images(2, h=8, w=8)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        _reference_stream(x, torch.tensor([0, 1]), "flip", [1, 2], backend="cpp")


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


# --- rng="device": Philox draws on the device ------------------------------------------------------

def test_philox_known_answers():
    """Random123's philox4x32-10 known-answer vectors."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
             ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
             ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
              (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for counter, key, want in cases:
        words = dsa.philox4x32(*(torch.full((2,), v, dtype=torch.int64) for v in counter + key))
        assert [w.tolist() for w in words] == [[v, v] for v in want]


def _device_rng(x, groups, seeds, mode="M", backend="cpp"):
    return ddfast.dsa_augment(x, groups, STRATEGY, seeds, param=_param(mode), backend=backend, rng="device")


@pytest.mark.parametrize("mode", ["S", "M"])
def test_device_rng_deterministic_and_independent_of_order_and_split(mode):
    x = _images(12, h=12, w=12)
    groups = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    seeds = [5, 5, 77, 2 ** 40]
    y = _device_rng(x, groups, seeds, mode)
    assert torch.equal(y, _device_rng(x, groups, seeds, mode))  # same seeds: same output
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_device_rng(x[perm], groups[perm], seeds, mode), y[perm])  # image order
    part = groups >= 2  # the groups 2 and 3 alone, same ids and seeds
    assert torch.equal(_device_rng(x[part], groups[part], seeds, mode), y[part])
    same = _images(1, h=12, w=12).expand(12, -1, -1, -1).contiguous()
    z = _device_rng(same, groups, seeds, mode)
    assert torch.equal(z[0], z[4]) and torch.equal(z[0], z[8])  # Siamese within a group
    assert not torch.equal(z[0], z[1])  # groups 0 and 1 share a seed but draw differently
    assert not torch.equal(_device_rng(x, groups, [6, 5, 77, 2 ** 40], mode)[0], y[0])  # another seed


def test_device_rng_seed_minus_one_follows_global_generator():
    x = _images(1, h=10, w=10).expand(6, -1, -1, -1).contiguous()
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    torch.manual_seed(3)
    a = _device_rng(x, groups, [-1, 4])
    torch.manual_seed(3)
    b = _device_rng(x, groups, [-1, 4])
    c = _device_rng(x, groups, [-1, 4])
    assert torch.equal(a, b) and not torch.equal(a[:3], c[:3]) and torch.equal(a[3:], c[3:])
    assert not torch.equal(a[0], a[1])  # per-image draws


def _ks_uniform(values, low, high):
    """Kolmogorov–Smirnov distance of the sample to U[low, high)."""
    v = torch.sort((values.double() - low) / (high - low)).values
    n = v.numel()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum((grid - v).abs(), (v - (grid - 1.0 / n)).abs()).max())


def _assert_uniform_ints(values, low, high):
    """Every integer in [low, high] appears, each within 5 standard deviations of n/(high-low+1)."""
    counts = torch.bincount(values - low, minlength=high - low + 1).double()
    assert counts.numel() == high - low + 1
    expect = values.numel() / counts.numel()
    assert float((counts - expect).abs().max()) < 5 * math.sqrt(expect)


def test_device_rng_distributions_match_the_reference():
    """Each op's parameters from 20000 groups: the reference's ranges and distributions (KS distance
    below the 0.1% critical value 1.95/√n; integer draws by count; flip probability)."""
    n, h, w = 20000, 32, 32
    p = _param("M")
    families = dsa.parse_strategy(STRATEGY, p)
    stages = dsa.draw_device(families, list(range(n)), torch.arange(n), h, w, p)
    (ip_color, fp_color), (ip_crop, _), (ip_cut, _), (ip_flip, _), (_, fp_scale), (_, fp_rot) = stages
    crit = 1.95 / math.sqrt(n)
    assert _ks_uniform(fp_color[:, 0], -0.5 * p.brightness, 0.5 * p.brightness) < crit
    assert _ks_uniform(fp_color[:, 1], 0.0, p.saturation) < crit
    assert _ks_uniform(fp_color[:, 2], p.contrast, p.contrast + 1) < crit
    shift = int(h * p.ratio_crop_pad + 0.5)
    _assert_uniform_ints(ip_crop[:, 1], -shift, shift)
    _assert_uniform_ints(ip_crop[:, 2], -shift, shift)
    size = int(h * p.ratio_cutout + 0.5)  # offset o ~ randint(0, h + 1 - size % 2); last row o - size//2 + size - 1
    offset = ip_cut[:, 2] - size + 1 + size // 2
    unclamped = ip_cut[:, 2] < h - 1
    _assert_uniform_ints(offset[unclamped], 0, h - size + size // 2 - 1)
    assert torch.equal(ip_cut[unclamped, 1], torch.clamp(ip_cut[unclamped, 2] - size + 1, min=0))  # box side
    flips = (ip_flip[:, 0] == dsa.OP_FLIP).double().mean()
    assert abs(float(flips) - p.prob_flip) < 5 * math.sqrt(0.25 / n)
    r = p.ratio_scale
    assert _ks_uniform(fp_scale[:, 0], 1 / r, r) < crit and _ks_uniform(fp_scale[:, 4], 1 / r, r) < crit
    angle = torch.atan2(fp_rot[:, 3], fp_rot[:, 0])
    limit = p.ratio_rotate / 180 * math.pi
    assert _ks_uniform(angle, -limit, limit) < crit
    torch.testing.assert_close(fp_rot[:, 1], -fp_rot[:, 3], rtol=0, atol=0)
    # mode 'S': the family of each group is uniform over the strategy's families
    (ip_s, fp_s), = dsa.draw_device(families, list(range(n)), torch.arange(n), h, w, _param("S"))
    codes = ip_s[:, 0]
    color = (codes == dsa.OP_COLOR).double().mean()
    affine = (codes == dsa.OP_AFFINE).double().mean()  # scale or rotate
    assert abs(float(color) - 1 / 6) < 5 * math.sqrt(1 / 6 * 5 / 6 / n)
    assert abs(float(affine) - 2 / 6) < 5 * math.sqrt(2 / 6 * 4 / 6 / n)


@pytest.mark.parametrize("mode", ["S", "M"])
def test_device_rng_kernels_match_torch_ops(device, backend_kind, mode):
    backend = require_backend(OP, backend_kind, device)
    small = backend_kind == "triton" and device == "cpu"
    x = _images(6 if small else 20, h=10 if small else 24, w=12 if small else 24, device=device)
    groups = (torch.arange(x.shape[0]) % 4).to(device)
    seeds = [3, -1, 11, 12]
    torch.manual_seed(0)
    got = _device_rng(x, groups, seeds, mode, backend)
    torch.manual_seed(0)
    want = _device_rng(x, groups, seeds, mode, "torch")
    assert_close_fp32(got, want, device)


def test_device_rng_no_host_sync_after_warm_up(device):
    from ddfast._sync import count_syncs

    backend = require_backend(OP, "compiled", device)
    x = _images(16, h=16, w=16, device=device).requires_grad_(True)
    groups = (torch.arange(16) % 5).to(device)
    seeds = [1, 2, -1, 4, 5]
    for mode in ("S", "M"):
        _device_rng(x, groups, seeds, mode, backend).sum().backward()  # warm-up
        with count_syncs() as syncs:
            _device_rng(x, groups, seeds, mode, backend).sum().backward()
        assert syncs.count == 0, syncs.events


@pytest.mark.parametrize("mode", ["S", "M"])
def test_device_rng_triton_draw_equals_torch_draw(device, mode):
    """kernels/dsa_rng.py (one launch) gives draw_device's table: integers exactly, floats to 1e-12."""
    require_backend(OP, "triton", device)
    p = _param(mode)
    families = dsa.parse_strategy(STRATEGY, p)
    groups = (torch.arange(150) % 7).to(device)
    seeds = [1, -1, 3, 2 ** 40, 5, -1, 7]
    torch.manual_seed(0)
    want = dsa.draw_device(families, seeds, groups, 20, 33, p)
    torch.manual_seed(0)
    got = dsa.draw_device_fused(families, seeds, groups, 20, 33, p, torch.float64)
    assert len(got) == len(want)
    for (ip_got, fp_got), (ip_want, fp_want) in zip(got, want):
        assert torch.equal(ip_got.long(), ip_want)
        torch.testing.assert_close(fp_got, fp_want, rtol=1e-12, atol=1e-12)


def test_default_rng_is_device_and_sync_free_after_warm_up():
    """The default configuration of dsa_augment makes no host sync after one warm-up call."""
    from ddfast._sync import count_syncs

    x = _images(8, h=16, w=16).requires_grad_(True)
    groups = torch.arange(8) % 4
    seeds = [1, -1, 3, 4]
    ddfast.dsa_augment(x, groups, STRATEGY, seeds).sum().backward()  # warm-up
    with count_syncs() as syncs:
        ddfast.dsa_augment(x, groups, STRATEGY, seeds).sum().backward()
    assert syncs.count == 0, syncs.events
    seeded = [1, 2, 3, 4]
    torch.testing.assert_close(ddfast.dsa_augment(x, groups, STRATEGY, seeded),
                               ddfast.dsa_augment(x, groups, STRATEGY, seeded, rng="device"), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["M", "S"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_deferred_host_reads_give_the_same_tables_and_generator_states(monkeypatch, mode, dtype):
    """On CUDA the reference-stream draws are read on the host once per call (HostReads) instead of
    once per draw; CPU draws are filled at once. Queued as a GPU's would be, every table entry and
    the generator state left behind equal the immediate reads, for mixed seeds and both modes
    (the queued draws mix 8-, 4- and 2-byte elements: their bytes share one buffer)."""
    seeds, groups = [5, -1, 9], torch.tensor([0, 1, 1, 2, 0, 2, 1])
    families = dsa.parse_strategy(STRATEGY, _param(mode))

    def draw():
        torch.manual_seed(123)
        stages = dsa.draw_grouped(families, seeds, groups, 12, 10, _param(mode), dtype, "reference")
        return stages, torch.get_rng_state()

    want, state_want = draw()
    queued = []
    real_read = dsa.HostReads.read

    def queue_cpu_too(self, t, fill):  # what a CUDA tensor's read does
        queued.append(t.numel())
        self.items.append((t, fill))
    monkeypatch.setattr(dsa.HostReads, "read", queue_cpu_too)
    got, state_got = draw()
    monkeypatch.setattr(dsa.HostReads, "read", real_read)
    assert queued, "nothing was deferred"
    assert len(got) == len(want) and torch.equal(state_got, state_want)
    for (ip_g, fp_g), (ip_w, fp_w) in zip(got, want):
        assert torch.equal(ip_g, ip_w) and torch.equal(fp_g, fp_w)


def _busy_stream():
    """Queue about half a second of GPU work on the current stream; the event completes after it."""
    torch.cuda._sleep(2 ** 30)
    done = torch.cuda.Event()
    done.record()
    return done


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("call", ["dsa_augment", "diff_augment"])
def test_cuda_reference_stream_reads_once_and_waits_for_no_queued_work(call):
    """The reference stream's device draws run on a side stream (dsa.draw_stream) and come back in
    one read, and a groups tensor passed again is not read again (host_copy): after a warm-up one
    call makes one device read, and it returns while earlier work still runs on the current
    stream. The output equals the call's on an idle GPU."""
    from ddfast._sync import count_syncs

    x = _images(12, h=16, w=16, device="cuda")
    groups = (torch.arange(12) % 3).to("cuda")
    seeds = [3, 8, 21]

    def step():
        if call == "dsa_augment":
            return _reference_stream(x, groups, STRATEGY, seeds, param=_param("S"))
        return dc.DiffAugment(x, STRATEGY, 5, _param("M"))
    step()  # warm-up: the groups' host copy, the kernels
    want = step()
    torch.cuda.synchronize()
    with count_syncs(target="cuda") as syncs:
        step()
    torch.cuda.synchronize()
    assert [e for e in syncs.events if not e.startswith("cuda sync")] == ["Tensor.cpu()"], syncs
    done = _busy_stream()
    got = step()
    assert not done.query(), "the call waited for the work queued before it"
    torch.cuda.synchronize()
    assert torch.equal(got, want)
