"""gradient_match's forward fold in the partials epilogue (one forward launch): per-group arrival
counters, the last program of a group folds it, the last group folder sums the groups (reduction
"sum") in a fixed order. Rows are split over several segments with a small SEG so the fold really
re-joins segments written by different programs. Triton runs in the CPU interpreter; the CUDA
tests need a GPU and skip without one."""
import pytest
import torch

import ddfast
from ddfast.kernels import gradient_match as kernels
from ddfast.ops.gradient_match import gradient_match_reference

from conftest import LaunchSpy, require_backend, tol

OP = "gradient_match"
METRICS = ("ours", "mse", "cos")
# rank 4 (rows of 12 columns), rank 1 (contributes 0 under "ours"), rank 2 (rows of 20), rank 0 and
# rank 3: with SEG = 8 the rows take 2 and 3 segments, the flattened tensors (mse/cos) 1 to 5
SHAPES = [(2, 3, 2, 2), (5,), (2, 20), (), (2, 3, 5)]
SMALL_SEG = 8  # a multiple of every vector width (fp32 4, fp64 2, half types 8), as SEG must be


@pytest.fixture
def small_segments(monkeypatch):
    """SEG = 8 for the Triton tables (cached per shape signature: cleared around the test)."""
    kernels._tables.cache_clear()
    monkeypatch.setattr(kernels, "SEG", SMALL_SEG)
    yield
    kernels._tables.cache_clear()


@pytest.fixture
def launches(monkeypatch):
    """Every launchable @triton.jit kernel of the module (the ``*_kernel`` ones; the other jit
    functions are device helpers they call), spied: the names launched, in order."""
    from triton.runtime.jit import KernelInterface

    log = []
    names = [n for n, obj in vars(kernels).items() if isinstance(obj, KernelInterface) and n.endswith("_kernel")]
    assert set(names) == {"_partials_kernel", "_backward_kernel"}
    for name in names:
        monkeypatch.setattr(kernels, name, LaunchSpy(name, getattr(kernels, name), log))
    return log


@pytest.fixture
def counters(monkeypatch):
    """The arrival-counter buffers the forward takes, kept for inspection after the call."""
    taken = []
    original = kernels.arrival_counters

    def spy(n, device):
        buf = original(n, device)
        taken.append(buf)
        return buf

    monkeypatch.setattr(kernels, "arrival_counters", spy)
    return taken


def _grads(shapes, dtype, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (groups,) if groups else ()
    real = [torch.randn(lead + s, generator=g, dtype=torch.float64) for s in shapes]
    syn = [r + 0.7 * torch.randn(r.shape, generator=g, dtype=torch.float64) for r in real]
    return [s.to(dtype) for s in syn], [r.to(dtype) for r in real]


def _forward_backward(fn, syn, real, reduction):
    leaves = [s.detach().clone().requires_grad_(True) for s in syn]
    loss = fn(leaves, real)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * weight).sum().backward()
    return loss.detach(), [p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype, groups", [(torch.float32, None), (torch.float32, 2), (torch.float64, 1)])
def test_fold_matches_reference_and_is_bitwise_stable(small_segments, launches, counters, metric, reduction, groups,
                                                      dtype):
    require_backend(OP, "triton", "cpu")
    syn, real = _grads(SHAPES, dtype, groups)
    kw = dict(metric=metric, grouped=groups is not None, reduction=reduction)
    fused = lambda s, r: ddfast.gradient_match(s, r, backend="triton", **kw)  # noqa: E731
    got, got_grads = _forward_backward(fused, syn, real, reduction)
    want, want_grads = _forward_backward(lambda s, r: gradient_match_reference(s, r, **kw), syn, real, reduction)
    # one forward launch (the fold is the epilogue), one backward launch
    assert launches == ["_partials_kernel", "_backward_kernel"]
    g = groups or 1
    assert [tuple(c.shape) for c in counters] == [(g + 1,)] and int(counters[0].abs().sum()) == 0
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else tol("cpu", dtype)
    torch.testing.assert_close(got, want, **tolerance)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tolerance)
    if metric == "ours":  # the rank-1 tensor: zero gradient
        assert bool((got_grads[1] == 0).all())
    again, again_grads = _forward_backward(fused, syn, real, reduction)
    assert torch.equal(again, got) and all(torch.equal(a, b) for a, b in zip(again_grads, got_grads))


def test_tables_really_split_rows(small_segments):
    """The fixture's SEG reaches the tables: rows of 12 and 20 columns take 2 and 3 segments."""
    seg, rows, *_ = kernels._tables(((3, 4, 3, 2, 2), (3, 3, 20)), "ours", True, "cpu")
    assert rows[1].tolist() == [2] * 4 + [3] * 3
    assert int(seg[2].max()) == SMALL_SEG and seg.shape[1] == 4 * 2 + 3 * 3
    seg, *_ = kernels._tables(tuple((3,) + s for s in SHAPES), "cos", True, "cpu")
    assert seg.shape[1] == 3 + 1 + 5 + 1 + 4  # ceil(numel / 8): 24, 5, 40, 1, 30 elements


@pytest.mark.parametrize("metric", METRICS)
def test_counters_left_at_zero_when_reused(small_segments, monkeypatch, metric):
    """As on CUDA (one buffer per stream): a buffer shared by consecutive launches is left at zero by
    each, so the second call folds correctly too."""
    require_backend(OP, "triton", "cpu")
    shared = torch.zeros(64, dtype=torch.int32)
    monkeypatch.setattr(kernels, "arrival_counters", lambda n, device: shared[:n])
    syn, real = _grads(SHAPES, torch.float64, 3)
    for reduction in ("sum", "none", "sum"):
        got = ddfast.gradient_match(syn, real, metric, grouped=True, reduction=reduction, backend="triton")
        want = gradient_match_reference(syn, real, metric, grouped=True, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert int(shared.abs().sum()) == 0


def test_only_rank1_tensors_fold_to_zero(small_segments, counters):
    require_backend(OP, "triton", "cpu")
    syn, real = _grads([(20,), (3,)], torch.float32, 2)
    leaves = [s.requires_grad_(True) for s in syn]
    loss = ddfast.gradient_match(leaves, real, grouped=True, reduction="none", backend="triton")
    loss.sum().backward()
    assert loss.tolist() == [0.0, 0.0] and all(bool((p.grad == 0).all()) for p in leaves)
    assert int(counters[0].abs().sum()) == 0


# --- CUDA (a GPU only): both fused backends, bitwise equal across calls ------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("backend_kind", ["compiled", "triton"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_fold_matches_reference_and_is_bitwise_stable(backend_kind, metric, reduction):
    backend = require_backend(OP, backend_kind, "cuda")
    # ResNet-like rows (4608 columns, 2 per warp block), a 27-column first layer, rank-1 tensors,
    # and a row of 8200 columns split over two segments; 10 groups
    shapes = [(64, 3, 3, 3), (64,), (512, 512, 3, 3), (10, 8200), (10,)]
    syn, real = _grads(shapes, torch.float32, 10)
    syn, real = [s.cuda() for s in syn], [r.cuda() for r in real]
    kw = dict(metric=metric, grouped=True, reduction=reduction)
    fused = lambda s, r: ddfast.gradient_match(s, r, backend=backend, **kw)  # noqa: E731
    got, got_grads = _forward_backward(fused, syn, real, reduction)
    want, want_grads = _forward_backward(lambda s, r: gradient_match_reference(s, r, **kw), syn, real, reduction)
    torch.testing.assert_close(got, want, **tol("cuda", torch.float32))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol("cuda", torch.float32))
    for _ in range(3):
        again, again_grads = _forward_backward(fused, syn, real, reduction)
        assert torch.equal(again, got) and all(torch.equal(a, b) for a, b in zip(again_grads, got_grads))


@cuda
@pytest.mark.parametrize("backend_kind", ["compiled", "triton"])
def test_cuda_float64_tight(backend_kind):
    backend = require_backend(OP, backend_kind, "cuda")
    syn, real = _grads([(7, 3, 3, 3), (7,), (9, 9000), ()], torch.float64, 3)
    syn, real = [s.cuda() for s in syn], [r.cuda() for r in real]
    for metric in METRICS:
        for reduction in ("sum", "none"):
            got = ddfast.gradient_match(syn, real, metric, grouped=True, reduction=reduction, backend=backend)
            want = gradient_match_reference(syn, real, metric, grouped=True, reduction=reduction)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@cuda
@pytest.mark.parametrize("backend_kind", ["compiled", "triton"])
def test_cuda_counters_survive_changing_groups_and_interleaved_bn_stat(backend_kind):
    """One stream, the counter buffer reused: G = 2 → 300 → 2 (it grows, then is reused), every metric,
    sum/none alternating, with bn_stat (which shares the Triton counters) between the calls; and
    G = 4096 with "sum" over few segments (the second-level counter). Every result equals the reference."""
    from ddfast.kernels._common import arrival_counters
    from ddfast.ops.bn_stat import bn_stat_loss_reference

    backend = require_backend(OP, backend_kind, "cuda")
    x = torch.randn(4, 6, 5, 5, device="cuda")
    rm, rv = torch.randn(6, device="cuda"), torch.rand(6, device="cuda") + 0.5
    for step, (groups, metric) in enumerate([(2, "ours"), (300, "mse"), (2, "cos"), (300, "ours"), (4096, "cos")]):
        reduction = "sum" if step % 2 == 0 else "none"
        syn, real = _grads([(3, 2, 3, 3), (3,), (5, 7)], torch.float64, groups, seed=step)
        syn, real = [s.cuda() for s in syn], [r.cuda() for r in real]
        got = ddfast.gradient_match(syn, real, metric, grouped=True, reduction=reduction, backend=backend)
        want = gradient_match_reference(syn, real, metric, grouped=True, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ddfast.bn_stat_loss(x, rm, rv, backend=backend),
                                   bn_stat_loss_reference(x, rm, rv), **tol("cuda", torch.float32))
    torch.cuda.synchronize()
    assert int(arrival_counters(64, torch.device("cuda")).abs().sum()) == 0


@cuda
@pytest.mark.parametrize("backend_kind", ["compiled", "triton"])
def test_cuda_two_streams_with_different_groups(backend_kind):
    backend = require_backend(OP, backend_kind, "cuda")
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    inputs = [_grads([(4, 3, 3, 3), (9, 40)], torch.float64, g, seed=g) for g in (3, 50)]
    inputs = [([s.cuda() for s in syn], [r.cuda() for r in real]) for syn, real in inputs]
    torch.cuda.synchronize()
    results = []
    for _ in range(5):
        for stream, (syn, real) in zip(streams, inputs):
            with torch.cuda.stream(stream):
                results.append((stream, ddfast.gradient_match(syn, real, "ours", grouped=True, reduction="sum",
                                                              backend=backend)))
    torch.cuda.synchronize()
    for i, (_, got) in enumerate(results):
        syn, real = inputs[i % 2]
        want = gradient_match_reference(syn, real, "ours", grouped=True, reduction="sum")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@cuda
@pytest.mark.parametrize("backend_kind", ["compiled", "triton"])
def test_cuda_graph_replays_equal_eager(backend_kind):
    """Forward + backward captured in a CUDA graph (the counters' fill is captured too) and replayed
    with new inputs copied in: every replay equals an eager call, and eager calls after the capture
    still fold correctly."""
    backend = require_backend(OP, backend_kind, "cuda")
    shapes = [(8, 3, 3, 3), (8,), (10, 72)]
    syn, real = _grads(shapes, torch.float32, 4)
    static_syn = [s.cuda().requires_grad_(True) for s in syn]
    static_real = [r.cuda() for r in real]
    kw = dict(metric="ours", grouped=True, reduction="sum", backend=backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (compiles, caches the tables)
        for _ in range(2):
            ddfast.gradient_match(static_syn, static_real, **kw).backward()
    torch.cuda.current_stream().wait_stream(side)
    for p in static_syn:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = ddfast.gradient_match(static_syn, static_real, **kw)
        static_loss.backward()
    for seed in range(1, 4):
        new_syn, new_real = _grads(shapes, torch.float32, 4, seed=seed)
        with torch.no_grad():
            for dst, src in zip(static_syn + static_real, new_syn + new_real):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        leaves = [s.cuda().requires_grad_(True) for s in new_syn]
        eager = ddfast.gradient_match(leaves, [r.cuda() for r in new_real], **kw)
        eager.backward()
        assert torch.equal(static_loss, eager.detach())
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(static_syn, leaves))
