"""Input validation shared by the ops: clear ValueError/TypeError naming the argument.

NaN/Inf checks cost one device sync per call; DDFAST_CHECK_FINITE=0 turns them off.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, t, *, min_dim: int = 0, allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels and references: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite_checks_on() -> bool:
    # data-dependent checks would break torch.compile graphs; compiled code skips them
    return os.environ.get("DDFAST_CHECK_FINITE", "1") != "0" and not torch.compiler.is_compiling()


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN/Inf (a full pass over t: prefer ``check_result_finite`` on hot paths)."""
    if not _finite_checks_on() or t.numel() == 0:
        return
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_result_finite(result: torch.Tensor, **inputs) -> None:
    """Cheap NaN/Inf check for reductions: NaN/Inf inputs make the (small) result non-finite, so
    only a non-finite result triggers the full scan that names the offending input. A non-finite
    result from finite inputs (e.g. a zero denominator) is returned as the reference would."""
    if not _finite_checks_on() or result.numel() == 0:
        return
    if bool(torch.isfinite(result.detach()).all()):
        return
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor):
            check_finite(name, t)
        elif isinstance(t, (list, tuple)):
            for i, x in enumerate(t):
                check_finite(f"{name}[{i}]", x)


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    uniq = set(devices.values())
    if len(uniq) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {desc}")
    return next(iter(uniq)) if uniq else torch.device("cpu")


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"tensors must share one dtype; got {desc}")
    return next(iter(dtypes.values()))


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")


def check_labels(name: str, labels, n: int, num_classes: Optional[int] = None) -> torch.Tensor:
    """Integer 1-D labels of length n in [0, num_classes). The value range is not read while
    torch.compile traces (a data-dependent guard would break the graph), like the finite checks."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class labels, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length {n} (one label per sample), got shape {tuple(labels.shape)}")
    if n and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()  # one device sync for both bounds
        if num_classes is not None and (lo < 0 or hi >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}); found values in [{lo}, {hi}]")
        if lo < 0:
            raise ValueError(f"{name} must be non-negative class indices")
    return labels


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be a positive int, got {type(num_classes).__name__}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return num_classes


def infer_num_classes(*labels: torch.Tensor) -> int:
    """max label over every non-empty label tensor, plus one (one device sync)."""
    maxima = [y.max() for y in labels if y.numel()]
    return int(torch.stack(maxima).max()) + 1 if maxima else 1


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
