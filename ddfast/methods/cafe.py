"""CAFE (Wang et al., CVPR 2022): layer-wise feature alignment plus a discrimination term.

Loss on one real and one synthetic batch of every class (kaiwang960112/CAFE ``distill.py``):

    L = Σ_l w_l Σ_c ‖mean f_l(real_c) − mean f_l(syn_c)‖²          (ddfast.class_mean_loss, layers)
      + Σ_c ‖mean f(real_c) − mean f(syn_c)‖²                         (final embedding, weight 1 again)
      + β · Σ_i CE(f(real_i) · S̄ᵀ, y_i)   (S̄: per-class mean synthetic embeddings; CE summed)

The layers are the activations of every ConvNet block (the reference taps the block outputs before
pooling and the final pooled features), weights 0.1 for the early blocks and 1 for the last block
and the embedding (reference: 0.1, 0.1, 1, 1 on a 3-block ConvNet); β = 0.01 (``inner_weight``).
The real batch's CE on the network (``loss_real`` in the reference) only reaches the network's
gradients, which the reference zeroes before using them, so it does not change the images and is
left out. The network is trained between outer steps on the synthetic set, as DC.

The reference sizes its outer/inner loops adaptively (stop when the accuracy on real data stops
moving, thresholds λ1 = 0.04, λ2 = 0.03); here DC's fixed loops are used instead, documented as a
simplification. Hyper-parameters: lr_img 0.1 (SGD, momentum 0.5), lr_net 0.01, batch_real 256
per class; digits scaling as DC (width 32, depth 2, real init).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Dataset, RealData
from ..ops.class_mean_loss import class_mean_loss
from ..ops.class_means import class_means
from ._common import IterativeMethod, SyntheticSet, generator, train_epochs
from .dc import DC

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid)


def block_outputs(net: nn.Module) -> List[nn.Module]:
    """Modules whose outputs CAFE matches: each ConvNet block's activation (or each residual block)."""
    return [m for m in net.features if isinstance(m, ACTIVATIONS) or type(m).__name__ == "BasicBlock"]


def cafe_features(net: nn.Module, x: torch.Tensor):
    """(layer features, final embedding, logits) of ``net`` on ``x`` in one forward."""
    taps, outs = block_outputs(net), []
    handles = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in taps]
    try:
        emb = net.features(x).flatten(1)
    finally:
        for h in handles:
            h.remove()
    return outs, emb, net.classifier(emb)


def cafe_loss(net: nn.Module, x_real, y_real, x_syn, y_syn, num_classes: int, layer_weights: List[float],
              beta: float) -> torch.Tensor:
    """CAFE's image loss (module doc)."""
    with torch.no_grad():
        f_real, e_real, _ = cafe_features(net, x_real)
    f_syn, e_syn, _ = cafe_features(net, x_syn)
    loss = class_mean_loss(f_real + [e_real], y_real, f_syn + [e_syn], y_syn, num_classes,
                           layer_weights=list(layer_weights) + [1.0])
    loss = loss + class_mean_loss(e_real, y_real, e_syn, y_syn, num_classes)
    syn_means, _ = class_means(e_syn, y_syn, num_classes)
    logits = e_real @ syn_means.t()
    return loss + beta * F.cross_entropy(logits, y_real, reduction="sum")


class CAFE(IterativeMethod):
    name = "cafe"

    @classmethod
    def default_hparams(cls, dataset: Dataset, ipc: int = 10) -> dict:
        hp = DC.default_hparams(dataset, ipc)
        hp.update(beta=0.01, shallow_weight=0.1, dsa_strategy=None, iterations=200 if ipc <= 1 else 20)
        return hp

    def step(self, iteration: int, real: RealData, syn: SyntheticSet) -> torch.Tensor:
        hp = self.hp
        net = self.new_network(iteration)
        opt_net = torch.optim.SGD(net.parameters(), lr=hp["lr_net"])
        n_layers = len(block_outputs(net))
        weights = [hp["shallow_weight"]] * (n_layers - 1) + [1.0]
        strategy = hp.get("dsa_strategy")
        total = 0
        for ol in range(hp["outer_loop"]):
            x_real, y_real = self.real_batch(real, hp["batch_real"], iteration, ol)
            x_syn, y_syn = syn.images(), syn.labels
            x_real, x_syn = self.augment_pair(x_real, y_real, x_syn, y_syn, iteration, ol)
            loss = cafe_loss(net, x_real, y_real, x_syn, y_syn, self.num_classes, weights, hp["beta"])
            total = total + self.update(loss, syn, net, x_syn, y_syn, x_real, y_real)
            if ol == hp["outer_loop"] - 1:
                break
            train_epochs(net, opt_net, syn.images().detach(), syn.labels, hp["inner_loop"], hp["batch_train"],
                         generator(self.seed, iteration, ol, "inner"), strategy)
        return total / hp["outer_loop"]
