"""``ddfast.info()`` / ``ddfast info``: versions, device, and which backend runs each op (and why not)."""
from __future__ import annotations

import os
import platform
from typing import Dict, Optional

import torch

from . import _backend, _extension


def available_backends(op: str, device="cpu") -> Dict[str, bool]:
    """backend name -> whether it can run ``op`` on ``device`` (may trigger the extension load)."""
    import ddfast

    ddfast.op_modules()
    device = torch.device(device)
    return {name: _backend.available(op, name, device)
            for name in ("torch", "triton", _backend.provider_name(_backend.COMPILED, device))}


def collect(device: Optional[str] = None) -> dict:
    import ddfast

    ddfast.op_modules()
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001
        triton_version = f"not importable ({type(exc).__name__}: {exc})"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return {
        "ddfast": ddfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch built with)": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "default backend": _backend.get_backend(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
        "extension cache": _extension.cache_dir(),
        "ops": _backend.ops_backends(dev),
        "extension": _extension.status(),
    }


def info(device: Optional[str] = None, *, file=None) -> dict:
    """Print (and return) versions, device, and for each op which backends run and why not."""
    data = collect(device)
    lines = []
    for key, value in data.items():
        if key in ("ops", "extension"):
            continue
        lines.append(f"{key:24s} {value}")
    lines.append("")
    lines.append("backends per op (auto = what backend='auto' picks on this device):")
    for op, row in data["ops"].items():
        lines.append(f"  {op}  [auto -> {row['auto']}]")
        for backend, state in row.items():
            if backend != "auto":
                lines.append(f"    {backend:7s} {state}")
    print("\n".join(lines), file=file)
    return data


def print_kernels(*, file=None) -> int:
    """``ddfast info --kernels``: the sm_90 compile report of every Triton and CUDA kernel
    (ddfast.kernel_report); 1 when the compile gate fails (an error or a hot-kernel spill)."""
    from . import kernel_report

    print("", file=file)
    rows = kernel_report.print_report(file=file)
    return 1 if kernel_report.gate_failures(rows) else 0
