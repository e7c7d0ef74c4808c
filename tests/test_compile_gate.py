"""GPU properties checked without a GPU: every Triton kernel compiles for sm_90 at the
specialisations the ops launch (recorded in the interpreter), no register spills in hot kernels,
and the TF32 setting is read without raising. The CUDA sources' side is in test_cuda_sources.py."""
import json

import pytest
import torch

triton = pytest.importorskip("triton")

from ddfast import kernel_report as kr  # noqa: E402
from ddfast.kernels._common import dot_precision, fp32_matmul_allows_tf32  # noqa: E402


# --- the gate ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gate():
    """Record every op's launches (interpreter), compile the gate set for sm_90 (subprocess)."""
    return kr.triton_report(level="gate")


@pytest.mark.slow
def test_every_triton_kernel_is_launched_by_the_recorded_ops(gate):
    assert gate["errors"] == []
    assert gate["never_launched"] == [], "add a call that launches these kernels to kernel_report._op_calls"


@pytest.mark.slow
def test_every_specialisation_compiles_for_sm90_without_hot_spills(gate):
    failures = kr.gate_failures(gate["rows"])
    assert failures == [], "\n".join(failures) + "\n\n" + kr.format_table(gate["rows"])


@pytest.mark.slow
def test_every_kernel_compiled_in_every_dtype(gate):
    launched = kr.launchable_kernels()
    for module, names in launched.items():
        for name in names:
            dtypes = {d for r in gate["rows"] if r["module"] == f"kernels/{module}.py" and r["kernel"] == name
                      for d in r["dtypes"]}
            assert dtypes == set(kr.DTYPES), f"{module}.{name}: compiled for {sorted(dtypes)}"


@pytest.mark.slow
def test_report_has_the_measured_columns(gate):
    ok = [r for r in gate["rows"] if not r["error"]]
    assert ok and all(isinstance(r[k], int) for r in ok for k in ("regs", "spills", "smem", "tensor_core", "ldg128"))
    assert all(0 < r["regs"] <= 255 for r in ok)
    # the tensor-core count is real: fp32 dots compile to tensor-core instructions only with tf32
    mmd_gemm = [r for r in ok if r["module"] == "kernels/mmd.py" and r["spec"].startswith("float32")]
    by_precision = {("PRECISION=tf32" in r["spec"]): r["tensor_core"] for r in mmd_gemm if "PRECISION=" in r["spec"]}
    assert by_precision.get(True, 0) > 0 and by_precision.get(False) == 0


def test_dsa_kernels_compile_for_sm90():
    """The DSA kernels once read plain module ints inside @triton.jit (NameError on real Triton,
    hidden by the interpreter)."""
    recorded = {"launches": [], "errors": []}
    f32, i32 = {"tensor": "float32", "align": 0}, {"tensor": "int32", "align": 0}
    sizes = [{"value": 3}, {"value": 32}, {"value": 32}]
    kw = {"ALIGN": {"value": False}, "BLOCK": {"value": 256}, "ACC": {"tl_dtype": "fp32"}}
    red = {"BLOCK": {"value": 1024}, "ACC": {"tl_dtype": "fp32"}}
    for kernel, args, kwargs in (("_dsa_fwd_kernel", [f32, f32, i32, f32, f32, f32] + sizes, kw),
                                 ("_dsa_bwd_kernel", [f32, f32, i32, f32, f32, f32] + sizes, kw),
                                 ("_color_mean_kernel", [f32, i32, f32, f32, {"value": 3}, {"value": 1024}], red),
                                 ("_grad_sum_kernel", [f32, i32, f32, {"value": 3}, {"value": 1024}], red)):
        recorded["launches"].append({"module": "dsa", "kernel": kernel, "dtype": "float32", "args": args,
                                     "kwargs": kwargs})
    result = _compile_subprocess(recorded)
    rows = [r for r in result["rows"] if r["module"] == "kernels/dsa.py"]
    assert len(rows) >= 4 and [r["error"] for r in rows if r["error"]] == []


def _compile_subprocess(recorded):
    """kernel_report's compile step (a process without TRITON_INTERPRET) on hand-written launches."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "l.json"), os.path.join(tmp, "r.json")
        with open(src, "w") as f:
            json.dump(recorded, f)
        kr._run_self(["compile", src, out, "--jobs=1"], {"TRITON_INTERPRET": None, "TRITON_DEFAULT_FP_FUSION": "1"},
                     600)
        with open(out) as f:
            return json.load(f)


# --- pieces of the report, without compiling ----------------------------------------------------

def test_helpers_are_not_kernels():
    kernels = kr.launchable_kernels()
    assert "_dsa_fwd_kernel" in kernels["dsa"] and "_grad_sum_kernel" in kernels["dsa"]
    assert "_source_coords" not in kernels["dsa"] and "_bilinear_corners" not in kernels["dsa"]


def test_hot_and_known_names_exist():
    kernels = kr.launchable_kernels()
    for module, names in kr.HOT_TRITON.items():
        assert module in kernels, module
        assert names is None or names <= set(kernels[module]), (module, names - set(kernels[module]))
    cu = {p.rsplit("/", 1)[-1][:-3] for p in kr.cuda_sources()}
    assert set(kr.HOT_CUDA) <= cu


def test_recording_captures_dtypes_constexprs_and_alignment():
    if not kr._interpreting():
        pytest.skip("recording runs in the interpreter (TRITON_INTERPRET=1 at import)")
    import ddfast

    launches = []
    with kr.recording(launches, lambda: "float64"):
        s = torch.randn(40, dtype=torch.float64, requires_grad=True)
        ddfast.param_match(s, torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64),
                           backend="triton").backward()
    names = [l["kernel"] for l in launches]
    assert "_param_match_partials_kernel" in names and "_param_match_backward_kernel" in names
    first = launches[names.index("_param_match_partials_kernel")]
    assert first["args"][0] == {"tensor": "float64", "align": 0}
    assert first["kwargs"]["ACC_DTYPE"] == {"tl_dtype": "fp64"}
    assert {"value": 40} in first["args"]  # the size, as launched


def test_sizes_are_compiled_as_multiples_of_16():
    launch = {"args": [{"tensor": "float32", "align": 0}, {"value": 40}, {"value": 1}, {"value": 0},
                       {"value": True}, {"value": 2.5}], "kwargs": {}}
    assert kr._gpu_sizes(launch)["args"][1:] == [{"value": 48}, {"value": 16}, {"value": 0}, {"value": True},
                                                 {"value": 2.5}]


def test_cover_keeps_every_dtype_and_constexpr_value():
    def launch(dtype, metric, block):
        return {"module": "m", "kernel": "k", "dtype": dtype, "args": [{"tensor": dtype, "align": 0}],
                "kwargs": {"METRIC": {"value": metric}, "BLOCK": {"value": block}}}

    launches = [launch(d, m, b) for d in ("float32", "float64") for m in (0, 1, 2) for b in (32, 64)]
    chosen = kr._cover(launches)
    assert {l["dtype"] for l in chosen} == {"float32", "float64"}
    assert {l["kwargs"]["METRIC"]["value"] for l in chosen} == {0, 1, 2}
    assert {l["kwargs"]["BLOCK"]["value"] for l in chosen} == {32, 64}
    assert len(chosen) == 3 < len(launches)


def test_expand_adds_tf32_and_unseen_bool_values():
    fns = kr.jit_functions()
    base = {"module": "dsa", "kernel": "_dsa_fwd_kernel", "dtype": "float32", "args": [],
            "kwargs": {"ALIGN": {"value": False}}}
    dot = {"module": "x", "kernel": "y", "dtype": "float32", "args": [], "kwargs": {"PRECISION": {"value": "ieee"}}}
    out = kr._expand([base, dot], fns)
    assert {"value": True} in [l["kwargs"].get("ALIGN") for l in out]
    assert {"value": "tf32"} in [l["kwargs"].get("PRECISION") for l in out]


PTXAS_SAMPLE = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelIfEvPT_
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6kernelIdEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelIdEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""


def test_parse_ptxas():
    stats = kr.parse_ptxas(PTXAS_SAMPLE)
    assert stats["_Z6kernelIfEvPT_"] == {"regs": 255, "stack": 16, "spills": 20, "smem": 2048}
    assert stats["_Z6kernelIdEvPT_"] == {"regs": 40, "stack": 0, "spills": 0, "smem": 0}


def test_parse_sass_and_ptx_counts():
    sass = """	Function : _Z1kv
        /*0080*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0090*/              @!P0 LDG.E R8, desc[UR4][R2.64+0x10] ;
        /*00a0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
	Function : _Z1jv
        /*0080*/                   STG.E.128 desc[UR4][R2.64], R4 ;
"""
    assert kr.parse_sass(sass) == {"_Z1kv": {"ldg128": 1, "ldg": 2, "tensor_core": 1},
                                   "_Z1jv": {"ldg128": 0, "ldg": 0, "tensor_core": 0}}
    ptx = """	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ld.global.b32 %r5, [ %rd2 + 0 ];
	ld.global.v2.b64 { %rd3, %rd4 }, [ %rd5 + 0 ];
	ld.global.v2.b32 { %r6, %r7 }, [ %rd5 + 0 ];
	wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%f1}, %rd6, %rd7, 1, 1, 1;
	mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};
"""
    assert kr._ptx_counts(ptx) == {"tensor_core": 2, "ldg128": 2, "ldg": 4}


def test_gate_failures_rules():
    def row(kernel, spills, hot=True, known=False, error=None):
        return {"module": "kernels/m.py", "kernel": kernel, "spec": "float32", "regs": 255, "spills": spills,
                "hot": hot, "known_spill": known, "error": error}

    assert kr.gate_failures([row("a", 0), row("b", 64, hot=False), row("c", 8, known=True)]) == []
    failures = kr.gate_failures([row("a", 16), row("c", 0, known=True), row("d", None, error="NameError: x")])
    assert len(failures) == 3
    assert any("a [float32]: 16 bytes" in f for f in failures)
    assert any("no longer spills" in f for f in failures) and any("NameError" in f for f in failures)


# --- TF32: torch's current API, never raising ----------------------------------------------------

@pytest.fixture
def restore_fp32_precision():
    matmul = torch.backends.cuda.matmul
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # another test left torch in the mixed-API state
        legacy = None
    saved = (matmul.fp32_precision, torch.backends.fp32_precision, legacy)
    yield matmul
    if saved[2] is not None:
        torch.set_float32_matmul_precision(saved[2])
    torch.backends.fp32_precision = saved[1]
    matmul.fp32_precision = saved[0]  # setting the new API last clears torch's mixed-API state


@pytest.mark.parametrize("how, expect", [
    ("default", False),
    ("new_tf32", True),
    ("new_ieee", False),
    ("global_tf32", True),
    ("legacy_high", True),
    ("legacy_allow", True),
    ("mixed", True),  # legacy reads raise RuntimeError in this state
])
def test_tf32_setting_read_without_raising(restore_fp32_precision, how, expect):
    matmul = restore_fp32_precision
    if how == "new_tf32":
        matmul.fp32_precision = "tf32"
    elif how == "new_ieee":
        matmul.fp32_precision = "ieee"
    elif how == "global_tf32":
        torch.backends.fp32_precision = "tf32"
    elif how == "legacy_high":
        torch.set_float32_matmul_precision("high")
    elif how == "legacy_allow":
        matmul.allow_tf32 = True
    elif how == "mixed":
        matmul.allow_tf32 = False
        matmul.fp32_precision = "tf32"
        with pytest.raises(RuntimeError):
            _ = matmul.allow_tf32  # the read the old dot_precision made
    assert fp32_matmul_allows_tf32() is expect
    # CPU tensors (the interpreter) always get exact products; the setting only acts on CUDA
    assert dot_precision(torch.ones(2)) == "ieee"


def test_torch_tf32_defaults():
    """What the README states: TF32 off for matmuls, on for cuDNN convolutions (torch's defaults)."""
    import subprocess
    import sys

    code = ("import torch; print(torch.backends.cuda.matmul.fp32_precision, "
            "torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.allow_tf32)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["none", "tf32", "True"]


def test_may_spill_kernels_are_tolerated_but_others_fail(monkeypatch):
    from ddfast import kernel_report as kr

    # MAY_SPILL is empty since the mmd kernels stopped spilling (issue 12): test the mechanism on an entry
    monkeypatch.setitem(kr.MAY_SPILL, ("triton", "mmd"), {"_mmd_fwd_kernel"})
    row = dict(source="triton", module="kernels/mmd.py", kernel="_mmd_fwd_kernel", spec="fp32 LINEAR ieee",
               regs=255, spills=36, hot=True, known_spill=False, error=None)
    assert kr.gate_failures([row]) == []
    other = dict(row, kernel="_mmd_gemm_kernel")
    assert len(kr.gate_failures([other])) == 1


def test_fp32_float_arguments_names_python_floats_typed_fp32():
    """The gate's check: a Python float bound to an fp32 parameter (Triton's type for an unannotated
    float) is named; fp64-annotated floats, ints, bools and tensors are not."""
    launch = {"args": [{"tensor": "float64", "align": 0}, {"value": 1e-5}, {"value": 3}, {"value": True}],
              "kwargs": {"inv_temp": {"value": 14.28}, "log_c": {"value": 1.1}}}
    signature = {"x_ptr": "*fp64", "eps": "fp32", "n": "i32", "FLAG": "constexpr", "inv_temp": "fp32", "log_c": "fp64"}
    assert kr.fp32_float_arguments(launch, signature) == ["eps", "inv_temp"]
    signature.update(eps="fp64", inv_temp="fp64")
    assert kr.fp32_float_arguments(launch, signature) == []
