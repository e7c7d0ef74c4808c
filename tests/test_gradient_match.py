"""gradient_match against its reference: metrics, groups, reductions, every backend, bad input."""
import pytest
import torch

import ddfast
from ddfast.ops.gradient_match import gradient_match_reference

from conftest import require_backend, tol

OP = "gradient_match"
METRICS = ("ours", "mse", "cos")

# rank 4/1/2/3 mixture; a rank-5 tensor (rows = leading axes); rows longer than one Triton block
# (1030 cols) and than one segment (8200 cols, split and folded back)
MIXED = [(4, 3, 3, 3), (4,), (10, 12), (3, 5, 7), (2, 3, 2, 3)]
LONG_ROWS = [(2, 1030), (1, 8200), (5,)]


def _grads(shapes, device, dtype=torch.float32, groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (groups,) if groups else ()
    real = [torch.randn(lead + s, generator=g, dtype=torch.float64) for s in shapes]
    syn = [r + 0.7 * torch.randn(r.shape, generator=g, dtype=torch.float64) for r in real]
    cast = lambda ts: [t.to(device=device, dtype=dtype) for t in ts]  # noqa: E731
    return cast(syn), cast(real)


def _run(fn, syn, real, weight=None, **kw):
    leaves = [s.detach().clone().requires_grad_(True) for s in syn]
    loss = fn(leaves, real, **kw)
    (loss if weight is None else (loss * weight).sum()).backward()
    return loss.detach(), [p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves]


def _compare(syn, real, backend, device, dtype=torch.float32, **kw):
    weight = None
    if kw.get("reduction") == "none":
        weight = torch.linspace(0.5, 1.5, syn[0].shape[0] if kw.get("grouped") else 1, device=device, dtype=dtype)
    want, want_grads = _run(gradient_match_reference, syn, real, weight, **kw)
    got, got_grads = _run(lambda s, r, **k: ddfast.gradient_match(s, r, backend=backend, **k), syn, real, weight, **kw)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **tol(device, dtype))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol(device, dtype))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_matches_reference_grouped(device, backend_kind, metric, reduction):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads(MIXED, device, groups=3)
    _compare(syn, real, backend, device, metric=metric, grouped=True, reduction=reduction)


@pytest.mark.parametrize("metric", METRICS)
def test_matches_reference_ungrouped(device, backend_kind, metric):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads(MIXED, device)
    _compare(syn, real, backend, device, metric=metric)


@pytest.mark.parametrize("metric", METRICS)
def test_long_rows_and_single_group(device, backend_kind, metric):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads(LONG_ROWS, device, groups=1)
    _compare(syn, real, backend, device, metric=metric, grouped=True, reduction="none")


def test_single_row_single_tensor(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads([(1, 37)], device)
    _compare(syn, real, backend, device, metric="ours")


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_float64(device, backend_kind, metric):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads([(2, 1, 2, 2), (2,), (2, 3)], device, dtype=torch.float64, groups=2)
    syn = [s.requires_grad_(True) for s in syn]
    fn = lambda *s: ddfast.gradient_match(list(s), real, metric, grouped=True, reduction="none",  # noqa: E731
                                          backend=backend)
    assert torch.autograd.gradcheck(fn, tuple(syn), fast_mode=backend == "triton")


def test_float64_parity_tight(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads(MIXED, device, dtype=torch.float64, groups=2)
    _compare(syn, real, backend, device, dtype=torch.float64, metric="ours", grouped=True, reduction="none")


def test_zero_syn_row_contributes_one(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    real = [torch.tensor([[1.0, 2.0, 2.0], [0.5, -1.0, 3.0]], device=device)]
    syn = [torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 3.0]], device=device, requires_grad=True)]
    loss = ddfast.gradient_match(syn, real, backend=backend)
    loss.backward()
    same = 1 - (0.25 + 1 + 9) / (0.25 + 1 + 9 + 1e-6)  # identical row: eps keeps it above 0
    torch.testing.assert_close(loss, torch.tensor(1.0 + same, device=device))
    # d/ds of −<r,s>/(‖r‖‖s‖ + eps) at s = 0 (norm's gradient there is 0, as autograd gives)
    torch.testing.assert_close(syn[0].grad[0], -real[0][0] / 1e-6)


def test_identical_small_gradients_are_not_zero(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    g = [torch.full((2, 4), 1e-4, device=device)]
    loss = ddfast.gradient_match(g, [x.clone() for x in g], backend=backend)
    norm2 = 4e-8
    torch.testing.assert_close(loss, torch.tensor(2 * (1 - norm2 / (norm2 + 1e-6)), device=device))
    assert loss.item() > 1.5


def test_only_rank1_tensors_give_zero(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads([(5,), (3,)], device)
    syn = [s.requires_grad_(True) for s in syn]
    loss = ddfast.gradient_match(syn, real, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert all(s.grad is None or bool((s.grad == 0).all()) for s in syn)


def test_noncontiguous(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads([(6, 4, 3, 3), (9, 10)], device, groups=2)
    syn = [s.transpose(-1, -2) for s in syn]
    real = [r.transpose(-1, -2) for r in real]
    assert not syn[0].is_contiguous()
    _compare(syn, real, backend, device, metric="ours", grouped=True, reduction="none")
    _compare(syn, real, backend, device, metric="cos", grouped=True)


@pytest.mark.parametrize("metric", METRICS)
def test_large_values(device, backend_kind, metric):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads([(4, 3, 2, 2), (10, 12)], device, groups=2)
    syn, real = [s * 1e12 for s in syn], [r * 1e12 for r in real]
    got, got_grads = _run(lambda s, r: ddfast.gradient_match(s, r, metric, grouped=True, backend=backend), syn, real)
    want, want_grads = _run(lambda s, r: gradient_match_reference(s, r, metric, grouped=True), syn, real)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in got_grads)
    torch.testing.assert_close(got, want, **tol(device, torch.float32))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(device, backend_kind, dtype):
    if backend_kind == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter runs fp32 only")
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads([(8, 4, 3, 3), (10, 40)], device, dtype=dtype, groups=2)
    got, got_grads = _run(lambda s, r: ddfast.gradient_match(s, r, grouped=True, backend=backend), syn, real)
    want, want_grads = _run(lambda s, r: gradient_match_reference(s, r, grouped=True),
                            [s.float() for s in syn], [r.float() for r in real])
    assert got.dtype == dtype and got_grads[0].dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol(device, dtype))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.float(), b, **tol(device, dtype))


def test_gradient_flows_through_create_graph(device, backend_kind):
    """As in DC: g_syn = autograd.grad(..., create_graph=True); the loss reaches the images."""
    backend = require_backend(OP, backend_kind, device)
    g = torch.Generator().manual_seed(1)
    conv = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    fc = torch.randn(3, 4 * 16, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    x = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.tensor([0, 1, 2, 0, 1], device=device)
    real = [torch.randn_like(conv), torch.randn_like(fc)]

    def image_grad(fn):
        xs = x.clone().requires_grad_(True)
        out = torch.nn.functional.conv2d(xs, conv, padding=1).relu().flatten(1) @ fc.t()
        gw = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), [conv, fc], create_graph=True)
        fn(list(gw), real).backward()
        return xs.grad

    got = image_grad(lambda s, r: ddfast.gradient_match(s, r, backend=backend))
    want = image_grad(lambda s, r: gradient_match_reference(s, r))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_real_side_gets_no_gradient(device):
    syn, real = _grads([(4, 3)], device)
    syn[0].requires_grad_(True)
    real[0].requires_grad_(True)
    ddfast.gradient_match(syn, real).backward()
    assert syn[0].grad is not None and real[0].grad is None


def test_opcheck_compiled_and_triton(device):
    ran = 0
    for kind in ("compiled", "triton"):
        try:
            backend = require_backend(OP, kind, device)
        except pytest.skip.Exception:
            continue
        name = "gradient_match_triton_fwd" if backend == "triton" else "gradient_match_fwd"
        for metric, grouped, reduction in (("ours", True, "none"), ("cos", False, "sum")):
            syn, real = _grads([(3, 2, 2, 2), (3, 4), (3,)], device, groups=3 if grouped else None)
            syn = [s.requires_grad_(True) for s in syn]
            torch.library.opcheck(getattr(torch.ops.ddfast, name), (syn, real, metric, 1e-6, grouped, reduction))
            ran += 1
    if not ran:
        pytest.skip("no fused backend available")


def test_torch_compile_traces_without_graph_break(device):
    backend = require_backend(OP, "compiled", device)
    syn, real = _grads([(3, 2, 2, 2), (3, 4)], device, groups=2)
    syn = [s.requires_grad_(True) for s in syn]

    def f(*s):
        return ddfast.gradient_match(list(s), real, grouped=True, backend=backend) * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*syn)
    got.backward()
    grads = [s.grad.clone() for s in syn]
    for s in syn:
        s.grad = None
    want = f(*syn)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, s in zip(grads, syn):
        torch.testing.assert_close(a, s.grad)


def _bad_cases():
    s, r = _grads([(3, 4), (3,)], "cpu")
    return [
        (([], []), {}, ValueError, "g_syn is empty"),
        ((s, r[:1]), {}, ValueError, "same length"),
        ((s, [r[0][:, :3], r[1]]), {}, ValueError, r"g_syn\[0\] and g_real\[0\]"),
        ((s, [r[0].double(), r[1]]), {}, TypeError, r"g_real\[0\]"),
        (([s[0].long(), s[1]], r), {}, TypeError, r"g_syn\[0\]"),
        ((s, [r[0], torch.empty(3, device="meta")]), {}, ValueError, r"device; g_real\[1\]"),
        (([s[0][:0], s[1]], [r[0][:0], r[1]]), {}, ValueError, r"g_syn\[0\] is empty"),
        ((s[0], r[0]), {}, TypeError, "g_syn must be a list"),
        ((s, r), {"metric": "l2"}, ValueError, "metric"),
        ((s, r), {"reduction": "mean"}, ValueError, "reduction"),
        (([s[0], s[1][:2]], [r[0], r[1][:2]]), {"grouped": True}, ValueError, "group size"),
        ((s, r), {"eps": -1.0}, ValueError, "eps"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    args, kw, err, match = _bad_cases()[case]
    with pytest.raises(err, match=match):
        ddfast.gradient_match(*args, **kw)


def test_nan_input_is_named(device, backend_kind):
    backend = require_backend(OP, backend_kind, device)
    syn, real = _grads([(3, 4), (2, 5)], device)
    real[1][0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"g_real\[1\] contains NaN"):
        ddfast.gradient_match(syn, real, "mse", backend=backend)
