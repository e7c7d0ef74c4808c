"""mmd against its reference (cdist → exp, the estimator formulas): values, gradients, labels, bad input.

fp32 results are compared with the reference evaluated in float64 on the same values (the oracle;
an fp32 cdist carries its own rounding), within the SPEC's fp32 tolerance (gradients: atol scaled
by the gradient's largest entry).
"""
import pytest
import torch

import ddfast
from ddfast.ops.mmd import median_bandwidths, mmd_reference

from conftest import compile_sm90_as_given, peak_alloc_bytes, require_backend, tol

OP = "mmd"


def _features(n, m, device, dtype=torch.float32, seed=0, shape=(5, 7), shift=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    y = torch.randn((m, *shape), generator=g, dtype=torch.float64) * 1.3 + shift
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _labels(n, m, device, seed=0):
    """Unordered labels over 5 classes: class 3 has no y sample, class 4 none at all."""
    g = torch.Generator().manual_seed(seed + 1)
    x_labels = torch.tensor([0, 1, 2, 3] * (n // 4) + [0, 1, 2, 3][: n % 4])
    y_labels = torch.tensor([0, 1, 2] * (m // 3) + [0, 1, 2][: m % 3])
    x_labels = x_labels[torch.randperm(n, generator=g)]
    y_labels = y_labels[torch.randperm(m, generator=g)]
    return x_labels.to(device), y_labels.to(device)


def _value_and_grads(fn, x, y, reduction):
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    out = fn(x, y)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    (out * weights).sum().backward()  # distinct upstream weights per class for reduction="none"
    return out.detach(), x.grad, y.grad


def _check_against_reference(x, y, backend, device, **kw):
    got = _value_and_grads(lambda a, b: ddfast.mmd(a, b, backend=backend, **kw), x, y, kw.get("reduction"))
    want = _value_and_grads(lambda a, b: mmd_reference(a.double(), b.double(), **kw), x, y, kw.get("reduction"))
    value_tol = tol(device, torch.float32)
    torch.testing.assert_close(got[0].double(), want[0], **value_tol)
    for g, w in zip(got, want):
        assert g.dtype == x.dtype
    for g, w in zip(got[1:], want[1:]):
        # fp32 distances |a|² + |b|² − 2<a, b> carry ~eps·|a|² absolute error, so gradient entries
        # are held to the fp32 tolerance relative to the gradient's scale
        atol = max(value_tol["atol"], value_tol["rtol"] * float(w.abs().max()))
        torch.testing.assert_close(g.double(), w.double(), rtol=value_tol["rtol"], atol=atol)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("labeled", [False, True])
def test_matches_reference(device, backend_kind, kernel, estimator, reduction, labeled):
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(14, 11, device)  # D = 35: not a multiple of any tile
    kw = dict(kernel=kernel, estimator=estimator, reduction=reduction)
    if labeled:
        x_labels, y_labels = _labels(14, 11, device)
        kw.update(x_labels=x_labels, y_labels=y_labels, num_classes=5)
    _check_against_reference(x, y, backend, device, **kw)


@pytest.mark.parametrize("labeled", [False, True])
def test_many_tiles(device, backend_kind, labeled):
    """More than one row block and column tile; classes straddle block boundaries."""
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(70, 61, device, shape=(40,))
    kw = dict(estimator="unbiased", reduction="none")
    if labeled:
        x_labels, y_labels = _labels(70, 61, device)
        kw.update(x_labels=x_labels, y_labels=y_labels)
    _check_against_reference(x, y, backend, device, **kw)


@pytest.mark.parametrize("n, m", [(1, 6), (6, 1), (1, 1)])
def test_single_sample_biased(device, backend_kind, n, m):
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(n, m, device, shape=(9,))
    _check_against_reference(x, y, backend, device, kernel="gaussian", bandwidths=[0.5, 3.0])


def test_class_with_one_sample(device, backend_kind):
    """Biased per-class MMD where a class has one x and one y sample (and another only x samples)."""
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(7, 6, device, shape=(9,))
    x_labels = torch.tensor([0, 0, 1, 0, 2, 2, 0], device=device)
    y_labels = torch.tensor([0, 1, 0, 0, 0, 0], device=device)
    _check_against_reference(x, y, backend, device, bandwidths=[0.5, 3.0], x_labels=x_labels, y_labels=y_labels,
                             reduction="none")


def test_gradcheck_float64(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(5, 4, device, dtype=torch.float64, shape=(3,))
    x_labels, y_labels = torch.tensor([1, 0, 1, 0, 2]), torch.tensor([0, 1, 1, 0])
    x.requires_grad_(True)
    y.requires_grad_(True)
    fast = backend == "triton" and device == "cpu"  # the interpreter is slow: one random direction
    for kernel, estimator in (("gaussian", "unbiased"), ("linear", "biased")):
        def f(a, b):
            # explicit widths: the default ones follow the data's median, a constant for autograd
            widths = [0.7, 2.0] if kernel == "gaussian" else None
            return ddfast.mmd(a, b, kernel=kernel, estimator=estimator, bandwidths=widths,
                              x_labels=x_labels.to(device), y_labels=y_labels.to(device), reduction="none",
                              backend=backend)
        assert torch.autograd.gradcheck(f, (x, y), fast_mode=fast)


def test_default_bandwidths_rule():
    x, y = _features(700, 500, "cpu", shape=(3,))
    got = median_bandwidths(x.reshape(700, -1), y.reshape(500, -1))
    z = torch.cat([x, y]).reshape(1200, -1)
    sub = z[[k * 1200 // 1024 for k in range(1024)]]
    dist = torch.cdist(sub.double(), sub.double())
    iu = torch.triu_indices(1024, 1024, offset=1)
    med = dist[iu[0], iu[1]].median()
    want = med * torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    same = torch.ones(4, 3)
    assert median_bandwidths(same, same).tolist() == [0.25, 0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("bandwidths", [2.0, [0.5, 4.0], torch.tensor([1.0, 2.0, 8.0])])
def test_explicit_bandwidths(device, backend_kind, bandwidths):
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(9, 7, device, shape=(6,))
    _check_against_reference(x, y, backend, device, bandwidths=bandwidths, estimator="unbiased")


def test_linear_per_class_equals_class_mean_loss(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(14, 11, device, dtype=torch.float64)
    x_labels, y_labels = _labels(14, 11, device)
    y_labels = y_labels.int()  # any integer dtype
    got = ddfast.mmd(x, y, kernel="linear", x_labels=x_labels, y_labels=y_labels, num_classes=5,
                     reduction="none", backend=backend)
    want = torch.zeros(5, dtype=torch.float64, device=device)
    for c in range(5):
        xc, yc = x[x_labels == c].flatten(1), y[y_labels == c].flatten(1)
        if len(xc) and len(yc):  # DM: classes present on both sides
            want[c] = ((xc.mean(0) - yc.mean(0)) ** 2).sum()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_huge_distances_stay_finite(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(8, 6, device, shape=(5,))
    for shift, scale in ((1e6, 1.0), (0.0, 1e15)):
        a = (x * scale).requires_grad_(True)
        b = (y * scale + shift).requires_grad_(True)
        got = ddfast.mmd(a, b, bandwidths=None if scale > 1 else [1.0, 2.0], backend=backend)
        got.backward()
        assert torch.isfinite(got) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # in float64 the far-apart cross terms underflow to 0 and the rest still matches the reference
    x, y = _features(8, 6, device, dtype=torch.float64, shape=(5,))
    got = ddfast.mmd(x, y + 1e4, bandwidths=[1.0, 2.0], backend=backend)
    want = mmd_reference(x, y + 1e4, bandwidths=[1.0, 2.0])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_noncontiguous_inputs(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(12, 9, device, shape=(6, 4))
    x, y = x.transpose(1, 2), y[::2]  # views that are not contiguous
    assert not x.is_contiguous() and not y.is_contiguous()
    _check_against_reference(x, y, backend, device, estimator="unbiased")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(device, backend_kind, dtype):
    if backend_kind == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter runs fp32 only")
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(10, 8, device, dtype=dtype, shape=(16,))
    x.requires_grad_(True)
    got = ddfast.mmd(x, y, backend=backend)
    got.backward()
    x32 = x.detach().float().requires_grad_(True)
    want = mmd_reference(x32, y.float())
    want.backward()
    assert got.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol(device, dtype))
    torch.testing.assert_close(x.grad.float(), x32.grad, **tol(device, dtype))


def test_reduction_none_without_labels_has_one_class(device):
    x, y = _features(4, 5, device)
    out = ddfast.mmd(x, y, reduction="none")
    assert out.shape == (1,)
    torch.testing.assert_close(out[0], ddfast.mmd(x, y))


def test_auto_matches_reference_and_grads_flow(device):
    x, y = _features(6, 5, device)
    x.requires_grad_(True)
    y.requires_grad_(True)
    ddfast.mmd(x, y).backward()
    assert x.grad is not None and y.grad is not None


@pytest.mark.parametrize("kind, name, extra", [("compiled", "mmd_fwd", ()), ("triton", "mmd_triton_fwd", ("ieee",))])
def test_opcheck(device, kind, name, extra):
    require_backend(OP, kind, device)
    x, y = _features(9, 7, device, shape=(5,))
    z = torch.cat([x, y]).contiguous().requires_grad_(True)
    cls = torch.tensor([0] * 7 + [1] * 9, device=device)
    side = torch.tensor([0, 1] * 8, dtype=torch.int32, device=device)
    offsets = torch.tensor([0, 7, 16], device=device)
    coefs = torch.tensor([0.5, 0.125], device=device)
    torch.library.opcheck(getattr(torch.ops.ddfast, name), (z, cls, side, offsets, coefs, False, True, *extra))


def test_torch_compile_traces_without_graph_break(device):
    backend = require_backend(OP, "compiled", device)
    x, y = _features(10, 9, device, shape=(6,))
    x.requires_grad_(True)

    def f(a):
        return ddfast.mmd(a, y, backend=backend) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got.backward()
    g = x.grad.clone()
    x.grad = None
    want = f(x)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, x.grad)


# (value rtol, gradient atol relative to the gradient's largest entry) per mode against float64:
# the measured errors (module doc of ddfast/ops/mmd.py) with a 5-10x margin
PRECISION_TOL = {"ieee": (1e-5, 1e-5), "tf32x3": (1e-5, 1e-5), "tf32": (1e-4, 3e-3), "bf16": (2e-4, 2e-2)}


@pytest.mark.parametrize("precision", list(PRECISION_TOL))
def test_precision_modes_against_float64(device, backend_kind, precision):
    if backend_kind == "triton" and device == "cpu" and precision not in ("ieee", "bf16"):
        pytest.skip("the interpreter runs ieee on rounded operands, as checked for bf16 (GPU modes: sm_90 test)")
    backend = require_backend(OP, backend_kind, device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 24, generator=g, dtype=torch.float64)
    y = torch.randn(30, 24, generator=g, dtype=torch.float64) * 1.2 + 0.3
    widths = [2.0, 4.0, 8.0]
    f = lambda a, b: ddfast.mmd(a, b, bandwidths=widths, precision=precision, backend=backend)  # noqa: E731
    got = _value_and_grads(f, x.to(device, torch.float32), y.to(device, torch.float32), "sum")
    want = _value_and_grads(lambda a, b: mmd_reference(a, b, bandwidths=widths), x.to(device), y.to(device), "sum")
    value_rtol, grad_atol = PRECISION_TOL[precision]
    if precision == "tf32" and backend == "triton" and device == "cuda":
        # Triton's tf32 tensor-core products err more than the round-to-nearest emulation: value
        # error 2.1e-3 measured on an H200 (Triton 3.6); the gradient bound is bf16's
        value_rtol, grad_atol = 5e-3, PRECISION_TOL["bf16"][1]
    torch.testing.assert_close(got[0].double(), want[0], rtol=value_rtol, atol=0)
    for g_got, g_want in zip(got[1:], want[1:]):
        torch.testing.assert_close(g_got.double(), g_want, rtol=0, atol=grad_atol * float(g_want.abs().max()))
    if precision in ("tf32", "bf16") and device == "cpu":
        # the emulation is the formula on operands rounded like a tensor core rounds them: not a no-op
        ieee = _value_and_grads(lambda a, b: ddfast.mmd(a, b, bandwidths=widths, precision="ieee", backend=backend),
                                x.float(), y.float(), "sum")
        assert not torch.equal(ieee[1], got[1])


def test_precision_is_checked():
    x, y = _features(4, 5, "cpu")
    with pytest.raises(ValueError, match="precision"):
        ddfast.mmd(x, y, precision="fp8")
    with pytest.raises(TypeError, match="precision"):
        ddfast.mmd(x, y, precision=None)


@pytest.mark.parametrize("estimator, labeled", [("biased", False), ("unbiased", False), ("biased", True)])
def test_forward_backward_make_no_host_sync(backend_kind, estimator, labeled):
    """After a warm-up, forward + backward read nothing back to the host (the CUDA default checks
    mode "once" is set; with labels, num_classes is given: inferring it is a read by definition)."""
    from ddfast._sync import count_syncs

    backend = require_backend(OP, backend_kind, "cpu")
    if backend == "torch" and labeled:
        pytest.skip("the reference selects each class with a boolean mask (a sync per class)")
    x, y = _features(20, 15, "cpu", shape=(6,))
    x.requires_grad_(True)
    y.requires_grad_(True)
    kw = dict(x_labels=_labels(20, 15, "cpu")[0], y_labels=_labels(20, 15, "cpu")[1], num_classes=5) if labeled else {}
    if backend == "torch":
        kw = {}
    ddfast.set_checks("once")
    try:
        def step():
            ddfast.mmd(x, y, estimator=estimator, backend=backend, **kw).backward()
        step()
        with count_syncs() as syncs:
            step()
    finally:
        ddfast.set_checks(None)
    assert syncs.count == 0, syncs.events


def test_extra_memory_grows_linearly(backend_kind):
    """Doubling N = M doubles the fused paths' extra memory (fwd + bwd); the reference's N×M kernel
    matrices quadruple it, which shows the measurement can tell the two apart."""
    backend = require_backend(OP, backend_kind, "cpu")
    peaks = []
    for n in (48, 96):
        x, y = _features(n, n, "cpu", shape=(8,))
        x.requires_grad_(True)
        y.requires_grad_(True)

        def step():
            ddfast.mmd(x, y, bandwidths=[1.0, 2.0], backend=backend).backward()
        step()
        peaks.append(peak_alloc_bytes(step))
    ratio = peaks[1] / peaks[0]
    if backend == "torch":
        assert ratio > 3.3, peaks
    else:
        assert ratio < 2.6, peaks


def _sm90_launches(z_dtype: str, precision: str, kernels):
    """Launches as kernel_report records them, with the launcher's block sizes and warps (Tiling) at
    GPU sizes: R = 65536 rows, D = 2048 features, a 512-column backward panel."""
    from ddfast.kernels.mmd import Tiling

    t = Tiling(65536, 2048, torch.device("cpu"), getattr(torch, z_dtype))  # block sizes: device-independent
    ws = "bfloat16" if precision == "bf16" or z_dtype == "bfloat16" else z_dtype

    def ptrs(*types):
        return [{"tensor": ty, "align": 0} for ty in types]

    sizes = [{"value": v} for v in (65536, 2048, 2048)]
    panel = [{"value": 0}, {"value": 512}]
    tile = dict(NUM_BW=5, LINEAR=False, UNBIASED=False, BLOCK=t.block, BLOCK_K=t.block_k, num_warps=t.warps)
    args = {
        "_mmd_fwd_kernel": (ptrs(z_dtype, "float32", "int64", "int32", "int64", "float32", "float32") + sizes, tile),
        "_mmd_grad_tile_kernel": (ptrs("float32", z_dtype, "float32", "int64", "int32", "int64", "float32", ws,
                                       "float32") + sizes + panel, tile),
        "_mmd_gemm_kernel": (ptrs(ws, z_dtype, "float32", "int64", "int64", "float32") + sizes + panel,
                             dict(ACCUMULATE=True, LINEAR=False, BLOCK=t.block, BLOCK_K=t.gemm_k, BLOCK_D=t.gemm_d)),
    }
    launches = []
    for kernel in kernels:
        enc, consts = args[kernel]
        kwargs = {k: {"value": v} for k, v in {**consts, "PRECISION": precision}.items()}
        kwargs["ACC_DTYPE"] = {"tl_dtype": "fp32"}
        launches.append({"module": "mmd", "kernel": kernel, "dtype": z_dtype, "args": enc, "kwargs": kwargs})
    return launches


def test_triton_kernels_compile_for_sm90_with_tensor_cores():
    """Compile (not run) the kernels for an H100 as the launcher issues them (block sizes and warps):
    no register spills, in the fp32 FMA products ("ieee", which spilled at 4 warps) too, and
    tensor-core instructions (wgmma/mma) in the tf32 and bf16 modes."""
    pytest.importorskip("triton")
    tiles = ["_mmd_fwd_kernel", "_mmd_grad_tile_kernel"]
    launches = (_sm90_launches("float32", "ieee", tiles)
                + _sm90_launches("float32", "tf32", tiles + ["_mmd_gemm_kernel"])
                + _sm90_launches("float32", "bf16", ["_mmd_fwd_kernel"])
                + _sm90_launches("bfloat16", "ieee", tiles))
    rows = compile_sm90_as_given(launches)
    assert len(rows) == len(launches)
    for launch, row in zip(launches, rows):
        fma_only = launch["dtype"] == "float32" and launch["kwargs"]["PRECISION"]["value"] == "ieee"
        assert row["error"] is None and row["spills"] == 0, row
        assert (row["tensor_core"] > 0) == (not fma_only), row


def _bad(**changes):
    x, y = _features(6, 5, "cpu")
    x_labels, y_labels = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 1])
    kw = dict(x=x, y=y, x_labels=x_labels, y_labels=y_labels)
    kw.update(changes)
    return kw


@pytest.mark.parametrize("kw, err, match", [
    (_bad(estimator="unbiased", y_labels=torch.tensor([0, 1, 1, 1, 1])), ValueError, "y_labels class 0"),
    (dict(x=torch.randn(1, 4), y=torch.randn(3, 4), estimator="unbiased"), ValueError, "unbiased.*x has 1"),
    (_bad(x_labels=torch.tensor([0.0, 1, 0, 1, 0, 1])), TypeError, "x_labels"),
    (_bad(y_labels=torch.tensor([0, 1, 0, 1, 7]), num_classes=3), ValueError, "y_labels"),
    (_bad(x_labels=torch.tensor([0, 1, 0, -1, 0, 1])), ValueError, "x_labels"),
    (_bad(x_labels=torch.tensor([0, 1, 0])), ValueError, "x_labels"),
    (_bad(y_labels=None), ValueError, "y_labels"),
    (_bad(y=torch.randn(5, 36)), ValueError, "same number of features"),
    (_bad(bandwidths=[1.0, 0.0]), ValueError, "bandwidths"),
    (_bad(bandwidths=-2.0), ValueError, "bandwidths"),
    (_bad(bandwidths="wide"), TypeError, "bandwidths"),
    (_bad(kernel="linear", bandwidths=1.0), ValueError, "bandwidths"),
    (_bad(kernel="rbf"), ValueError, "kernel"),
    (_bad(estimator="mvue"), ValueError, "estimator"),
    (_bad(reduction="mean"), ValueError, "reduction"),
    (_bad(num_classes=2.5), TypeError, "num_classes"),
    (_bad(x=torch.randn(0, 5, 7), x_labels=torch.zeros(0, dtype=torch.long)), ValueError, "x is empty"),
    (_bad(y=torch.randint(0, 3, (5, 5, 7))), TypeError, "y must be a floating"),
    (_bad(y=torch.randn(5, 5, 7, dtype=torch.float64)), TypeError, "dtype"),
])
def test_bad_input(kw, err, match):
    with pytest.raises(err, match=match):
        ddfast.mmd(**kw)


def test_nan_input_is_named(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    x, y = _features(6, 5, device)
    y[2, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="y contains NaN"):
        ddfast.mmd(x, y, bandwidths=1.0, backend=backend)


def test_auto_hands_large_exact_fp32_work_to_blas():
    """H200 (validate 2026-11-26): Triton's ieee dot 260 ms vs the reference's cuBLAS 75.7 ms at
    8192 x 8192 x 2048; Triton faster at 10 x 500 x 500 x 2048 and 256 x 256 x 64."""
    from ddfast.ops.mmd import BLAS_PAIR_WORK, blas_is_faster, reference_bytes

    big = 8192 * 8192 * 2048
    assert blas_is_faster("triton", torch.float32, "ieee", big, 2048)
    assert not blas_is_faster("triton", torch.float32, "ieee", 500 * 500 * 2048, 2048)
    assert not blas_is_faster("triton", torch.float32, "ieee", 256 * 256 * 64, 64)
    assert not blas_is_faster("triton", torch.float32, "ieee", 2 ** 36, 16)  # exp-bound: the kernel
    assert 500 * 500 * 2048 < BLAS_PAIR_WORK < big
    for dtype, precision in ((torch.float32, "tf32"), (torch.float32, "bf16"), (torch.bfloat16, "ieee")):
        assert not blas_is_faster("triton", dtype, precision, big, 2048)  # tensor-core Triton wins there
        assert blas_is_faster("cuda", dtype, precision, big, 2048)  # the SIMT kernel (341-363 ms) does not
    # the reference's working set: 5.76 GB measured at 8192 x 8192, 5 bandwidths, fp32
    assert abs(reference_bytes(8192, 8192, 5, 4) / 5.76e9 - 1) < 0.05


def test_centred_reference_keeps_fp32_accuracy_on_offset_features():
    """The BLAS path centres the features as the kernels do; the plain reference loses 5 % here."""
    from ddfast.ops.mmd import _reference_centred

    g = torch.Generator().manual_seed(0)
    x = 50 + 0.05 * torch.randn(300, 512, generator=g)
    y = 50 + 0.05 * torch.randn(300, 512, generator=g) + 0.01
    bw = [0.5, 1.0, 2.0]
    exact = mmd_reference(x.double(), y.double(), bandwidths=torch.tensor(bw, dtype=torch.float64))
    xc, yc = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    centred = _reference_centred(xc, yc, kernel="gaussian", bandwidths=torch.tensor(bw), estimator="biased",
                                 reduction="sum")
    assert abs(centred.item() / exact.item() - 1) < 1e-4
    xd = x.double().requires_grad_(True)
    mmd_reference(xd, y.double(), bandwidths=torch.tensor(bw, dtype=torch.float64)).backward()
    centred.backward()
    torch.testing.assert_close(xc.grad.double(), xd.grad, rtol=1e-3, atol=1e-3 * xd.grad.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_takes_the_reference_for_large_exact_fp32(monkeypatch):
    import ddfast.ops.mmd as mmd_mod

    calls = []
    real = mmd_mod.mmd_reference
    monkeypatch.setattr(mmd_mod, "mmd_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # exact fp32: what the switch is for
    try:
        x = torch.randn(2048, 4096, device="cuda")  # N·M·D = 2^34: the switch
        y = torch.randn(2048, 4096, device="cuda") + 0.1
        big = ddfast.mmd(x, y, bandwidths=[64.0, 128.0])
        assert calls == [1]
        kernel = ddfast.mmd(x, y, bandwidths=[64.0, 128.0], backend="triton")  # explicit: the kernel
        ddfast.mmd(x[:256, :64], y[:256, :64], bandwidths=[8.0])  # small: the kernel
        labels = torch.zeros(2048, dtype=torch.long, device="cuda")
        ddfast.mmd(x, y, bandwidths=[64.0], x_labels=labels, y_labels=labels)  # labeled: the kernel
        assert calls == [1]
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(big, kernel, rtol=1e-4, atol=1e-6)
