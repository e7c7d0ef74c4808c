"""Launcher helpers shared by the Triton kernel modules."""
import functools

import torch
import triton
import triton.language as tl


def acc_dtypes(dtype: torch.dtype):
    """(Triton, torch) accumulation dtypes: float64 for float64, else float32 (also for half types)."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _read(getter):
    try:
        return getter()
    except (AttributeError, RuntimeError):  # attribute missing in older torch; mixed-API read error in newer
        return None


def fp32_matmul_allows_tf32() -> bool:
    """Whether the user opted into TF32 for fp32 CUDA matmuls, read through torch's current API
    and never raising. Since torch 2.9 ``torch.backends.cuda.matmul.fp32_precision`` ("tf32",
    "ieee", or "none" = not set: IEEE) reflects every way of setting it (the new attribute,
    ``torch.backends.fp32_precision``, ``set_float32_matmul_precision``, ``allow_tf32``), while the
    legacy reads (``allow_tf32``, ``get_float32_matmul_precision()``) raise RuntimeError once the
    new API was used. Older torch: the legacy reads."""
    precision = _read(lambda: torch.backends.cuda.matmul.fp32_precision)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    legacy = _read(torch.get_float32_matmul_precision)
    if legacy is not None:
        return legacy != "highest"
    return bool(_read(lambda: torch.backends.cuda.matmul.allow_tf32))


def dot_precision(z: torch.Tensor) -> str:
    """tl.dot precision: exact fp32 products unless the user opted into TF32 the torch way (CUDA)."""
    tf32 = z.is_cuda and z.dtype == torch.float32 and fp32_matmul_allows_tf32()
    return "tf32" if tf32 else "ieee"


_arrival_counters = {}


def arrival_counters(n: int, device: torch.device) -> torch.Tensor:
    """``n`` int32 zeros for last-program epilogues (each program of a group bumps its counter with an
    acq_rel atomic; the one that sees ``count − 1`` folds the group and puts the counter back to 0).

    Reused per (device, stream), so a step adds no fill launch: launches on one stream run in order,
    and every launch that uses the counters leaves them at zero. While a CUDA graph is being captured
    the zeros are a fresh tensor (its fill is recorded into the graph), so the cached buffer never
    lives in a graph's memory pool. CPU (the interpreter): a fresh tensor each call."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device.index if device.index is not None else torch.cuda.current_device(),
           torch.cuda.current_stream(device).stream_id)
    buf = _arrival_counters.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _arrival_counters[key] = buf
    return buf[:n]


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, cpu: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device); ``cpu`` elsewhere (the
    interpreter: a small number of programs, so grid-stride loops and merges still run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def acc_scalar(value, ACC_DTYPE: tl.constexpr):
    """A float kernel argument in the accumulation type. Annotate the argument ``tl.float64``: Triton
    types a Python float fp32, which costs float64 kernels ~1e-8 relative (an eps, a 1/temperature).
    The fp64 zero keeps the interpreter exact too (its Python float meets an fp64 tensor)."""
    return (tl.full((), 0.0, tl.float64) + value).to(ACC_DTYPE)


@triton.jit
def last_to_arrive(counter_ptr, arrivals):
    """Last-program epilogues: after this program's stores, bump ``*counter_ptr`` (acq_rel, GPU scope;
    the barrier puts every thread's stores before the release). True in the program that completes
    ``arrivals``; it resets the counter to 0 for the next launch, and sees every other program's
    stores (read them with cache_modifier=".cg")."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == arrivals - 1
    if last:
        tl.store(counter_ptr, 0)  # nobody else touches it again in this launch
    return last
