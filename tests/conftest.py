"""Shared test setup: devices, backends, tolerances.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set here before
triton is imported). CUDA cases skip cleanly when no GPU is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # triton reads TRITON_INTERPRET when first imported: import it now, with the variable set
        import triton  # noqa: F401
    except ImportError:
        pass

import pytest  # noqa: E402

import ddfast  # noqa: E402
from ddfast import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# provider names as users write them; "compiled" is "cpp" on CPU and "cuda" on CUDA
BACKENDS = ["torch", "triton", "compiled"]

# (rtol, atol) against the reference, per SPEC: fp32 1e-5/1e-6 on CPU, 1e-4 relative on CUDA;
# half types accumulate in fp32 but round their inputs/outputs.
TOLERANCES = {
    ("cpu", torch.float32): (1e-5, 1e-6),
    ("cuda", torch.float32): (1e-4, 1e-5),
    ("cpu", torch.float64): (1e-10, 1e-12),
    ("cuda", torch.float64): (1e-10, 1e-12),
    ("cuda", torch.bfloat16): (2e-2, 1e-2),
    ("cuda", torch.float16): (5e-3, 1e-3),
    ("cpu", torch.bfloat16): (2e-2, 1e-2),
    ("cpu", torch.float16): (5e-3, 1e-3),
}


def tol(device, dtype):
    rtol, atol = TOLERANCES[(torch.device(device).type, dtype)]
    return {"rtol": rtol, "atol": atol}


def require_backend(op: str, backend: str, device) -> str:
    """Skip unless ``backend`` can run ``op`` on ``device``; returns the name to pass as backend=."""
    ddfast.op_modules()
    device = torch.device(device)
    name = _backend.provider_name(backend, device) if backend == "compiled" else backend
    if not _backend.available(op, name, device):
        pytest.skip(f"{op}: backend {name} unavailable on {device.type}")
    return name


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=BACKENDS)
def backend_kind(request):
    return request.param


@pytest.fixture(autouse=True)
def _reset_backend():
    ddfast.set_backend(None)
    yield
    ddfast.set_backend(None)
