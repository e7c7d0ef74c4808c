"""Compile mmd / supcon_nce Triton kernels for sm_90 (no GPU needed) and read what the GPU would run:
tensor-core instructions in the PTX (wgmma / mma), registers and local-memory (spill) bytes of the
cubin (cuobjdump --dump-resource-usage). Used by tests/test_mmd.py and tests/test_supcon_nce.py.

Run as a script it prints one JSON row per specialisation: python tests/sm90_compile.py [op ...]
"""
import json
import os
import re
import subprocess
import sys
import tempfile

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")


def _specs(op: str, precision: str, z_type: str = "*fp32"):
    """{kernel name: (jit function, {arg: type string or constexpr value})} at the GPU block sizes."""
    import triton.language as tl

    from ddfast.kernels import mmd as mk
    from ddfast.kernels import supcon_nce as nk

    ws = "*bf16" if precision == "bf16" or z_type == "*bf16" else "*fp32"
    common = dict(ACC_DTYPE=tl.float32, PRECISION=precision)
    if op == "mmd":
        t = mk.Tiling(65536, 2048, _cuda(), _torch_dtype(z_type))
        meta = dict(NUM_BW=5, LINEAR=False, UNBIASED=False, BLOCK=t.block, BLOCK_K=t.block_k, **common)
        rows = dict(sq_ptr="*fp32", cls_ptr="*i64", side_ptr="*i32", off_ptr="*i64", coef_ptr="*fp32")
        return {
            "mmd_fwd": (mk._mmd_fwd_kernel, dict(z_ptr=z_type, **rows, out_ptr="*fp32", R="i32", D="i32",
                                                 stride="i32", **meta)),
            "mmd_grad_tile": (mk._mmd_grad_tile_kernel, dict(grad_ptr="*fp32", z_ptr=z_type, **rows, ws_ptr=ws,
                                                             rs_ptr="*fp32", R="i32", D="i32", stride="i32",
                                                             p0="i32", p_len="i32", **meta)),
            "mmd_gemm": (mk._mmd_gemm_kernel, dict(ws_ptr=ws, z_ptr=z_type, rs_ptr="*fp32", cls_ptr="*i64",
                                                   off_ptr="*i64", out_ptr="*fp32", R="i32", D="i32", stride="i32",
                                                   p0="i32", p_len="i32", ACCUMULATE=True, LINEAR=False,
                                                   BLOCK=t.block, BLOCK_K=t.gemm_k, BLOCK_D=t.gemm_d, **common)),
        }
    t = nk.Tiling(1000, 65536, 2048, _cuda(), _torch_dtype(z_type), precision)
    tiles = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, **common)
    feats = dict(fs_ptr=z_type, ys_ptr="*i64", fr_ptr=z_type, yr_ptr="*i64", rs_ptr="*fp32", rr_ptr="*fp32")
    out = {}
    for nce in (False, True):
        tag = "_nce" if nce else ""
        out["nce_fwd" + tag] = (nk._forward_kernel, dict(
            **feats, part_a_ptr="*fp32", part_b_ptr="*fp32", ws_ptr="*fp32", ws_stride="i32", n_syn="i32",
            n_real="i32", dim="i32", cols_per_split="i32", inv_temp="fp32", log_c="fp32", NCE=nce, STORE_LOGITS=True,
            **tiles))
        out["nce_grad_logits" + tag] = (nk._grad_logits_kernel, dict(
            **feats, g_ptr="*fp32", lse_all_ptr="*fp32", lse_pos_ptr="*fp32", ws_ptr=ws, q_syn_ptr="*fp32",
            q_real_ptr="*fp32", n_syn="i32", n_real="i32", dim="i32", c0="i32", ws_cols="i32", inv_temp="fp32",
            log_c="fp32", NCE=nce, NORMALIZE=True, LOAD_LOGITS=False, **tiles))
    out["nce_gemm"] = (nk._gemm_kernel, dict(
        a_ptr=ws, sa_r="i32", sa_k="i32", b_ptr=z_type, c_ptr=z_type, corr_ptr="*fp32", out_ptr="*fp32",
        n_rows="i32", n_k="i32", dim="i32", k_split="i32", split_stride="i32", ACCUMULATE=True, CORRECT=True,
        BLOCK_M=t.block_m, BLOCK_K=t.gemm_k, BLOCK_D=t.gemm_d, **common))
    return out


def _cuda():
    """Block sizes do not depend on the device (only split/chunk/panel widths do, runtime arguments)."""
    import torch

    return torch.device("cpu")


def _torch_dtype(z_type):
    import torch

    return {"*fp32": torch.float32, "*bf16": torch.bfloat16}[z_type]


def _resource_usage(cubin: bytes):
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1)), int(re.search(r"LOCAL:(\d+)", text).group(1))


def compile_one(fn, args) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if isinstance(value, str) and (value.startswith("*") or value in ("i32", "i64", "fp32")):
            signature[name] = value
        else:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32))
    ptx = kernel.asm["ptx"]
    regs, local = _resource_usage(kernel.asm["cubin"])
    return {"regs": regs, "spills": local, "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "tensor_core": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)", ptx))}


def _main(jobs):
    for op, name, precision, z_type in jobs:
        fn, args = _specs(op, precision, z_type)[name]
        row = {"op": op, "kernel": name, "precision": precision, "input": z_type[1:], **compile_one(fn, args)}
        print(json.dumps(row), flush=True)


def compile_report(op: str, kernels, z_type: str = "*fp32"):
    """Rows for [(kernel name, precision)], compiled in a subprocess without TRITON_INTERPRET."""
    import pytest

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = [(op, name, precision, z_type) for name, precision in kernels]
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import sm90_compile as m; m._main({jobs!r})"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(jobs), res.stdout + res.stderr[-2000:]
    return rows


if __name__ == "__main__":
    ops = sys.argv[1:] or ["mmd", "supcon_nce"]
    _main([(op, name, precision, z_type) for op in ops for z_type in ("*fp32", "*bf16")
           for precision in (PRECISIONS if z_type == "*fp32" else ("ieee",))
           for name in _specs(op, precision, z_type)])
