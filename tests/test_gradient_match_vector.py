"""Triton gradient_match's two launch variants: ALIGNED=True (every address 16-byte aligned and
every column count a multiple of the vector width: 16-byte vector loads throughout) and
ALIGNED=False (each segment checked in the kernel: vectors where it is aligned, scalar loads
elsewhere). Which variant a call launches is read from the launches; both must equal the
reference (the interpreter runs both in-kernel branches)."""
import pytest
import torch

import ddfast
from ddfast.kernels import gradient_match as kernels
from ddfast.ops.gradient_match import gradient_match_reference

from conftest import require_backend, tol

OP = "gradient_match"


class _Spy:
    """Stands in for a @triton.jit kernel: records the ALIGNED constexpr of every launch."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(kwargs["ALIGNED"])
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    log = {"forward": [], "backward": []}
    monkeypatch.setattr(kernels, "_partials_kernel", _Spy(kernels._partials_kernel, log["forward"]))
    monkeypatch.setattr(kernels, "_backward_kernel", _Spy(kernels._backward_kernel, log["backward"]))
    return log


def _tensors(shapes, dtype, offset=0, seed=0):
    """Random tensors; ``offset`` > 0 places each at that element offset inside a larger buffer (a
    contiguous view whose address is not 16-byte aligned when offset·element size is not)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        numel = torch.Size(shape).numel()
        buf = torch.randn(numel + offset, generator=g, dtype=torch.float64).to(dtype)
        out.append(buf[offset:].view(shape))
    return out


def _check(shapes, dtype, metric, offset, launches, expect_aligned):
    require_backend(OP, "triton", "cpu")
    syn, real = _tensors(shapes, dtype, offset), _tensors(shapes, dtype, offset, seed=1)
    if offset:
        assert any(t.data_ptr() % 16 for t in syn)
    leaves = [s.detach().requires_grad_(True) for s in syn]  # views: the syn side keeps its offset
    loss = ddfast.gradient_match(leaves, real, metric, grouped=True, reduction="sum", backend="triton")
    loss.backward()
    ref_leaves = [s.detach().clone().requires_grad_(True) for s in syn]
    want = gradient_match_reference(ref_leaves, real, metric, grouped=True, reduction="sum")
    want.backward()
    assert launches["forward"] == [expect_aligned] and launches["backward"] == [expect_aligned]
    torch.testing.assert_close(loss, want, **tol("cpu", dtype))
    for got, ref in zip(leaves, ref_leaves):
        want_grad = ref.grad if ref.grad is not None else torch.zeros_like(ref)  # rank-1 under "ours"
        torch.testing.assert_close(got.grad, want_grad, **tol("cpu", dtype))


# grouped (G = 2): per-group shapes with column counts 8, 12 and a rank-1 tensor of 4 (fp32 vectors
# of 4); the long row (8200 = 2 segments, both multiples of 4) crosses the segment split
ALIGNED_SHAPES = [(2, 4, 2, 2, 2), (2, 4), (2, 3, 12), (2, 1, 8200)]


@pytest.mark.parametrize("metric", ["ours", "cos"])
def test_aligned_path_fp32(launches, metric):
    _check(ALIGNED_SHAPES, torch.float32, metric, 0, launches, True)


def test_misaligned_address_takes_the_checked_path(launches):
    _check(ALIGNED_SHAPES[:3], torch.float32, "ours", 1, launches, False)


@pytest.mark.parametrize("metric", ["ours", "mse"])
def test_columns_not_a_multiple_of_four_take_the_checked_path(launches, metric):
    # "ours": a row of 6 columns (DC's ConvNet has 27) next to rows of 8; "mse": a flattened tensor
    # of 2·3 = 6 elements per group next to one of 32
    _check([(2, 4, 8), (2, 2, 3), (2, 3, 3, 3, 3)], torch.float32, metric, 0, launches, False)


def test_vector_width_follows_the_dtype(launches):
    """bf16 vectors are 8 elements: 8 columns qualify, 4 do not; fp64 vectors are 2."""
    assert kernels.vector_path(torch.bfloat16, 8, True) == (True, 8)
    assert kernels.vector_path(torch.bfloat16, 4, True) == (False, 8)
    assert kernels.vector_path(torch.float64, 2, True) == (True, 2)
    assert kernels.vector_path(torch.float32, 4, False) == (False, 4)
    _check([(2, 3, 8), (2, 8)], torch.bfloat16, "ours", 0, launches, True)


def test_alignment_is_cached_with_the_address_table():
    a, b = _tensors([(8,), (8,)], torch.float32)
    shifted = _tensors([(8,)], torch.float32, offset=1)[0]
    first = kernels._addresses([a], [b], device="cpu")
    assert first[1] is True and kernels._addresses([a], [b], device="cpu") is first
    assert kernels._addresses([shifted], [b], device="cpu")[1] is False


# --- the compiled kernels: the aligned path is the one with 128-bit loads (sm_90 PTX, no GPU) ---

def _compile(launches):
    """kernel_report's compile step (a process without TRITON_INTERPRET) on hand-written launches."""
    import json
    import os
    import tempfile

    from ddfast import kernel_report as kr

    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "l.json"), os.path.join(tmp, "r.json")
        with open(src, "w") as f:
            json.dump({"launches": launches, "errors": []}, f)
        kr._run_self(["compile", src, out, "--jobs=1"], {"TRITON_INTERPRET": None, "TRITON_DEFAULT_FP_FUSION": "1"},
                     600)
        with open(out) as f:
            return json.load(f)["rows"]


@pytest.mark.slow
def test_aligned_specialisation_compiles_to_128_bit_loads():
    pytest.importorskip("triton.backends.nvidia")
    i64, f32 = {"tensor": "int64", "align": 0}, {"tensor": "float32", "align": 0}
    kw = {"DTYPE": {"tl_dtype": "fp32"}, "ACC": {"tl_dtype": "fp32"}, "BLOCK": {"value": 1024}, "VEC": {"value": 4}}
    launches = []
    for aligned in (False, True):
        flag = {"ALIGNED": {"value": aligned}}
        i32 = {"tensor": "int32", "align": 0}
        launches.append({"module": "gradient_match", "kernel": "_partials_kernel", "dtype": "float32",
                         "args": [i64, {"value": 3}, i64, {"value": 10}, i64, f32, {"value": 1}, i64, {"value": 9},
                                  {"value": 2}, f32, f32, i32],
                         "kwargs": {**kw, **flag, "METRIC": {"value": 0}, "SUM": {"value": True},
                                    "FOLD_BLOCK": {"value": 256}}})
        launches.append({"module": "gradient_match", "kernel": "_backward_kernel", "dtype": "float32",
                         "args": [f32, {"value": 0}, i64, {"value": 3}, i64, i64, {"value": 10}, i64, f32,
                                  {"value": 9}, {"value": 1}],
                         "kwargs": {**kw, **flag}})
    rows = _compile(launches)
    assert [r["error"] for r in rows if r["error"]] == []
    by_path = {(r["kernel"], "ALIGNED=True" in r["spec"]): (r["ldg128"], r["ldg"] - r["ldg128"]) for r in rows}
    for kernel in ("_partials_kernel", "_backward_kernel"):
        (vec_all, scalar_all), (vec_checked, scalar_checked) = by_path[(kernel, True)], by_path[(kernel, False)]
        # ALIGNED=True: vector loads only (the scalar ones read the tables); ALIGNED=False: the
        # checked branch's vector loads plus the fallback's scalar loads
        assert vec_all > 0 and vec_checked > 0 and scalar_checked > scalar_all, by_path


@pytest.mark.slow
@pytest.mark.parametrize("op, kernels", [("gradient_match", {"partials_kernel", "backward_kernel"}),
                                         ("param_match", {"partial_sums_kernel", "backward_kernel"}),
                                         ("class_means", {"segment_mean_kernel", "gather_scale_kernel"}),
                                         ("class_mean_loss", {"segment_mean_kernel", "gather_scale_kernel"})])
def test_cuda_bandwidth_kernels_have_128_bit_loads(op, kernels):
    """nvcc sm_90 SASS (the compile test_cuda_sources.py runs and caches): every dtype instance of the
    bandwidth kernels issues LDG.E.128 (vec16.cuh's vector path)."""
    import os

    from ddfast import kernel_report as kr

    if kr.cuda_home() is None:
        pytest.skip("nvcc not found")
    result = kr.cuda_file_report(os.path.join(kr.REPO, "csrc", "cuda", f"{op}.cu"))
    assert result["returncode"] == 0, result["stderr"][-2000:]
    rows = [r for r in result["rows"] if r["kernel"] in kernels]
    for kernel in kernels:  # every input dtype: float, double, fp16, bf16 (the first template argument)
        assert len({r["spec"].split(",")[0] for r in rows if r["kernel"] == kernel}) == 4, kernel
    assert all(r["ldg128"] and r["ldg128"] > 0 for r in rows), kr.format_table(rows)
