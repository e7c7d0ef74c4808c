"""The benchmark case: how to build inputs, the reference, the fused call, and its cost model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch


@dataclass
class Case:
    name: str                                            # "op/setting", e.g. "param_match/flat-11M"
    make_inputs: Callable[[torch.device], Dict]          # fresh inputs; leaf tensors that need .grad set requires_grad
    reference: Callable[..., torch.Tensor]               # reference(**inputs) -> tensor to backprop from
    fused: Callable[..., torch.Tensor]                   # fused(backend, **inputs) -> same
    op: Optional[str] = None                             # ddfast op whose backends are timed (None: composite step)
    backends: Tuple[str, ...] = ("triton", "compiled")   # ddfast backends to time; ("auto",) for composite steps
    variants: Tuple[str, ...] = ()                       # named alternatives of a composite step, each its own provider
    grad_inputs: Tuple[str, ...] = ()                    # inputs whose .grad is compared with the reference
    default: bool = False                                # part of the default (quick) run; else only --full
    bytes_moved: Optional[Callable[[Dict], float]] = None  # minimal fwd+bwd DRAM traffic, for GB/s
    flops: Optional[Callable[[Dict], float]] = None        # fwd+bwd useful flops, for TFLOP/s
    tol: float = 1e-4                                    # max |fused − ref| / max |ref| (per output and grad)
    size: Optional[float] = None                         # x-axis of the per-op plot (e.g. elements)
    devices: Tuple[str, ...] = ("cpu", "cuda")
    notes: str = ""                                      # what the case measures; copied into the JSON report
