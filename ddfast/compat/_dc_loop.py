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

(With ``args.dsa`` the augmentation runs as one grouped ``ddfast.dsa_augment`` call per side;
its random draws are the reference's per class on CPU. On CUDA they come from the CPU generator,
so they are valid DSA draws but not DC's CUDA stream.)

The rest of main.py (``optimizer_img.zero_grad(); loss.backward(); ...; loss.item()``) is unchanged.
"""
from __future__ import annotations

import time

import torch

from ..ops.dsa import dsa_augment
from ..ops.gradient_matcher import GradientMatcher

__all__ = ["dc_class_loop_loss"]


def dc_class_loop_loss(net: torch.nn.Module, get_images, image_syn: torch.Tensor, label_syn: torch.Tensor, args,
                       *, strategy: str = "auto", seeds=None) -> torch.Tensor:
    """DC's per-class gradient-matching loss, all classes in one ``ddfast.GradientMatcher`` pass.

    ``get_images(c, n)``: DC's getter of n random real images of class c (called once per class,
    in class order, like the loop). ``image_syn``/``label_syn``: the synthetic set (any label order).
    ``args``: reads ``batch_real``, ``dis_metric`` and, when ``args.dsa`` is true, ``dsa_strategy``
    and ``dsa_param``: each class's real and synthetic batches then get DSA with one shared seed, as
    in DC, through one grouped ``ddfast.dsa_augment`` call per side instead of two DiffAugment calls
    per class. ``seeds``: one DSA seed per class present in ``label_syn`` (ascending); default DC's
    clock seed ``int(time.time() * 1000) % 100000`` per class. Returns the summed loss (0-dim).
    """
    classes = torch.unique(label_syn).tolist()
    dsa = bool(getattr(args, "dsa", False))
    if seeds is not None and len(seeds) != len(classes):
        raise ValueError(f"seeds must give one seed per synthetic class ({len(classes)}), got {len(seeds)}")
    real, real_groups, syn, syn_groups, class_seeds = [], [], [], [], []
    for group, c in enumerate(classes):
        img_real = get_images(c, args.batch_real)
        img_syn = image_syn[label_syn == c]
        if dsa:
            class_seeds.append(int(time.time() * 1000) % 100000 if seeds is None else int(seeds[group]))
        real.append(img_real)
        syn.append(img_syn)
        real_groups.append(torch.full((img_real.shape[0],), group, dtype=torch.long, device=img_real.device))
        syn_groups.append(torch.full((img_syn.shape[0],), group, dtype=torch.long, device=img_syn.device))
    x_real, g_real, x_syn, g_syn = torch.cat(real), torch.cat(real_groups), torch.cat(syn), torch.cat(syn_groups)
    if dsa:
        with torch.no_grad():
            x_real = dsa_augment(x_real, g_real, args.dsa_strategy, class_seeds, param=args.dsa_param)
        x_syn = dsa_augment(x_syn, g_syn, args.dsa_strategy, class_seeds, param=args.dsa_param)
    class_ids = torch.tensor(classes, dtype=torch.long, device=g_real.device)
    matcher = GradientMatcher(net, args.dis_metric, strategy=strategy)
    return matcher(x_real, class_ids[g_real], x_syn, class_ids.to(g_syn.device)[g_syn])
