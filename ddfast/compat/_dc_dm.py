"""DM's loss (DatasetCondensation ``main_DM.py``) as a drop-in.

The reference computes, inside its class loop,
``loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0))**2)``.
``dm_loss(output_real, output_syn)`` is that line for one class; with labels it is the whole
loop's sum in one fused call (``ddfast.class_mean_loss``). ``DistributionMatcher`` runs the whole
step (DSA, embedding, loss) batched over classes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.class_mean_loss import class_mean_loss
from ..ops.distribution_matcher import DistributionMatcher

__all__ = ["dm_loss", "DistributionMatcher"]


def dm_loss(output_real: torch.Tensor, output_syn: torch.Tensor, labels_real: Optional[torch.Tensor] = None,
            labels_syn: Optional[torch.Tensor] = None, num_classes: Optional[int] = None) -> torch.Tensor:
    """``Σ (mean(output_real, 0) − mean(output_syn, 0))²`` for one class, or summed over the classes of
    ``labels_real``/``labels_syn`` (present on both sides) when they are given. Real side constant."""
    if (labels_real is None) != (labels_syn is None):
        raise ValueError("give both labels_real and labels_syn, or neither (one class)")
    if labels_real is None:
        labels_real = torch.zeros(output_real.shape[0], dtype=torch.int64, device=output_real.device)
        labels_syn = torch.zeros(output_syn.shape[0], dtype=torch.int64, device=output_syn.device)
        num_classes = 1
    return class_mean_loss(output_real, labels_real, output_syn, labels_syn, num_classes)
