"""DC (Zhao et al., ICLR 2021) and DSA (Zhao & Bilen, ICML 2021) on ``ddfast.GradientMatcher``.

One iteration, as DatasetCondensation's ``main.py``: a fresh network; ``outer_loop`` times
{ match per-class gradients of real and synthetic batches (``GradientMatcher``, metric "ours"),
step the images; unless last, train the network ``inner_loop`` epochs on the synthetic set }.
DSA additionally augments the real and synthetic images of each class with one shared seed before
matching (``ddfast.dsa_augment``, DC's ``align_corners=False``) and augments per image while
training the network.

Reference hyper-parameters (CIFAR-10): lr_img 0.1 (SGD, momentum 0.5), lr_net 0.01 (plain SGD),
batch_real 256 per class, batch_train 256, outer/inner loops by ipc (1: 1/1, 10: 10/50, 20: 20/25,
30: 30/20, 40: 40/15, 50: 50/10), 1000 iterations. Scaled to digits (≈126 training images per
class, 8×8): the same learning rates, outer loops and batches, a fifth of the inner-loop epochs
(ipc 10: 10 instead of 50), ConvNet width 32 depth 2, real init (DC's default is noise; real init
gets there in far fewer iterations), and 200 iterations at ipc 1, 20 at ipc 10.
"""
from __future__ import annotations

import torch

from ..data import Dataset, RealData
from ..ops.gradient_matcher import GradientMatcher
from ._common import DSA_STRATEGY, IterativeMethod, SyntheticSet, generator, train_epochs

DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def dc_loops(ipc: int):
    """DC's (outer_loop, inner_loop) for ``ipc``; other ipc values take the nearest listed one."""
    nearest = min(DC_LOOPS, key=lambda k: (abs(k - ipc), k))
    return DC_LOOPS[nearest]


def scaled_common(dataset: Dataset, ipc: int) -> dict:
    """Network and batch settings shared by the methods on small images (digits-sized)."""
    small = max(dataset.im_size) <= 16
    return {"net_width": 32 if small else 128, "net_depth": 2 if small else 3, "batch_real": 256, "init": "real"}


class DC(IterativeMethod):
    name = "dc"
    use_dsa = False

    @classmethod
    def default_hparams(cls, dataset: Dataset, ipc: int = 10) -> dict:
        outer, inner = dc_loops(ipc)
        if max(dataset.im_size) <= 16:  # small data on CPU: a fifth of DC's network-training epochs
            inner = max(1, inner // 5)
        hp = dict(scaled_common(dataset, ipc), lr_img=0.1, lr_net=0.01, batch_train=256, outer_loop=outer,
                  inner_loop=inner, metric="ours", iterations=200 if ipc <= 1 else 20, real_precision=None)
        hp["dsa_strategy"] = DSA_STRATEGY if cls.use_dsa else None
        hp["dsa_rng"] = "fast"
        return hp

    def step(self, iteration: int, real: RealData, syn: SyntheticSet) -> torch.Tensor:
        hp = self.hp
        net = self.new_network(iteration)
        opt_net = torch.optim.SGD(net.parameters(), lr=hp["lr_net"])
        matcher = GradientMatcher(net, metric=hp.get("metric", "ours"), real_precision=hp.get("real_precision"))
        strategy = hp.get("dsa_strategy")
        total = 0
        for ol in range(hp["outer_loop"]):
            x_real, y_real = self.real_batch(real, hp["batch_real"], iteration, ol)
            x_syn, y_syn = syn.images(), syn.labels
            x_real, x_syn = self.augment_pair(x_real, y_real, x_syn, y_syn, iteration, ol)
            loss = matcher(x_real, y_real, x_syn, y_syn)
            total = total + self.update(loss, syn, net, x_syn, y_syn, x_real, y_real)
            if ol == hp["outer_loop"] - 1:
                break
            images, labels = syn.images().detach(), syn.labels
            train_epochs(net, opt_net, images, labels, hp["inner_loop"], hp["batch_train"],
                         generator(self.seed, iteration, ol, "inner"), strategy)
        return total / hp["outer_loop"]


class DSA(DC):
    name = "dsa"
    use_dsa = True
