"""The compiled extension: JIT build on first use (cached), stale build locks, failed builds fall back."""
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ddfast import _extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, env_extra, timeout=600):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_jit_build_on_first_use_then_cached(tmp_path):
    code = """
        import time, torch, ddfast
        from ddfast import _extension
        s, a, t = torch.randn(1000, requires_grad=True), torch.randn(1000), torch.randn(1000)
        t0 = time.time()
        loss = ddfast.param_match(s, a, t, backend="cpp")
        loss.backward()
        ref = ((s - t) ** 2).sum() / ((a - t) ** 2).sum()
        assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
        print("STATUS", _extension.status()["param_match"])
        print("SECONDS", time.time() - t0)
    """
    env = {"DDFAST_CACHE_DIR": str(tmp_path), "DDFAST_FORCE_JIT": "1", "PYTHONWARNINGS": "error::RuntimeWarning"}
    first = _run(code, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "compiled on first use" in first.stdout
    second = _run(code, env)
    assert second.returncode == 0, second.stderr[-3000:]
    t1 = float(first.stdout.split("SECONDS")[1].split()[0])
    t2 = float(second.stdout.split("SECONDS")[1].split()[0])
    assert t2 < t1  # the cached build is reused, not recompiled
    assert any(f.endswith(".so") for _, _, fs in os.walk(tmp_path) for f in fs)


def test_failed_build_warns_once_and_falls_back(tmp_path):
    code = """
        import warnings, torch, ddfast
        from ddfast import _extension, _backend
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            s, a, t = torch.randn(10, requires_grad=True), torch.randn(10), torch.randn(10)
            out = ddfast.param_match(s, a, t, backend="cpp")
            out.backward()
            ddfast.param_match(s, a, t, backend="cpp")
        msgs = [str(x.message) for x in w]
        print("N_EXT_WARN", sum("compiled kernels for 'param_match' are unavailable" in m for m in msgs))
        print("INFO", _backend.ops_backends("cpu")["param_match"]["cpp"])
        print("GRAD", bool(s.grad is not None))
    """
    res = _run(code, {"DDFAST_CACHE_DIR": str(tmp_path), "DDFAST_FORCE_JIT": "1", "CXX": "/nonexistent/c++"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "N_EXT_WARN 1" in res.stdout
    assert "INFO no: " in res.stdout and "C++ compiler" in res.stdout
    assert "GRAD True" in res.stdout


def test_no_extension_env_disables(tmp_path):
    res = _run("""
        import ddfast
        from ddfast import _backend
        print(_backend.ops_backends("cpu")["param_match"]["cpp"])
    """, {"DDFAST_NO_EXTENSION": "1", "DDFAST_CACHE_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr
    assert "DDFAST_NO_EXTENSION=1" in res.stdout


def test_stale_build_lock_is_removed(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    monkeypatch.setenv("DDFAST_BUILD_LOCK_TIMEOUT", "60")
    with pytest.warns(UserWarning, match="stale build lock"):
        _extension._wait_for_build_lock(str(tmp_path))
    assert not lock.exists()


def test_lock_of_a_running_build_is_waited_for_then_declared_stale(tmp_path, monkeypatch):
    (tmp_path / "lock").write_text("")
    monkeypatch.setenv("DDFAST_BUILD_LOCK_TIMEOUT", "1.5")
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="stale build lock"):
        _extension._wait_for_build_lock(str(tmp_path))
    waited = time.monotonic() - t0
    assert 1.0 < waited < 10 and not (tmp_path / "lock").exists()


def test_csrc_is_found():
    assert os.path.exists(os.path.join(_extension.csrc_dir(), "param_match.cpp"))
    assert torch.__version__.split("+")[0].replace(".", "") in _extension.cache_dir().replace(".", "")


def test_has_cuda_kernel_is_a_constant_under_torch_compile(monkeypatch):
    """The dispatcher query returns a bool, which Dynamo cannot put in a graph: every fullgraph
    compile of an op on CUDA failed on it (H200, torch 2.11). Uncached and cached, it must trace."""
    monkeypatch.setattr(_extension, "_cuda_kernels", {})

    def f(x):
        return x * 2 if _extension.has_cuda_kernel("ddfast::mmd_fwd") else x * 3

    want = f(torch.ones(2))
    monkeypatch.setattr(_extension, "_cuda_kernels", {})
    got = torch.compile(f, backend="eager", fullgraph=True)(torch.ones(2))
    assert torch.equal(got, want)
