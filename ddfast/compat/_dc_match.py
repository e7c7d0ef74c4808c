"""DatasetCondensation ``utils.py`` gradient-matching losses on ddfast.gradient_match.

``match_loss(gw_syn, gw_real, args)`` (syn first, as in DC) reads ``args.dis_metric``;
``distance_wb(gwr, gws)`` (real first) is DC's per-tensor distance (rank-1 tensors give a float32
zero, as DC returns). ``args.device`` is not needed: the result lives on the gradients' device.
"""
from __future__ import annotations

import torch

from ..ops.gradient_match import METRICS, gradient_match

__all__ = ["match_loss", "distance_wb"]


def distance_wb(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
    """Σ over rows of ``1 − <r,s>/(‖r‖‖s‖ + 1e-6)`` for one parameter gradient (0 for rank 1)."""
    if isinstance(gwr, torch.Tensor) and gwr.dim() == 1:
        return torch.tensor(0, dtype=torch.float, device=gwr.device)
    return gradient_match([gws], [gwr], "ours", eps=1e-6)


def match_loss(gw_syn, gw_real, args) -> torch.Tensor:
    """DC's ``match_loss``: ``args.dis_metric`` in ("ours", "mse", "cos"); unknown → ValueError."""
    metric = getattr(args, "dis_metric", None)
    if metric not in METRICS:
        raise ValueError(f"args.dis_metric must be one of {METRICS} (DC's distance functions), got {metric!r}")
    return gradient_match(list(gw_syn), list(gw_real), metric, eps=1e-6)
