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
    ops = {os.path.splitext(os.path.basename(p))[0] for p in CPP_FILES}
    cus = {os.path.splitext(os.path.basename(p))[0] for p in CU_FILES}
    assert ops and ops == cus, f"C++ ops without CUDA kernels: {ops - cus}; stray .cu: {cus - ops}"


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
