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

(With ``args.dsa`` the random draws are made class by class right after ``get_images(c, ...)``,
with the generator calls of DC's two ``DiffAugment`` calls (torch's global generators, on the
images' device), so the draws and the generator states left for the rest of main.py (the inner
loop's shuffling and augmentation) are DC's; the augmentation itself runs as one grouped pass
per side.)

The rest of main.py (``optimizer_img.zero_grad(); loss.backward(); ...; loss.item()``) is unchanged.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from ..ops.dsa import apply_group_draws, reference_group_draws
from ..ops.gradient_matcher import GradientMatcher

__all__ = ["dc_class_loop_loss"]


def dc_class_loop_loss(net: torch.nn.Module, get_images, image_syn: torch.Tensor, label_syn: torch.Tensor, args,
                       *, strategy: str = "auto", seeds=None) -> torch.Tensor:
    """DC's per-class gradient-matching loss, all classes in one ``ddfast.GradientMatcher`` pass.

    ``get_images(c, n)``: DC's getter of n random real images of class c (called once per class,
    in class order, like the loop). ``image_syn``/``label_syn``: the synthetic set (any label order).
    ``args``: reads ``batch_real``, ``dis_metric`` and, when ``args.dsa`` is true, ``dsa_strategy``
    and ``dsa_param``: each class's real and synthetic batches then get DSA with one shared seed, as
    in DC (DC's draws and generator states, see above), applied in one grouped pass per side instead
    of two DiffAugment calls per class. ``seeds``: one DSA seed per class present in ``label_syn`` (ascending); default DC's
    clock seed ``int(time.time() * 1000) % 100000`` per class. Returns the summed loss (0-dim).
    """
    classes = torch.unique(label_syn).tolist()
    if seeds is not None and len(seeds) != len(classes):
        raise ValueError(f"seeds must give one seed per synthetic class ({len(classes)}), got {len(seeds)}")
    batch = collect_class_batches(get_images, image_syn, label_syn, classes, args, seeds)
    matcher = GradientMatcher(net, args.dis_metric, strategy=strategy)
    return matcher(batch.x_real, batch.y_real, batch.x_syn, batch.y_syn)


def dc_clock_seed() -> int:
    """DC/DM's per-class DSA seed: ``int(time.time() * 1000) % 100000``."""
    return int(time.time() * 1000) % 100000


def collect_class_batches(get_images, image_syn, label_syn, classes, args, seeds=None):
    """The class loop's inputs, batched: for each class in order, ``get_images(c, args.batch_real)``
    and the class's synthetic images, then (``args.dsa``) the draws of DC's two DiffAugment calls
    with the class's seed, at the same point of the loop as DC makes them. Returns a namespace of
    the (augmented) ``x_real, y_real, x_syn, y_syn`` over all classes."""
    dsa = bool(getattr(args, "dsa", False))
    real, syn, real_draws, syn_draws, class_seeds = [], [], [], [], []
    for group, c in enumerate(classes):
        img_real = get_images(c, args.batch_real)
        img_syn = image_syn[label_syn == c]
        if dsa:
            seed = dc_clock_seed() if seeds is None else int(seeds[group])
            class_seeds.append(seed)
            for draws, img in ((real_draws, img_real), (syn_draws, img_syn)):
                draws.append(reference_group_draws(args.dsa_strategy, seed, img.shape[0], img.shape[2], img.shape[3],
                                                   args.dsa_param, img.dtype, img.device) if len(img) else None)
        real.append(img_real)
        syn.append(img_syn)
    g_real = _group_ids(real)
    g_syn = _group_ids(syn)
    x_real, x_syn = torch.cat(real), torch.cat(syn)
    if dsa:
        with torch.no_grad():
            x_real = apply_group_draws(x_real, g_real, class_seeds, real_draws)
        x_syn = apply_group_draws(x_syn, g_syn, class_seeds, syn_draws)
    class_ids = torch.tensor(classes, dtype=torch.long)
    return SimpleNamespace(x_real=x_real, y_real=class_ids.to(g_real.device)[g_real], x_syn=x_syn,
                           y_syn=class_ids.to(g_syn.device)[g_syn], groups_real=g_real, groups_syn=g_syn)


def _group_ids(batches):
    return torch.cat([torch.full((b.shape[0],), g, dtype=torch.long, device=b.device) for g, b in enumerate(batches)])
