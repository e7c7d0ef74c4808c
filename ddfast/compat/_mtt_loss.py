"""mtt-distillation ``distill.py`` trajectory loss on ddfast.param_match.

distill.py computes ``mse_loss(student_params[-1], target_params, reduction="sum") / num_params``
divided by ``mse_loss(starting_params, target_params, reduction="sum") / num_params``; the
parameter count cancels, so the loss is ``param_match(student, start, target)``.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from ..ops.param_match import param_match

__all__ = ["trajectory_loss"]

Params = Union[torch.Tensor, Sequence[torch.Tensor]]


def _flat(name: str, params: Params) -> torch.Tensor:
    if isinstance(params, torch.Tensor):
        return params.reshape(-1)
    if not isinstance(params, (list, tuple)) or len(params) == 0:
        raise TypeError(f"{name} must be a tensor or a non-empty list of tensors, got {type(params).__name__}")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
    return torch.cat([p.reshape(-1) for p in params])  # as distill.py builds its flat vectors


def trajectory_loss(student_params: Params, starting_params: Params, target_params: Params, *,
                    backend: str = "auto") -> torch.Tensor:
    """MTT's normalised parameter distance ``‖student − target‖² / ‖start − target‖²``.

    Each argument is a flat parameter vector or a list of parameter tensors (concatenated in
    order). Gradient flows to ``student_params`` only.
    """
    return param_match(_flat("student_params", student_params), _flat("starting_params", starting_params),
                       _flat("target_params", target_params), backend=backend)
