"""Drop-in for the inner loop of mtt-distillation ``distill.py`` (one iteration's student steps + loss).

Before (distill.py, after ``starting_params``/``target_params`` are picked from the expert)::

    student_params = [torch.cat([p.data.to(args.device).reshape(-1) for p in starting_params], 0).requires_grad_(True)]
    starting_params = torch.cat([p.data.to(args.device).reshape(-1) for p in starting_params], 0)
    syn_images = image_syn
    y_hat = label_syn.to(args.device)
    indices_chunks = []
    for step in range(args.syn_steps):
        if not indices_chunks:
            indices = torch.randperm(len(syn_images))
            indices_chunks = list(torch.split(indices, args.batch_syn))
        these_indices = indices_chunks.pop()
        x = syn_images[these_indices]
        this_y = y_hat[these_indices]
        if args.dsa and (not args.no_aug):
            x = DiffAugment(x, args.dsa_strategy, param=args.dsa_param)
        x = student_net(x, flat_param=student_params[-1])
        ce_loss = criterion(x, this_y)
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    param_loss = ... mse_loss(student_params[-1], target_params, reduction="sum") / num_params
    param_dist = ... mse_loss(starting_params, target_params, reduction="sum") / num_params
    grand_loss = param_loss / param_dist

After::

    from ddfast.compat.mtt import mtt_inner_loss
    grand_loss = mtt_inner_loss(student_net, image_syn, label_syn.to(args.device), syn_lr,
                                starting_params, target_params, args)          # mode="exact"

The rest (``optimizer_img.zero_grad(); optimizer_lr.zero_grad(); grand_loss.backward(); ...``) is
unchanged. Same loss and gradients (and the same global-RNG draws) as the loop; ``mode="exact"``
holds one step's graph instead of all of them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.trajectory_matcher import TrajectoryMatcher

__all__ = ["mtt_inner_loss"]


def _flag(value) -> bool:
    # distill.py turns --dsa 'True'/'False' into a bool; accept either
    return value == "True" if isinstance(value, str) else bool(value)


def mtt_inner_loss(student_net: nn.Module, image_syn: torch.Tensor, y_hat: torch.Tensor, syn_lr: torch.Tensor,
                   starting_params, target_params, args, *, mode: str = "exact",
                   generator: Optional[torch.Generator] = None, checkpoint_every: Optional[int] = None,
                   micro_batch: Optional[int] = None) -> torch.Tensor:
    """distill.py's inner loop and ``grand_loss`` (see the module doc for the before/after).

    student_net: the ``ReparamModule`` distill.py builds (or the plain network, or either wrapped in
    ``DataParallel``). starting_params/target_params: the expert's lists of tensors (or flat vectors).
    args: reads ``syn_steps``, ``batch_syn`` (None: the whole set), ``dsa``, ``no_aug``,
    ``dsa_strategy``, ``dsa_param``; ``texture`` is not supported. mode: "exact" (default),
    "unrolled" (distill.py's graph) or "tesla" (TESLA's approximation).
    """
    if getattr(args, "texture", False):
        raise ValueError("args.texture: the texture mode's random rolls are not supported by mtt_inner_loss")
    if isinstance(student_net, nn.DataParallel):
        student_net = student_net.module
    augment = _flag(getattr(args, "dsa", False)) and not getattr(args, "no_aug", False)
    tm = TrajectoryMatcher(student_net, syn_steps=args.syn_steps, batch_syn=getattr(args, "batch_syn", None),
                           mode=mode, dsa_strategy=args.dsa_strategy if augment else None,
                           dsa_param=getattr(args, "dsa_param", None) if augment else None,
                           align_corners=True, checkpoint_every=checkpoint_every, micro_batch=micro_batch)
    return tm(image_syn, y_hat, syn_lr, starting_params, target_params, generator=generator)
