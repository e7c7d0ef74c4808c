"""Triton launchers for class_mean_loss (DM/CAFE): the synthetic side's segmented means fused with
the difference to the real means and its per-class squared norm; backward ``2·g_c·diff_c/n_c`` per
synthetic row. Kernels are shared with class_means (kernels/class_means.py)."""
import torch

from ._common import acc_dtypes
from .class_means import gather_scale, segment_means


def class_mean_loss_forward(f_syn: torch.Tensor, y_syn: torch.Tensor, mean_real: torch.Tensor,
                            count_real: torch.Tensor, num_classes: int):
    """(per-class loss (C,), diff = mean_syn − mean_real (C, D), syn counts (C,)); acc dtype."""
    acc = acc_dtypes(f_syn.dtype)[1]
    diff, loss, counts = segment_means(f_syn, y_syn, num_classes, ref=mean_real.to(acc), ref_counts=count_real)
    return loss, diff, counts


def class_mean_loss_backward(grad_loss: torch.Tensor, y_syn: torch.Tensor, diff: torch.Tensor,
                             count_syn: torch.Tensor, dtype: torch.dtype):
    coef = 2.0 * grad_loss.to(diff.dtype) / count_syn.clamp(min=1).to(diff.dtype)
    return gather_scale(diff, coef, y_syn, dtype)
