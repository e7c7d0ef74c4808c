"""``real_precision``: run the real (constant) side of a matcher in bf16/fp16 under autocast.

The real side of DC's gradient matching and DM's distribution matching carries no gradient to the
images, so it may run at lower precision: its convolutions and matmuls go through
``torch.autocast`` and their results come back in the synthetic side's dtype. Only fp32 inputs are
affected (autocast leaves float64 alone). The measured effect on the loss and on the image
gradients is in the matchers' docstrings (``tests/test_real_precision.py`` bounds it).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

REAL_PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_real_precision(value: Optional[str]) -> Optional[str]:
    if value not in REAL_PRECISIONS:
        raise ValueError(f"real_precision must be one of None, 'bf16', 'fp16'; got {value!r}")
    return value


def real_side(device: torch.device, real_precision: Optional[str]):
    """Context for the real side's passes: autocast to ``real_precision`` on ``device``, or nothing."""
    if real_precision is None:
        return contextlib.nullcontext()
    # no weight-cast cache: CUDA graph capture (cuda_graph=True) does not support it
    return torch.autocast(device_type=device.type, dtype=REAL_PRECISIONS[real_precision], cache_enabled=False)


def lowered_dtype(dtype: torch.dtype, real_precision: Optional[str]) -> Optional[torch.dtype]:
    """The dtype the real side runs in, or None to keep ``dtype`` (no option, or not fp32: autocast's
    rule, so every strategy treats float64 alike)."""
    if real_precision is None or dtype != torch.float32:
        return None
    return REAL_PRECISIONS[real_precision]
