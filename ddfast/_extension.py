"""Loading the compiled extension: one shared library per op (``ddfast._C_<op>``).

Order: a library built ahead of time by setup.py, else a JIT build with
``torch.utils.cpp_extension.load`` into a cache directory (ninja, incremental). Any failure is
one warning naming the cause; the op's dispatch then falls back to the next backend and
``ddfast.info()`` reports why.

Environment:
  DDFAST_NO_EXTENSION=1   never load or build the extension
  DDFAST_JIT=0            use only ahead-of-time builds, never compile at run time
  DDFAST_FORCE_JIT=1      ignore ahead-of-time builds (developers editing csrc/)
  DDFAST_CACHE_DIR        JIT build cache (default ~/.cache/ddfast)
  DDFAST_BUILD_LOCK_TIMEOUT  seconds to wait for another process's build lock (default 600)
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
import warnings
from typing import Callable, Dict, Optional

import torch

_lock = threading.Lock()
_loaded: Dict[str, bool] = {}
_reasons: Dict[str, str] = {}
_how: Dict[str, str] = {}


def csrc_dir() -> str:
    """csrc/ of a source checkout (editable install), else the copy shipped inside the package."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")):
        if os.path.isdir(candidate):
            return candidate
    return os.path.join(here, "csrc")


def cache_dir() -> str:
    root = os.environ.get("DDFAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ddfast")
    tag = f"torch{torch.__version__.replace('+', '_')}-{'cu' + torch.version.cuda if torch.version.cuda else 'cpu'}"
    return os.path.join(root, tag)


def _with_cuda() -> bool:
    if torch.version.cuda is None or os.environ.get("DDFAST_NO_CUDA") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _wait_for_build_lock(build_dir: str) -> None:
    """cpp_extension waits forever on a lock left by a killed build. Wait while another build may
    be running, but treat a lock older than DDFAST_BUILD_LOCK_TIMEOUT seconds as stale: remove it
    with a warning and go on."""
    lock = os.path.join(build_dir, "lock")
    timeout = float(os.environ.get("DDFAST_BUILD_LOCK_TIMEOUT", "600"))
    while os.path.exists(lock):
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:  # removed meanwhile
            return
        if age > timeout:
            warnings.warn(f"ddfast: removing a stale build lock {lock} ({age:.0f}s old, more than "
                          f"DDFAST_BUILD_LOCK_TIMEOUT={timeout:.0f}s); if a build was still running it will redo its work",
                          stacklevel=3)
            try:
                os.remove(lock)
            except OSError:
                pass
            return
        time.sleep(min(1.0, max(0.05, timeout - age)))


def _jit_build(op: str) -> str:
    from torch.utils import cpp_extension

    src = csrc_dir()
    cpp = os.path.join(src, op + ".cpp")
    if not os.path.exists(cpp):
        raise FileNotFoundError(f"no C++ source {cpp}")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    sources = [cpp]
    cflags = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP in torch's CPU builds
    cu = os.path.join(src, "cuda", op + ".cu")
    if _with_cuda() and os.path.exists(cu):
        sources.append(cu)
        cflags.append("-DDDFAST_WITH_CUDA=1")
    build_dir = os.path.join(cache_dir(), op)
    os.makedirs(build_dir, exist_ok=True)
    _wait_for_build_lock(build_dir)
    cpp_extension.load(
        name=f"ddfast_C_{op}",
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-lineinfo", "-DDDFAST_WITH_CUDA=1"],  # no fast math: fp32 parity
        extra_include_paths=[src],
        extra_ldflags=["-fopenmp"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("DDFAST_VERBOSE_BUILD") == "1",
    )
    return f"compiled on first use in {build_dir}"


def load(op: str, on_load: Optional[Callable[[], None]] = None) -> bool:
    """Load the compiled kernels of ``op``; returns False (after one warning) when impossible.

    ``on_load`` runs once after the library is loaded: it registers the Python side of the ops
    (fake tensors, autograd) that the C++ file defined.
    """
    if op in _loaded:  # fast path without the lock (also keeps torch.compile tracing through here)
        return _loaded[op]
    with _lock:
        if op in _loaded:
            return _loaded[op]
        try:
            if os.environ.get("DDFAST_NO_EXTENSION") == "1":
                raise RuntimeError("disabled by DDFAST_NO_EXTENSION=1")
            spec = None if os.environ.get("DDFAST_FORCE_JIT") == "1" else importlib.util.find_spec(f"ddfast._C_{op}")
            if spec is not None and spec.origin:
                torch.ops.load_library(spec.origin)
                _how[op] = f"built ahead of time ({os.path.basename(spec.origin)})"
            elif os.environ.get("DDFAST_JIT", "1") == "0":
                raise RuntimeError("not built ahead of time and DDFAST_JIT=0 forbids compiling on first use")
            else:
                _how[op] = _jit_build(op)
            if on_load is not None:
                on_load()
            _loaded[op] = True
        except Exception as exc:  # noqa: BLE001 - any build/load failure becomes a fallback
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
            _reasons[op] = reason
            _loaded[op] = False
            warnings.warn(f"ddfast: compiled kernels for '{op}' are unavailable ({reason}); "
                          "falling back to the Triton/torch backends. `ddfast info` shows this again.",
                          RuntimeWarning, stacklevel=3)
        return _loaded[op]


def status() -> Dict[str, str]:
    """op -> how it was loaded, or why it is unavailable (only ops that were asked for)."""
    out = {}
    for op, ok in sorted(_loaded.items()):
        out[op] = _how.get(op, "loaded") if ok else "unavailable: " + _reasons.get(op, "unknown")
    return out


_cuda_kernels: Dict[str, bool] = {}  # qualified op name -> registered a CUDA kernel (fixed once loaded)


def has_cuda_kernel(qualified_name: str) -> bool:
    """Whether the loaded library registered a CUDA kernel for ``ddfast::name``. Cached, and a
    constant to torch.compile: the dispatcher query returns a bool, which Dynamo cannot trace
    (fullgraph compiles of CUDA ops failed on it; seen on an H200, torch 2.11)."""
    known = _cuda_kernels.get(qualified_name)
    if known is None:
        known = _cuda_kernels[qualified_name] = _query_cuda_kernel(qualified_name)
    return known


def _query_cuda_kernel(qualified_name: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, "CUDA"))
    except Exception:  # noqa: BLE001
        return False


# What torch.compiler.assume_constant_result sets, without its import of torch._dynamo (which pulls
# in Triton: `import ddfast` stays cheap). tests/test_extension.py compiles through it.
_query_cuda_kernel._dynamo_marked_constant = True
