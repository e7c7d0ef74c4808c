"""ddfast — fused Triton and C++/CUDA operators for dataset distillation.

Every op takes CPU and CUDA tensors, supports autograd, and has a ``backend=`` argument
("auto", "cuda"/"cpp", "triton", "torch"); see ``ddfast.set_backend`` and ``ddfast info``.
Public names are imported lazily, so ``import ddfast`` stays cheap.
"""
from __future__ import annotations

import importlib

from ._backend import get_backend, set_backend

__version__ = "0.1.0"

# public name -> module that defines it (one module per op, see ddfast/ops/)
_PUBLIC = {
    "param_match": "ddfast.ops.param_match",
    "TrajectoryMatcher": "ddfast.ops.trajectory_matcher",
    "gradient_match": "ddfast.ops.gradient_match",
    "GradientMatcher": "ddfast.ops.gradient_matcher",
    "class_means": "ddfast.ops.class_means",
    "class_mean_loss": "ddfast.ops.class_mean_loss",
    "mmd": "ddfast.ops.mmd",
    "bn_stat_loss": "ddfast.ops.bn_stat",
    "bn_stat_loss_sum": "ddfast.ops.bn_stat",
    "BNStatMatcher": "ddfast.ops.bn_stat",
    "bn_eval_stat": "ddfast.ops.bn_eval_stat",
    "DistributionMatcher": "ddfast.ops.distribution_matcher",
    "supcon_nce": "ddfast.ops.supcon_nce",
    "MIM4DD": "ddfast.ops.mim4dd",
    "dsa_augment": "ddfast.ops.dsa",
    "norm_relu_pool": "ddfast.ops.norm_relu_pool",
    "LowRankImages": "ddfast.ops.low_rank_images",
    "low_rank_budget_ipc": "ddfast.ops.low_rank_images",
    "info": "ddfast.info",
    "distill": "ddfast.distill",
    "evaluate": "ddfast.evaluate",
    "available_backends": "ddfast.info",
    "set_checks": "ddfast._checks",
    "get_checks": "ddfast._checks",
}

__all__ = sorted(_PUBLIC) + ["set_backend", "get_backend", "__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ddfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


def op_modules():
    """Import the module of every op (each registers its backends)."""
    for module in sorted({m for m in _PUBLIC.values() if m.startswith("ddfast.ops.")}):
        importlib.import_module(module)
