"""The ``precision=`` argument of the matmul-bound ops (mmd, supcon_nce).

* ``"ieee"``: exact fp32 products (FMA on GPUs), fp32 accumulation.
* ``"tf32"``: fp32 operands rounded to TF32 (10-bit mantissa), fp32 accumulation (tensor cores).
* ``"tf32x3"``: three TF32 products (split hi/lo operands), about fp32 accuracy on tensor cores.
* ``"bf16"``: fp32 operands rounded to bf16, fp32 accumulation (tensor cores).
* ``"auto"``: follows torch's fp32 matmul setting — TF32 where torch would use it on CUDA, else ieee —
  so a default comparison with the eager reference is like for like.

bf16/fp16 inputs always multiply in their own type with fp32 accumulation, float64 inputs in float64:
the mode applies to fp32 inputs only. The Triton kernels pass the mode to ``tl.dot``; the torch and
C++ paths emulate tf32/bf16 by rounding the matmul operands (products of rounded operands are exact
in fp32, so only the accumulation order differs from tensor cores), with a straight-through gradient.
"""
from __future__ import annotations

import torch

PRECISIONS = ("auto", "ieee", "tf32", "tf32x3", "bf16")


def check_precision(precision) -> str:
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a string, one of {PRECISIONS}; got {type(precision).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    return precision


def kernel_precision(precision: str, t: torch.Tensor) -> str:
    """The tl.dot mode for the Triton kernels: "auto" resolved, non-fp32 inputs always "ieee".
    The CPU interpreter runs fp32 "ieee" only: there the caller rounds the operands instead
    (``interpreter_operand``), as the torch and C++ paths do."""
    if t.dtype != torch.float32 or not t.is_cuda:
        return "ieee"
    if precision == "auto":
        from ..kernels._common import dot_precision  # the one place that reads torch's setting

        return dot_precision(t)
    return precision


def _round_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to the nearest TF32 value (ties away from zero, as cvt.rna.tf32.f32)."""
    bits = t.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    finite = torch.isfinite(t)
    return torch.where(finite, rounded.view(torch.float32), t)


def round_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """t with its values rounded as a tf32/bf16 matmul rounds its operands (straight-through gradient);
    t itself for the other modes and for non-fp32 inputs."""
    if t.dtype != torch.float32 or precision not in ("tf32", "bf16"):
        return t
    with torch.no_grad():
        rounded = _round_tf32(t) if precision == "tf32" else t.to(torch.bfloat16).to(torch.float32)
    return t + (rounded - t).detach() if t.requires_grad else rounded


def interpreter_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """Operand for the Triton kernels: on CUDA t itself (tl.dot rounds), in the CPU interpreter t
    rounded like the requested mode (the interpreter's tl.dot has no tf32/bf16 arithmetic)."""
    return t if t.is_cuda else round_operand(t, precision)
