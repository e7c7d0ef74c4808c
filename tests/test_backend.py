"""Dispatch: precedence of backend choices, fallbacks, gradients through every backend, info()."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import ddfast
from ddfast import _backend

from conftest import require_backend


def _args(device="cpu"):
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(100, generator=g).to(device) for _ in range(3)]
    t[0].requires_grad_(True)
    return t


def test_backend_names_are_validated():
    with pytest.raises(ValueError, match="backend must be one of"):
        ddfast.set_backend("fastest")
    with pytest.raises(TypeError, match="backend must be a string"):
        ddfast.set_backend(3)
    with pytest.raises(ValueError, match="backend must be one of"):
        ddfast.param_match(*_args(), backend="gpu")


def test_auto_on_cpu_uses_measured_choice():
    ddfast.op_modules()
    spec = _backend.registered_ops()["param_match"]
    which = _backend.resolve("param_match", "auto", "cpu")
    if spec.cpu_compiled_is_faster and _backend.available("param_match", "cpp", "cpu"):
        assert which == _backend.COMPILED
    else:
        assert which == "torch"
    # auto never picks the (slow) Triton interpreter on CPU
    assert which != "triton"


def test_precedence_argument_over_set_backend_over_env(monkeypatch):
    ddfast.op_modules()
    monkeypatch.setenv("DDFAST_BACKEND", "torch")
    assert ddfast.get_backend() == "torch"
    assert _backend.resolve("param_match", "auto", "cpu") == "torch"
    ddfast.set_backend("triton")
    assert ddfast.get_backend() == "triton"
    assert _backend.resolve("param_match", "torch", "cpu") == "torch"  # explicit argument wins
    ddfast.set_backend(None)
    assert ddfast.get_backend() == "torch"  # env again


def test_unavailable_backend_warns_once_and_falls_back(monkeypatch):
    ddfast.op_modules()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="unavailable on cpu"):
        assert _backend.resolve("param_match", "triton", "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("param_match", "triton", "cpu") == "torch"  # only once


@pytest.mark.parametrize("kind", ["torch", "triton", "compiled"])
def test_gradients_flow_through_every_backend_when_set_globally(kind):
    backend = require_backend("param_match", kind, "cpu")
    ddfast.set_backend(backend)
    s, a, t = _args()
    loss = ddfast.param_match(s * 2.0, a, t)  # non-leaf input: autograd must see through the op
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_cuda_alias_on_cpu_tensor_means_cpp_kernel():
    require_backend("param_match", "compiled", "cpu")
    assert _backend.resolve("param_match", "cuda", "cpu") == _backend.COMPILED
    assert _backend.provider_name(_backend.COMPILED, "cpu") == "cpp"


def test_info_lists_every_op_and_reasons(capsys):
    data = ddfast.info("cpu")
    out = capsys.readouterr().out
    assert "torch" in data and data["torch"] == torch.__version__
    assert "param_match" in data["ops"]
    for op, row in data["ops"].items():
        assert set(row) >= {"torch", "triton", "cpp", "auto"}
        assert f"{op}  [auto -> " in out
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "TRITON_INTERPRET=1" in data["ops"]["param_match"]["triton"]


def test_available_backends_helper():
    got = ddfast.available_backends("param_match", "cpu")
    assert got["torch"] is True and set(got) == {"torch", "triton", "cpp"}


def test_import_is_cheap_and_lazy():
    code = "import sys, ddfast; print('triton' in sys.modules, 'ddfast.ops.param_match' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_unknown_public_name():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ddfast.nope  # noqa: B018
