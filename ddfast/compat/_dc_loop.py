"""Drop-in for the class loop body of DatasetCondensation ``main.py`` (DC and DSA).

Before (DC main.py, inside ``for ol in range(args.outer_loop)``, after the BatchNorm block)::

    loss = torch.tensor(0.0).to(args.device)
    for c in range(num_classes):
        img_real = get_images(c, args.batch_real)
        lab_real = torch.ones((img_real.shape[0],), device=args.device, dtype=torch.long) * c
        img_syn = image_syn[c*args.ipc:(c+1)*args.ipc].reshape((args.ipc, channel, im_size[0], im_size[1]))
        lab_syn = torch.ones((args.ipc,), device=args.device, dtype=torch.long) * c
        if args.dsa:
            seed = int(time.time() * 1000) % 100000
            img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
            img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
        output_real = net(img_real)
        loss_real = criterion(output_real, lab_real)
        gw_real = torch.autograd.grad(loss_real, net_parameters)
        gw_real = list((_.detach().clone() for _ in gw_real))
        output_syn = net(img_syn)
        loss_syn = criterion(output_syn, lab_syn)
        gw_syn = torch.autograd.grad(loss_syn, net_parameters, create_graph=True)
        loss += match_loss(gw_syn, gw_real, args)

After::

    from ddfast.compat.dc import dc_class_loop_loss
    loss = dc_class_loop_loss(net, get_images, image_syn, label_syn, args)

The rest of main.py (``optimizer_img.zero_grad(); loss.backward(); ...; loss.item()``) is unchanged.
"""
from __future__ import annotations

import time

import torch

from ..ops.gradient_matcher import GradientMatcher

__all__ = ["dc_class_loop_loss"]


def dc_class_loop_loss(net: torch.nn.Module, get_images, image_syn: torch.Tensor, label_syn: torch.Tensor, args,
                       *, strategy: str = "auto") -> torch.Tensor:
    """DC's per-class gradient-matching loss, all classes in one ``ddfast.GradientMatcher`` pass.

    ``get_images(c, n)``: DC's getter of n random real images of class c (called once per class,
    in class order, like the loop). ``image_syn``/``label_syn``: the synthetic set (any label order).
    ``args``: reads ``batch_real``, ``dis_metric`` and, when ``args.dsa`` is true, ``dsa_strategy``
    and ``dsa_param``: each class's real and synthetic batches then get DSA with one shared seed, as
    in DC (DiffAugment from ``ddfast.compat.dc``). Returns the summed loss (a 0-dim tensor).
    """
    classes = torch.unique(label_syn).tolist()
    dsa = bool(getattr(args, "dsa", False))
    if dsa:
        from .dc import DiffAugment
    real, real_labels, syn, syn_labels = [], [], [], []
    for c in classes:
        img_real = get_images(c, args.batch_real)
        img_syn = image_syn[label_syn == c]
        if dsa:
            seed = int(time.time() * 1000) % 100000
            img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
            img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
        real.append(img_real)
        syn.append(img_syn)
        real_labels.append(torch.full((img_real.shape[0],), c, dtype=torch.long, device=img_real.device))
        syn_labels.append(torch.full((img_syn.shape[0],), c, dtype=torch.long, device=img_syn.device))
    matcher = GradientMatcher(net, args.dis_metric, strategy=strategy)
    return matcher(torch.cat(real), torch.cat(real_labels), torch.cat(syn), torch.cat(syn_labels))
