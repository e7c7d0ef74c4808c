"""Compile checks for the CUDA code, run even without a GPU: every csrc/cuda/*.cu with nvcc for
sm_90, and every csrc/*.cpp with its CUDA glue enabled (-DDDFAST_WITH_CUDA, syntax only)."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

from ddfast import kernel_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CUDA_HOME = kernel_report.cuda_home()
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
CUDA_INCLUDE = os.path.join(CUDA_HOME, "include") if CUDA_HOME else None
CU_FILES = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
CPP_FILES = sorted(glob.glob(os.path.join(REPO, "csrc", "*.cpp")))


def test_every_op_with_a_cpp_file_has_a_cuda_file():
    """Except the ops registered CPU-only (OpSpec.compiled_cuda=False), which Triton runs on CUDA."""
    import ddfast
    from ddfast import _backend

    ddfast.op_modules()
    specs = _backend.registered_ops()
    cpu_only = {name for name, spec in specs.items() if spec.compiled and not spec.compiled_cuda}
    assert all(specs[name].triton and specs[name].cuda_prefers_triton for name in cpu_only), cpu_only
    ops = {os.path.splitext(os.path.basename(p))[0] for p in CPP_FILES}
    cus = {os.path.splitext(os.path.basename(p))[0] for p in CU_FILES}
    assert ops and ops - cpu_only == cus, f"C++ ops without CUDA kernels: {ops - cpu_only - cus}; stray .cu: {cus - ops}"
    assert cpu_only <= ops, f"CPU-only ops without a C++ file: {cpu_only - ops}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("cu", CU_FILES, ids=os.path.basename)
def test_nvcc_compiles_for_sm90_without_hot_spills(cu):
    """nvcc -arch=sm_90 -Xptxas -v (the compile ddfast.kernel_report caches and reports): no error,
    no warning, and no register spills in the hot kernels (kernel_report.HOT_CUDA) unless known."""
    result = kernel_report.cuda_file_report(cu)
    assert result["returncode"] == 0, result["stderr"][-4000:]
    assert "warning" not in result["stderr"].lower(), result["stderr"][-4000:]
    assert result["rows"], "ptxas reported no kernels"
    failures = kernel_report.gate_failures(result["rows"])
    assert failures == [], "\n".join(failures) + "\n\n" + kernel_report.format_table(result["rows"])


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="nvcc or g++ not found")
@pytest.mark.parametrize("cpp", CPP_FILES, ids=os.path.basename)
def test_cuda_glue_compiles(cpp, tmp_path):
    torch_dir = os.path.dirname(torch.__file__)
    # CPU wheels of torch lack this generated header; it only carries build-time macros
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-DDDFAST_WITH_CUDA=1", "-I", os.path.join(REPO, "csrc"),
           "-I", str(tmp_path / "stub"), "-I", os.path.join(torch_dir, "include"),
           "-I", os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"), "-I", CUDA_INCLUDE, cpp]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_bn_stat_kernels_have_128_bit_loads():
    """bn_stat.cu (the compile above, cached): every backward instance and the forward's vector
    instances (kVec = true: S a multiple of the vector width, x 16-byte aligned) issue LDG.E.128."""
    result = kernel_report.cuda_file_report(os.path.join(REPO, "csrc", "cuda", "bn_stat.cu"))
    assert result["returncode"] == 0, result["stderr"][-2000:]
    rows = [r for r in result["rows"] if r["kernel"] == "backward_kernel" or
            (r["kernel"] == "forward_kernel" and r["spec"].endswith("true"))]
    assert len(rows) == 16 + 4, kernel_report.format_table(result["rows"])  # 4 dtypes × (index, table) / × 1
    assert all(r["ldg128"] for r in rows), kernel_report.format_table(rows)


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_gradient_match_forward_is_one_kernel_with_a_last_block_fold(tmp_path):
    """gradient_match.cu (sm_90 SASS): the forward is one kernel (no fold kernel) whose epilogue holds
    the last-block pattern (a GPU-scope fence, a global atomic, strong L1-bypassing reads of the
    other blocks' partials) and warp-shuffle sums; the backward, one warp per segment, has no
    block-wide barrier; both issue 16-byte loads in every instantiation."""
    cuobjdump = kernel_report._tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found")
    obj = str(tmp_path / "gradient_match.o")
    res = subprocess.run(kernel_report.nvcc_command(os.path.join(REPO, "csrc", "cuda", "gradient_match.cu"), obj),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, timeout=600).stdout
    functions = {}
    for chunk in sass.split("Function : ")[1:]:
        name, body = chunk.split("\n", 1)
        functions[kernel_report._short_name(kernel_report._demangle([name.strip()])[name.strip()])[0] + "/" +
                  name.strip()] = body
    kinds = {key.split("/")[0] for key in functions}
    assert kinds == {"partials_kernel", "backward_kernel"}, kinds
    for key, body in functions.items():
        assert "LDG.E.128" in body, key
        if key.startswith("partials_kernel"):
            for op in ("MEMBAR.SC.GPU", "ATOMG.E.ADD", "SHFL.BFLY"):
                assert op in body, (key, op)
            assert "STRONG.GPU" in "".join(l for l in body.splitlines() if "LDG" in l), key  # __ldcg
        else:
            assert "BAR.SYNC" not in body, key
    assert len(functions) == 4 * 3 + 4  # (float, double, half, bfloat16) × 3 metrics forward, × 1 backward


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_gradient_match_backward_issues_a_batch_of_loads_before_its_stores(tmp_path):
    """gradient_match.cu (sm_90 PTX): the backward's 16-byte loop loads 2·kBatch = 8 vectors (syn and
    real) before its first 16-byte store, in every dtype. Written as a plain unrolled loop the
    stores could alias the loads (pointers from the table), so nvcc issued load, load, store per
    vector: 2 loads in flight per lane. The stores stay 128-bit."""
    ptx_path = str(tmp_path / "gradient_match.ptx")
    cmd = [NVCC, f"-arch=sm_{kernel_report.ARCH}", "-O3", "-std=c++17", "-ptx", "-o", ptx_path,
           os.path.join(REPO, "csrc", "cuda", "gradient_match.cu")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    ptx = open(ptx_path).read()
    bodies = [chunk for chunk in ptx.split(".entry ")[1:] if "backward_kernel" in chunk.split("(")[0]]
    assert len(bodies) == 4, len(bodies)  # float, double, half, bfloat16
    for body in bodies:
        ops = [("S" if "st.global" in line else "L") for line in body.splitlines()
               if ".v4." in line and ("ld.global" in line or "st.global" in line)]
        assert "S" in ops, body.split("(")[0]
        assert ops.index("S") >= 8 and ops.count("S") >= 4, (body.split("(")[0], "".join(ops))


def test_supcon_logits_are_rounded_before_use():
    """The CUDA backward recomputes each logit and subtracts the forward's lse from it. Written as
    ``dot * inv_temp``, nvcc fused the product into that subtraction (one fma, no rounding of the
    logit), so the max logit no longer cancelled its lse: softmax weights off by a few % at
    |logit| ~ 1e6 (test_low_temperature_large_features_stay_finite on an H200). Every logit must
    go through logit_rn (__fmul_rn / __dmul_rn, never contracted)."""
    src = open(os.path.join(REPO, "csrc", "cuda", "supcon_nce.cu")).read()
    assert "__fmul_rn(dot, inv_temp)" in src and "__dmul_rn(dot, inv_temp)" in src
    assert "s[i][j] * inv_temp" not in src
    assert src.count("logit_rn(s[i][j], inv_temp)") == 2  # forward and backward
