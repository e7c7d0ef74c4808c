"""The benchmark case: how to build inputs, the reference, the fused call, and its cost model."""
from __future__ import annotations

from dataclasses import dataclass, field
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
    cuda_variants: Tuple[str, ...] = ()                  # variants timed on CUDA devices only (e.g. CUDA graphs)
    grad_inputs: Tuple[str, ...] = ()                    # inputs whose .grad is compared with the reference
    default: bool = False                                # part of the default (quick) run; else only --full
    bytes_moved: Optional[Callable[[Dict], float]] = None  # minimal fwd+bwd DRAM traffic, for GB/s
    flops: Optional[Callable[[Dict], float]] = None        # fwd+bwd useful flops, for TFLOP/s
    tol: float = 1e-4                                    # max |fused − ref| / max |ref| (per output and grad)
    size: Optional[float] = None                         # x-axis of the per-op plot (e.g. elements)
    devices: Tuple[str, ...] = ("cpu", "cuda")
    notes: str = ""                                      # what the case measures; copied into the JSON report
    # Other computations users run for the same result (e.g. DC's per-class loop), each timed as a
    # provider named by its key and checked against ``reference``; ddfast rows report speed-ups
    # against each of them as well as against ``reference``. baseline(**inputs) -> tensor.
    baselines: Dict[str, Callable[..., torch.Tensor]] = field(default_factory=dict)
    # Baselines timed but not checked: the computation users run, with its own random draws (DM's
    # loop with DiffAugment's host RNG against a step with device-drawn DSA); check "n/a".
    unchecked: Tuple[str, ...] = ()
    # Providers of an opt-in lossy mode (e.g. the real side in bf16): checked, and a miss is reported
    # as check "approx" with its error instead of failing the run.
    approximate: Tuple[str, ...] = ()
    # Work model: work_flops(inputs, provider) -> fwd+bwd flops that provider's algorithm executes
    # (None: unknown). The bench's "work" column is work_flops(provider) / work_flops("reference").
    work_flops: Optional[Callable[[Dict, str], Optional[float]]] = None
    # The work every provider does alike and none changes (SRe2L's step: the teacher's own forward
    # and backward to the images): timed as provider "floor" (unchecked), so a row's time above it,
    # the part the providers differ in, is measured: floor(**inputs) -> tensor.
    floor: Optional[Callable[..., torch.Tensor]] = None


_PERSISTENT: dict = {}


def persistent(owner, build):
    """One object kept across the timed calls of a case (a CUDA-graph matcher: captured once, then
    replayed), rebuilt when ``owner`` (the case's model) changes. Only one is kept, and the runner
    drops it after each case (``release_persistent``): on an H200, graphs kept from earlier dc_step
    cases held 12.8 GiB and pushed a later case's provider out of memory."""
    obj = _PERSISTENT.get("obj")
    if obj is None or _PERSISTENT.get("owner") is not owner:
        _PERSISTENT.clear()
        obj = build()
        _PERSISTENT.update(owner=owner, obj=obj)
    return obj


def release_persistent() -> None:
    _PERSISTENT.clear()
