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


@pytest.fixture(autouse=True)
def _fresh_value_checks():
    """Every test starts as a fresh process would: on CUDA the default checks mode is "once", so a
    NaN test after another test of the same call site and shape would otherwise see no check."""
    from ddfast import _checks

    _checks._seen_sites.clear()
    yield


class LaunchSpy:
    """Stands in for a @triton.jit kernel (monkeypatched over it): records ``name`` in ``log`` at each launch."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(self.name)
            return launch(*args, **kwargs)

        return run


def peak_alloc_bytes(fn) -> int:
    """Peak of the CPU allocator's live bytes while fn runs (torch profiler, allocations in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def compile_sm90_as_given(launches: list) -> list:
    """sm_90 compile rows of recorded launches, exactly as given (``kernel_report compile-given``), in a
    subprocess: the interpreter this test process runs under cannot compile."""
    import json
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(launches, f)
        f.flush()
        res = subprocess.run([sys.executable, "-m", "ddfast.kernel_report", "compile-given", f.name], env=env,
                             capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == len(launches)
    return rows


def assert_close_fp32(got, want, device, exact=None):
    """SPEC tolerances with atol in units of the images' scale, or, given ``exact`` (the same draws
    applied in float64), that ``got`` is as close to it as the fp32 reference ``want`` is: color
    subtracts channel and image means whose fp32 sums (torch's cascade vs the kernels' fp64/block
    sums) differ by ~1e-7 of the operands, and the bilinear ops amplify that near 0."""
    scale = max(1.0, float(want.detach().abs().max()))
    if exact is not None:
        ref_error = float((want.double() - exact).abs().max())
        assert float((got.double() - exact).abs().max()) <= 1.5 * ref_error + 1e-6 * scale
        return
    t = tol(device, torch.float32)
    torch.testing.assert_close(got, want, rtol=t["rtol"], atol=t["atol"] * scale)
