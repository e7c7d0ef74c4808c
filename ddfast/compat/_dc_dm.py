"""DM's loss and class loop (DatasetCondensation ``main_DM.py``) as drop-ins.

The reference computes, inside its class loop,
``loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0))**2)``.
``dm_loss(output_real, output_syn)`` is that line for one class; with labels it is the whole
loop's sum in one fused call (``ddfast.class_mean_loss``). ``DistributionMatcher`` runs the whole
step (DSA, embedding, loss) batched over classes. ``dm_class_loop_loss`` replaces the whole
"update synthetic data" block of main_DM.py.

Before (main_DM.py, inside ``for it in range(args.Iteration+1)``, after ``embed = net.embed``)::

    if 'BN' not in args.model: # for ConvNet
        loss = torch.tensor(0.0).to(args.device)
        for c in range(num_classes):
            img_real = get_images(c, args.batch_real)
            img_syn = image_syn[c*args.ipc:(c+1)*args.ipc].reshape(...)
            if args.dsa:
                seed = int(time.time() * 1000) % 100000
                img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
                img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0))**2)
    else: # for ConvNetBN: the same images, embedded all classes at once per side
        ...

After::

    from ddfast.compat.dc import dm_class_loop_loss
    loss = dm_class_loop_loss(net, get_images, image_syn, args)

The rest (``optimizer_img.zero_grad(); loss.backward(); ...``) is unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..ops.class_mean_loss import class_mean_loss
from ..ops.distribution_matcher import DistributionMatcher, batch_statistic_norms
from ._dc_loop import collect_class_batches

__all__ = ["dm_loss", "DistributionMatcher", "dm_class_loop_loss"]


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


def _embedding(net):
    """main_DM.py's ``net.module.embed`` (DataParallel) or ``net.embed``; a net without ``embed`` is
    itself the embedding."""
    inner = getattr(net, "module", net)
    embed = getattr(inner, "embed", None)
    return embed if callable(embed) else net


def dm_class_loop_loss(net, get_images, image_syn: torch.Tensor, args, *, seeds: Optional[Sequence[int]] = None,
                       backend: str = "auto") -> torch.Tensor:
    """main_DM.py's synthetic-data loss for one iteration, classes batched.

    ``net``: DM's network (its ``embed`` is used, as main_DM.py does). ``get_images(c, n)``: DM's
    getter, called once per class in class order. ``image_syn``: ``num_classes * args.ipc`` images,
    class c in rows ``[c*ipc, (c+1)*ipc)``. ``args`` reads ``ipc``, ``batch_real``, ``model`` and,
    with ``args.dsa``, ``dsa_strategy`` and ``dsa_param``: the DSA draws are DM's per class (seed,
    generator calls, generator state left behind; see ``ddfast.compat.dc.dc_class_loop_loss``).
    ``seeds``: one DSA seed per class (default DM's clock seed per class).

    ConvNetBN branch (``'BN' in args.model``): all real images in one forward, all synthetic ones in
    one, as DM. ConvNet branch: DM embeds each class separately; this is one forward per side when
    the embedding treats images independently, and one per class when it has BatchNorm layers using
    batch statistics (then the batch is what DM's is). The loss sums the classes in one
    ``class_mean_loss`` call, in the features' dtype (DM accumulates into a float32 tensor).
    """
    ipc = int(args.ipc)
    if ipc <= 0 or image_syn.shape[0] % ipc:
        raise ValueError(f"image_syn must hold num_classes * args.ipc images (args.ipc={ipc}), got {image_syn.shape[0]}")
    num_classes = image_syn.shape[0] // ipc
    if seeds is not None and len(seeds) != num_classes:
        raise ValueError(f"seeds must give one seed per class ({num_classes}), got {len(seeds)}")
    label_syn = torch.arange(num_classes, device=image_syn.device).repeat_interleave(ipc)
    batch = collect_class_batches(get_images, image_syn, label_syn, list(range(num_classes)), args, seeds)
    embed = _embedding(net)
    per_class = "BN" not in str(getattr(args, "model", "")) and batch_statistic_norms(embed)
    if not per_class:
        matcher = DistributionMatcher(embed, num_classes, backend=backend)
        return matcher(batch.x_real, batch.y_real, batch.x_syn, batch.y_syn)
    f_real, f_syn = [], []
    for c in range(num_classes):
        with torch.no_grad():
            f_real.append(embed(batch.x_real[batch.y_real == c]))
        f_syn.append(embed(batch.x_syn[batch.y_syn == c]))
    return class_mean_loss(torch.cat(f_real), batch.y_real, torch.cat(f_syn), batch.y_syn, num_classes, backend=backend)
