"""supcon_nce's gradient-in-forward path (Triton, scalar reductions): the forward computes the loss and
both feature gradients, panel by panel; the backward only scales them. Checked against the
materialised-logits reference, with one or several panels, and for which path each call takes."""
import pytest
import torch

import ddfast
from ddfast.ops.supcon_nce import supcon_nce_reference

from conftest import require_backend

nk = pytest.importorskip("ddfast.kernels.supcon_nce")
kr = pytest.importorskip("ddfast.kernel_report")

OP = "supcon_nce"
FP32 = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def triton_backend():
    return require_backend(OP, "triton", "cpu")


def _inputs(n_syn, n_real, dim, dtype=torch.float32, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_syn = torch.randn(n_syn, dim, generator=g, dtype=torch.float64).to(dtype)
    f_real = torch.randn(n_real, dim, generator=g, dtype=torch.float64).to(dtype)
    y_syn = torch.randint(0, classes, (n_syn,), generator=g)
    y_real = torch.randint(0, classes, (n_real,), generator=g)
    y_syn[0] = classes + 1  # an anchor without a positive: left out of the infonce mean
    return f_syn, y_syn, f_real, y_real


def _run(fn, inputs, grad_syn, grad_real, upstream=3.7, **kw):
    """(loss, grad f_syn or None, grad f_real or None) of upstream · fn(...)."""
    f_syn, y_syn, f_real, y_real = inputs
    fs = f_syn.clone().requires_grad_(grad_syn)
    fr = f_real.clone().requires_grad_(grad_real)
    loss = fn(fs, y_syn, fr, y_real, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), fs.grad, fr.grad


def _assert_like_reference(inputs, grad_syn=True, grad_real=True, **kw):
    got = _run(ddfast.supcon_nce, inputs, grad_syn, grad_real, backend="triton", **kw)
    want = _run(supcon_nce_reference, inputs, grad_syn, grad_real, **kw)
    torch.testing.assert_close(got[0], want[0], **FP32)
    for g, w in zip(got[1:], want[1:]):
        assert (g is None) == (w is None)
        if w is not None:  # gradients relative to their largest entry (the normalisation's cancellation)
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


@pytest.fixture
def paths(monkeypatch):
    """Counts of the calls to the fused forward and to the recomputing backward."""
    calls = {"fused": 0, "recompute": 0}

    def spy(name, key):
        original = getattr(nk, name)

        def wrapped(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(nk, name, wrapped)

    spy("supcon_nce_fused", "fused")
    spy("supcon_nce_backward", "recompute")
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("variant", ["infonce", "nce"])
@pytest.mark.parametrize("grad_syn, grad_real", [(True, True), (True, False), (False, True)],
                         ids=["both", "syn", "real"])
def test_matches_reference_per_grad_and_reduction(triton_backend, paths, variant, reduction, grad_syn, grad_real):
    inputs = _inputs(13, 17, 9)
    _assert_like_reference(inputs, grad_syn, grad_real, variant=variant, reduction=reduction, temperature=0.3,
                           noise_ratio=2.0)
    assert paths == {"fused": 1, "recompute": 0}


@pytest.mark.parametrize("variant", ["infonce", "nce"])
@pytest.mark.parametrize("normalize", [True, False])
def test_several_panels(triton_backend, paths, monkeypatch, variant, normalize):
    """A 3-row workspace: 4 panels for 10 anchors (the last one of 1 row); grad f_real summed over
    panels, its normalisation term added once; grad f_syn's GEMM in 3 K slices (70 real columns)."""
    inputs = _inputs(10, 70, 7)
    monkeypatch.setattr(nk, "FUSED_WORKSPACE_INTERPRETER", 3 * 70)
    assert nk.fused_panel_rows(10, 70, torch.device("cpu")) == 3
    _assert_like_reference(inputs, variant=variant, normalize=normalize)
    assert paths == {"fused": 1, "recompute": 0}


@pytest.mark.parametrize("variant", ["infonce", "nce"])
def test_gradcheck_float64_several_panels(triton_backend, monkeypatch, variant):
    monkeypatch.setattr(nk, "FUSED_WORKSPACE_INTERPRETER", 2 * 7)
    f_syn, y_syn, f_real, y_real = _inputs(5, 7, 6, dtype=torch.float64)
    f_syn.requires_grad_(True)
    f_real.requires_grad_(True)

    def fn(a, b):
        return ddfast.supcon_nce(a, y_syn, b, y_real, temperature=0.5, variant=variant, noise_ratio=2.0,
                                 backend=triton_backend)
    assert torch.autograd.gradcheck(fn, (f_syn, f_real), fast_mode=True)


def test_backward_launches_no_kernel(triton_backend):
    """The forward stores each logit once and never recomputes it; the backward is a multiply."""
    f_syn, y_syn, f_real, y_real = _inputs(9, 11, 8)
    f_syn.requires_grad_(True)
    f_real.requires_grad_(True)
    forward, backward = [], []
    with kr.recording(forward, lambda: "float32"):
        loss = ddfast.supcon_nce(f_syn, y_syn, f_real, y_real, backend=triton_backend)
    with kr.recording(backward, lambda: "float32"):
        loss.backward()
    assert backward == []
    flags = [(l["kernel"], l["kwargs"].get("STORE_LOGITS"), l["kwargs"].get("LOAD_LOGITS")) for l in forward]
    assert ("_forward_kernel", {"value": True}, None) in flags
    assert ("_grad_logits_kernel", None, {"value": True}) in flags
    assert not any(f[1] == {"value": False} or f[2] == {"value": False} for f in flags)  # no recompute


@pytest.mark.parametrize("case", ["none", "no_grad", "row_too_long"])
def test_other_calls_keep_the_recomputing_path(triton_backend, paths, monkeypatch, case):
    inputs = _inputs(8, 12, 5)
    if case == "none":
        _assert_like_reference(inputs, reduction="none")
        assert paths == {"fused": 0, "recompute": 1}
    elif case == "no_grad":
        with torch.no_grad():
            got = ddfast.supcon_nce(inputs[0].requires_grad_(True), inputs[1], inputs[2], inputs[3],
                                    backend=triton_backend)
        torch.testing.assert_close(got, supcon_nce_reference(*inputs), **FP32)
        assert paths == {"fused": 0, "recompute": 0}
    else:  # one row of 12 logits does not fit an 11-element workspace
        monkeypatch.setattr(nk, "FUSED_WORKSPACE_INTERPRETER", 11)
        _assert_like_reference(inputs)
        assert paths == {"fused": 0, "recompute": 1}


def test_backward_twice_with_retain_graph(triton_backend):
    f_syn, y_syn, f_real, y_real = _inputs(7, 9, 5)
    fs = f_syn.clone().requires_grad_(True)
    loss = ddfast.supcon_nce(fs, y_syn, f_real, y_real, variant="nce", backend=triton_backend)
    loss.backward(retain_graph=True)
    first = fs.grad.clone()
    (loss * 2).backward()
    torch.testing.assert_close(fs.grad, 3 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_panel_rows():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read
    assert nk.fused_panel_rows(1000, 65536, cuda) == nk.FUSED_WORKSPACE_CUDA // 65536 // 64 * 64
    assert nk.fused_panel_rows(10, 65536, cuda) == 10
    assert nk.fused_panel_rows(1000, nk.FUSED_WORKSPACE_CUDA // 40, cuda) == 40  # under one row block
    assert nk.fused_panel_rows(5, nk.FUSED_WORKSPACE_CUDA + 1, cuda) == 0
    assert nk.fused_panel_rows(5, 100, cpu) == 5


def test_executed_flops_match_the_reference():
    """Work model: the logits once plus the two products (the reference's 6·n_syn·n_real·D), tile
    padding aside; the recomputing path does one more logit product."""
    cuda = torch.device("cuda")
    n_syn, n_real, dim = 1000, 65536, 128
    fused = nk.fused_executed_flops(n_syn, n_real, dim, cuda, torch.float32)
    recompute = nk.Tiling(n_syn, n_real, dim, torch.device("cpu"), torch.float32).executed_flops(n_syn, n_real, dim)
    reference = 6.0 * n_syn * n_real * dim
    assert 1.0 <= fused / reference <= 1.05
    assert recompute / reference > 1.3


def test_opcheck_fused_op(triton_backend):
    f_syn, y_syn, f_real, y_real = _inputs(6, 8, 5)
    f_syn.requires_grad_(True)
    f_real.requires_grad_(True)
    torch.library.opcheck(torch.ops.ddfast.supcon_nce_triton_fused,
                          (f_syn, y_syn, f_real, y_real, 2.0, False, 0.0, True, "ieee", True, True, True))
