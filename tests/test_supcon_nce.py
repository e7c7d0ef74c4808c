"""supcon_nce against its materialised-logits reference: values, both gradients, edge cases, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import ddfast
from ddfast.ops.supcon_nce import supcon_nce_reference

from conftest import compile_sm90_as_given, peak_alloc_bytes, require_backend, tol

OP = "supcon_nce"


def _inputs(n_syn, n_real, dim, device, dtype=torch.float32, classes=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    f_syn = scale * torch.randn(n_syn, dim, generator=g, dtype=torch.float64)
    f_real = scale * torch.randn(n_real, dim, generator=g, dtype=torch.float64)
    y_syn = torch.randint(0, classes, (n_syn,), generator=g)
    y_real = torch.randint(0, classes, (n_real,), generator=g)
    return (f_syn.to(device, dtype), y_syn.to(device), f_real.to(device, dtype), y_real.to(device))


def _value_and_grads(fn, f_syn, y_syn, f_real, y_real, **kw):
    fs = f_syn.detach().clone().requires_grad_(True)
    fr = f_real.detach().clone().requires_grad_(True)
    out = fn(fs, y_syn, fr, y_real, **kw)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), (fs, fr))
    return out.detach(), grads


def _reference(f_syn, y_syn, f_real, y_real, **kw):
    return supcon_nce_reference(f_syn, y_syn, f_real, y_real, **kw)


def _assert_matches(device, backend, inputs, dtype=torch.float32, **kw):
    got, got_grads = _value_and_grads(ddfast.supcon_nce, *inputs, backend=backend, **kw)
    want, want_grads = _value_and_grads(_reference, *inputs, **kw)
    torch.testing.assert_close(got, want, **tol(device, dtype))
    for g, w in zip(got_grads, want_grads):
        # the normalisation's backward subtracts near-equal terms: elements far below the tensor's
        # scale carry fp32 rounding of that scale (the fp32 reference errs as much against fp64)
        t = tol(device, dtype)
        t["atol"] = max(t["atol"], t["rtol"] * float(w.abs().max()))
        torch.testing.assert_close(g, w, **t)
    return got, got_grads


@pytest.mark.parametrize("variant", ["infonce", "nce"])
@pytest.mark.parametrize("n_syn, n_real, dim", [(1, 1, 3), (37, 45, 50), (5, 70, 130)])
def test_matches_reference(device, backend_kind, variant, n_syn, n_real, dim):
    backend = require_backend(OP, backend_kind, device)
    inputs = _inputs(n_syn, n_real, dim, device)
    _assert_matches(device, backend, inputs, variant=variant, temperature=0.2, noise_ratio=3.0)


@pytest.mark.parametrize("variant", ["infonce", "nce"])
def test_float64_keeps_temperature_and_noise_ratio_exact(device, backend_kind, variant):
    """1/0.07 and log 3 are not fp32 numbers: typed fp32 (Triton's type for a Python float on a GPU)
    they cost ~3e-8 relative, far over float64's tolerance."""
    backend = require_backend(OP, backend_kind, device)
    inputs = _inputs(9, 13, 11, device, dtype=torch.float64, classes=3)
    kw = dict(temperature=0.07, noise_ratio=3.0, variant=variant)
    got, got_grads = _value_and_grads(ddfast.supcon_nce, *inputs, backend=backend, **kw)
    want, want_grads = _value_and_grads(_reference, *inputs, **kw)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-11 * float(w.abs().max()))


@pytest.mark.parametrize("variant", ["infonce", "nce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_reductions_and_normalize(device, backend_kind, variant, reduction, normalize):
    backend = require_backend(OP, backend_kind, device)
    inputs = _inputs(19, 23, 17, device, scale=0.3)
    got, _ = _assert_matches(device, backend, inputs, variant=variant, reduction=reduction, normalize=normalize)
    assert got.shape == ((19,) if reduction == "none" else ())


def test_formula_by_hand(device):
    """The reference itself against the issue's formula, written element by element."""
    f_syn, y_syn, f_real, y_real = _inputs(4, 6, 3, device, dtype=torch.float64, classes=2)
    z_s, z_r = F.normalize(f_syn, dim=1), F.normalize(f_real, dim=1)
    temperature, c = 0.3, 2.0
    infonce, nce, count = 0.0, 0.0, 0
    for i in range(4):
        s = [float(z_s[i] @ z_r[j]) / temperature for j in range(6)]
        pos = [j for j in range(6) if y_real[j] == y_syn[i]]
        if pos:
            infonce += math.log(sum(math.exp(v) for v in s)) - math.log(sum(math.exp(s[j]) for j in pos))
            count += 1
        for j in range(6):
            h = math.exp(s[j]) / (math.exp(s[j]) + c)
            nce -= math.log(h) if j in pos else math.log(1 - h)
    got_i = supcon_nce_reference(f_syn, y_syn, f_real, y_real, temperature=temperature)
    got_n = supcon_nce_reference(f_syn, y_syn, f_real, y_real, temperature=temperature, variant="nce", noise_ratio=c)
    assert count > 0
    assert abs(float(got_i) - infonce / count) < 1e-12
    assert abs(float(got_n) - nce / 4) < 1e-12


@pytest.mark.parametrize("variant", ["infonce", "nce"])
def test_gradcheck_float64(device, backend_kind, variant):
    backend = require_backend(OP, backend_kind, device)
    f_syn, y_syn, f_real, y_real = _inputs(5, 7, 6, device, dtype=torch.float64, classes=3)
    y_syn[0] = 7  # one anchor without a positive
    f_syn.requires_grad_(True)
    f_real.requires_grad_(True)
    fn = lambda a, b: ddfast.supcon_nce(a, y_syn, b, y_real, temperature=0.5, variant=variant,  # noqa: E731
                                        noise_ratio=2.0, backend=backend)
    fast = backend == "triton" and device == "cpu"  # the interpreter is slow: one random direction
    assert torch.autograd.gradcheck(fn, (f_syn, f_real), fast_mode=fast)


def test_anchors_without_positive_are_left_out(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_syn, y_syn, f_real, y_real = _inputs(9, 12, 8, device, classes=3)
    y_syn[:4] = 10  # label absent from the real set
    per_anchor = ddfast.supcon_nce(f_syn, y_syn, f_real, y_real, reduction="none", backend=backend)
    assert torch.all(per_anchor[:4] == 0)
    fs = f_syn.clone().requires_grad_(True)
    mean = ddfast.supcon_nce(fs, y_syn, f_real, y_real, backend=backend)
    (grad,) = torch.autograd.grad(mean, fs)
    torch.testing.assert_close(mean, per_anchor[4:].sum() / 5, **tol(device, torch.float32))
    assert torch.all(grad[:4] == 0) and torch.isfinite(grad).all()
    _assert_matches(device, backend, (f_syn, y_syn, f_real, y_real))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_anchor_has_a_positive_gives_zero(device, backend_kind, reduction):
    backend = require_backend(OP, backend_kind, device)
    f_syn, y_syn, f_real, y_real = _inputs(6, 8, 5, device, classes=2)
    fs = f_syn.clone().requires_grad_(True)
    fr = f_real.clone().requires_grad_(True)
    out = ddfast.supcon_nce(fs, y_syn + 5, fr, y_real, reduction=reduction, backend=backend)
    assert torch.all(out == 0)
    gs, gr = torch.autograd.grad(out.sum(), (fs, fr))
    assert torch.all(gs == 0) and torch.all(gr == 0)


def test_single_class(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_syn, _, f_real, _ = _inputs(6, 10, 9, device)
    y_syn = torch.zeros(6, dtype=torch.long, device=device)
    y_real = torch.zeros(10, dtype=torch.long, device=device)
    got, _ = _assert_matches(device, backend, (f_syn, y_syn, f_real, y_real))
    assert abs(float(got)) < 1e-5  # every column is a positive: lse_all == lse_pos
    _assert_matches(device, backend, (f_syn, y_syn, f_real, y_real), variant="nce")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("variant", ["infonce", "nce"])
def test_low_temperature_large_features_stay_finite(device, backend_kind, normalize, variant):
    backend = require_backend(OP, backend_kind, device)
    scale = 1e3 if normalize else 30.0  # unnormalised: logits up to ~1e5
    inputs = _inputs(11, 20, 33, device, scale=scale, classes=3)
    kw = dict(temperature=0.01, normalize=normalize, variant=variant)
    got, grads = _value_and_grads(ddfast.supcon_nce, *inputs, backend=backend, **kw)
    assert torch.isfinite(got) and all(torch.isfinite(g).all() for g in grads)
    # logits of ~1e5 carry fp32 rounding of ~1e-2, which moves near-tied softmax weights: two fp32
    # summation orders (cuBLAS and the CUDA kernel) then differ by far more than 1e-4 (H200:
    # 4e0 relative in a gradient entry). Judge against float64, next to the fp32 reference's own error.
    inputs64 = (inputs[0].double(), inputs[1], inputs[2].double(), inputs[3])
    exact = _value_and_grads(_reference, *inputs64, **kw)
    ref32 = _value_and_grads(_reference, *inputs, **kw)
    for out, want, ref in zip((got, *grads), (exact[0], *exact[1]), (ref32[0], *ref32[1])):
        scale_w = float(want.abs().max())
        err = float((out.double() - want).abs().max())
        ref_err = float((ref.double() - want).abs().max())
        assert err <= 4 * ref_err + tol(device, torch.float32)["rtol"] * scale_w, (err, ref_err, scale_w)


def test_noncontiguous_and_multidim_features(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_syn, y_syn, f_real, y_real = _inputs(12, 16, 24, device)
    f_syn4 = f_syn.reshape(12, 2, 3, 4).transpose(2, 3)  # non-contiguous, flattened from dim 1
    f_real4 = f_real.reshape(16, 2, 3, 4).transpose(2, 3)
    assert not f_syn4.is_contiguous()
    _assert_matches(device, backend, (f_syn4, y_syn, f_real4, y_real))
    _assert_matches(device, backend, (f_syn[::2], y_syn[::2], f_real.t().contiguous().t(), y_real))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(device, backend_kind, dtype):
    if backend_kind == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter runs fp32 only")
    backend = require_backend(OP, backend_kind, device)
    f_syn, y_syn, f_real, y_real = _inputs(20, 50, 40, device, dtype=dtype)
    got, (gs, gr) = _value_and_grads(ddfast.supcon_nce, f_syn, y_syn, f_real, y_real, backend=backend)
    want, (ws, wr) = _value_and_grads(_reference, f_syn.float(), y_syn, f_real.float(), y_real)
    assert got.dtype == dtype and gs.dtype == dtype and gr.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol(device, dtype))
    torch.testing.assert_close(gs.float(), ws, **tol(device, dtype))
    torch.testing.assert_close(gr.float(), wr, **tol(device, dtype))


@pytest.mark.parametrize("variant", ["infonce", "nce"])
def test_backward_saves_no_logit_matrix(device, backend_kind, variant):
    if backend_kind == "torch":
        pytest.skip("not applicable: the reference materialises the logits by design")
    backend = require_backend(OP, backend_kind, device)
    f_syn, y_syn, f_real, y_real = _inputs(40, 50, 8, device)
    f_syn.requires_grad_(True)
    f_real.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = ddfast.supcon_nce(f_syn, y_syn, f_real, y_real, variant=variant, backend=backend)
    loss.backward()
    assert saved and max(saved) < 40 * 50  # features, labels and O(n_syn) statistics only


def test_opcheck_compiled_and_triton(device):
    for kind in ("compiled", "triton"):
        try:
            backend = require_backend(OP, kind, device)
        except pytest.skip.Exception:
            continue
        f_syn, y_syn, f_real, y_real = _inputs(9, 13, 20, device)
        f_syn.requires_grad_(True)
        f_real.requires_grad_(True)
        name = "supcon_nce_triton_fwd" if backend == "triton" else "supcon_nce_fwd"
        extra = (True, "ieee") if backend == "triton" else ()  # the Triton op normalises itself
        for nce in (False, True):
            torch.library.opcheck(getattr(torch.ops.ddfast, name),
                                  (f_syn, y_syn, f_real, y_real, 2.0, nce, 0.5, *extra))


def test_torch_compile_traces_without_graph_break(device):
    backend = require_backend(OP, "compiled", device)
    f_syn, y_syn, f_real, y_real = _inputs(9, 13, 20, device)
    f_syn.requires_grad_(True)

    def f(x):
        return ddfast.supcon_nce(x, y_syn, f_real, y_real, backend=backend) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(f_syn)
    (g,) = torch.autograd.grad(got, f_syn)
    want = f(f_syn)
    (w,) = torch.autograd.grad(want, f_syn)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, w)


def test_nan_input_is_named(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    f_syn, y_syn, f_real, y_real = _inputs(5, 6, 4, device)
    f_real[2, 1] = float("nan")
    with pytest.raises(ValueError, match="f_real contains NaN"):
        ddfast.supcon_nce(f_syn, y_syn, f_real, y_real, backend=backend)


@pytest.mark.parametrize("bad, kwargs, err, match", [
    (lambda fs, ys, fr, yr: (fs, ys[:-1], fr, yr), {}, ValueError, "y_syn"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr[:-1]), {}, ValueError, "y_real"),
    (lambda fs, ys, fr, yr: (fs, ys, fr[:, :-1], yr), {}, ValueError, "f_syn and f_real"),
    (lambda fs, ys, fr, yr: (fs, ys.float(), fr, yr), {}, TypeError, "y_syn"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr.double()), {}, TypeError, "y_real"),
    (lambda fs, ys, fr, yr: (fs.long(), ys, fr, yr), {}, TypeError, "f_syn"),
    (lambda fs, ys, fr, yr: (fs, ys, fr.double(), yr), {}, TypeError, "dtype"),
    (lambda fs, ys, fr, yr: (fs[:0], ys[:0], fr, yr), {}, ValueError, "empty"),
    (lambda fs, ys, fr, yr: (fs[0], ys, fr, yr), {}, ValueError, "f_syn"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr), {"temperature": 0.0}, ValueError, "temperature"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr), {"temperature": -1.0}, ValueError, "temperature"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr), {"temperature": "0.1"}, TypeError, "temperature"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr), {"noise_ratio": 0.0}, ValueError, "noise_ratio"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr), {"noise_ratio": -2.0}, ValueError, "noise_ratio"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr), {"variant": "ntxent"}, ValueError, "variant"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr), {"reduction": "max"}, ValueError, "reduction"),
    (lambda fs, ys, fr, yr: (fs, ys, fr, yr), {"normalize": 1}, TypeError, "normalize"),
    (lambda fs, ys, fr, yr: (fs, [0] * 5, fr, yr), {}, TypeError, "y_syn"),
])
def test_bad_input(bad, kwargs, err, match):
    args = bad(*_inputs(5, 6, 4, "cpu"))
    with pytest.raises(err, match=match):
        ddfast.supcon_nce(*args, **kwargs)


def test_tensors_on_different_devices_are_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    f_syn, y_syn, f_real, y_real = _inputs(5, 6, 4, "cpu")
    with pytest.raises(ValueError, match="device"):
        ddfast.supcon_nce(f_syn.cuda(), y_syn.cuda(), f_real, y_real)


# (value rtol, gradient atol relative to the gradient's largest entry) per mode against float64:
# the measured errors (module doc of ddfast/ops/supcon_nce.py) with a 5-10x margin
PRECISION_TOL = {"ieee": (1e-5, 1e-5), "tf32x3": (1e-5, 1e-5), "tf32": (2e-5, 3e-3), "bf16": (2e-4, 3e-2)}


@pytest.mark.parametrize("variant", ["infonce", "nce"])
@pytest.mark.parametrize("precision", list(PRECISION_TOL))
def test_precision_modes_against_float64(device, backend_kind, precision, variant):
    if backend_kind == "triton" and device == "cpu" and precision not in ("ieee", "bf16"):
        pytest.skip("the interpreter runs ieee on rounded operands, as checked for bf16 (GPU modes: sm_90 test)")
    backend = require_backend(OP, backend_kind, device)
    f_syn, y_syn, f_real, y_real = _inputs(30, 90, 40, device, dtype=torch.float64, classes=5, seed=4)
    got, got_grads = _value_and_grads(ddfast.supcon_nce, f_syn.float(), y_syn, f_real.float(), y_real,
                                      variant=variant, precision=precision, backend=backend)
    want, want_grads = _value_and_grads(_reference, f_syn, y_syn, f_real, y_real, variant=variant)
    value_rtol, grad_atol = PRECISION_TOL[precision]
    if precision == "tf32" and backend == "triton" and device == "cuda":
        # Triton's tf32 tensor-core products err more than the round-to-nearest emulation: value
        # error 2.0e-4 (infonce) and 3.4e-4 (nce) measured on an H200 (Triton 3.6); the gradient bound is bf16's
        value_rtol, grad_atol = 1e-3, PRECISION_TOL["bf16"][1]
    torch.testing.assert_close(got.double(), want, rtol=value_rtol, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=grad_atol * float(w.abs().max()))
    if precision in ("tf32", "bf16") and device == "cpu":  # the emulation rounds: not a no-op
        _, ieee_grads = _value_and_grads(ddfast.supcon_nce, f_syn.float(), y_syn, f_real.float(), y_real,
                                         variant=variant, precision="ieee", backend=backend)
        assert not torch.equal(ieee_grads[0], got_grads[0])


def test_precision_is_checked():
    f_syn, y_syn, f_real, y_real = _inputs(3, 4, 5, "cpu")
    with pytest.raises(ValueError, match="precision"):
        ddfast.supcon_nce(f_syn, y_syn, f_real, y_real, precision="fp16")


def test_zero_rows_normalise_like_f_normalize(device, backend_kind):
    """A zero feature row is divided by eps (F.normalize), not by its norm: the fused row scales
    and their backward follow the same rule."""
    backend = require_backend(OP, backend_kind, device)
    f_syn, y_syn, f_real, y_real = _inputs(6, 9, 7, device)
    f_syn[2] = 0.0
    f_real[4] = 0.0
    _assert_matches(device, backend, (f_syn, y_syn, f_real, y_real))


@pytest.mark.parametrize("variant", ["infonce", "nce"])
def test_forward_backward_make_no_host_sync(backend_kind, variant):
    """After a warm-up, forward + backward read nothing back to the host (checks mode "once", the
    CUDA default)."""
    from ddfast._sync import count_syncs

    backend = require_backend(OP, backend_kind, "cpu")
    f_syn, y_syn, f_real, y_real = _inputs(6, 9, 8, "cpu")
    f_syn.requires_grad_(True)
    f_real.requires_grad_(True)
    ddfast.set_checks("once")
    try:
        def step():
            ddfast.supcon_nce(f_syn, y_syn, f_real, y_real, variant=variant, backend=backend).backward()
        step()
        with count_syncs() as syncs:
            step()
    finally:
        ddfast.set_checks(None)
    assert syncs.count == 0, syncs.events


def test_extra_memory_grows_linearly(backend_kind):
    """Doubling n_syn and n_real doubles the fused paths' extra memory (fwd + bwd); the reference's
    logit matrix quadruples it, which shows the measurement can tell the two apart."""
    backend = require_backend(OP, backend_kind, "cpu")
    peaks = []
    for n in (64, 128):
        f_syn, y_syn, f_real, y_real = _inputs(n // 2, n, 16, "cpu")
        f_syn.requires_grad_(True)
        f_real.requires_grad_(True)

        def step():
            ddfast.supcon_nce(f_syn, y_syn, f_real, y_real, backend=backend).backward()
        step()
        peaks.append(peak_alloc_bytes(step))
    ratio = peaks[1] / peaks[0]
    if backend == "torch":
        assert ratio > 3.0, peaks
    else:
        assert ratio < 2.6, peaks


def _sm90_launch(kernel, args, precision, tiles, **flags):
    """A launch as kernel_report records it: GPU-sized arguments (multiples of 16, aligned pointers)."""
    import triton.language as tl  # noqa: F401 - the constexpr dtype names below are Triton's

    enc = [{"tensor": a, "align": 0} if a in ("float32", "int64", "bfloat16") else {"value": a} for a in args]
    kwargs = {k: {"value": v} for k, v in {**flags, **tiles, "PRECISION": precision}.items()}
    kwargs["ACC_DTYPE"] = {"tl_dtype": "fp32"}
    return {"module": "supcon_nce", "kernel": kernel, "dtype": "float32", "args": enc, "kwargs": kwargs}


def test_triton_kernels_compile_for_sm90_with_tensor_cores():
    """Compile (not run) the kernels for an H100 at the GPU tile sizes: tensor-core instructions
    (wgmma/mma) in the tf32 and bf16 modes, no register spills (the fp32 ieee forward included,
    logits stored for the gradient-in-forward path)."""
    from ddfast.kernels.supcon_nce import Tiling

    pytest.importorskip("triton")
    feats = ["float32", "int64", "float32", "int64", "float32", "float32"]
    launches = []
    for precision, store in (("ieee", True), ("tf32", True), ("bf16", False)):
        t = Tiling(1000, 65536, 2048, torch.device("cpu"), torch.float32, precision)
        tiles = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d)
        launches.append(_sm90_launch("_forward_kernel", feats + ["float32"] * 3 + [65536, 256, 65536, 2048, 4096,
                                                                                     10.0, 0.0],
                                     precision, tiles, NCE=False, STORE_LOGITS=store))
    t = Tiling(1000, 65536, 2048, torch.device("cpu"), torch.float32, "tf32")
    tiles = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d)
    launches.append(_sm90_launch("_grad_logits_kernel", feats + ["float32"] * 6 + [1024, 65536, 2048, 0, 4096, 10.0,
                                                                                   0.0],
                                 "tf32", tiles, NCE=False, NORMALIZE=True, LOAD_LOGITS=False))
    launches.append(_sm90_launch("_gemm_kernel", ["float32", 65536, 1, "float32", "float32", "float32", "float32",
                                                  256, 65536, 2048, 8192, 256 * 2048], "tf32",  # split K
                                 dict(BLOCK_M=t.block_m, BLOCK_K=t.gemm_k, BLOCK_D=t.gemm_d), ACCUMULATE=False,
                                 CORRECT=True))
    rows = compile_sm90_as_given(launches)
    for launch, row in zip(launches, rows):
        precision = launch["kwargs"]["PRECISION"]["value"]
        assert row["error"] is None and row["spills"] == 0, row
        assert (row["tensor_core"] > 0) == (precision != "ieee"), row
