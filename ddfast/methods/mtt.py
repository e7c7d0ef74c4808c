"""MTT (Cazenavette et al., CVPR 2022) and TESLA (Cui et al., ICML 2023) on ``ddfast.TrajectoryMatcher``.

Experts (mtt-distillation ``buffer.py``): ``num_experts`` networks trained on the real training set
with SGD (lr_teacher 0.01, no momentum, no weight decay, batch 256, DSA per image), their flat
parameters saved after every epoch (``train_epochs`` + 1 vectors). They are trained on the fly the
first time and cached under ``$DDFAST_CACHE_DIR`` (default ``~/.cache/ddfast``)/experts, keyed by the
data's contents, the network and these settings.

One iteration (``distill.py``): pick an expert and a start epoch < ``max_start_epoch``; the student
starts at θ_start and takes ``syn_steps`` SGD steps of learnable size ``syn_lr`` on minibatches of the
synthetic set (DSA per step, mtt's ``align_corners=True``); loss = ‖θ_N − θ_{start+expert_epochs}‖² /
‖θ_start − θ_{start+expert_epochs}‖² (``ddfast.param_match``). The images (SGD lr_img, momentum 0.5)
and ``syn_lr`` (SGD lr_lr, momentum 0.5) are updated. MTT uses ``mode="exact"`` (the unrolled
gradient, memory independent of syn_steps); TESLA uses ``mode="tesla"`` (its constant-memory
approximation, documented in ``ddfast.ops.trajectory_matcher``).

Reference hyper-parameters (CIFAR-10, ipc 1 / 10): syn_steps 50 / 30, expert_epochs 2, max_start_epoch
2 / 20, lr_img 1000, lr_lr 1e-7 / 1e-5, lr_teacher 0.01, 50 expert epochs, 100 experts, 5000
iterations. Scaled to digits (8×8, ~1260 training images): 5 experts × 15 epochs, syn_steps 20,
expert_epochs 2, max_start_epoch 2 / 10, lr_img 100 (digits' pixel gradients are larger than
ZCA-whitened CIFAR's), lr_lr 1e-7 / 1e-5, 100 iterations.
"""
from __future__ import annotations

from typing import List

import torch
from torch.nn.utils import parameters_to_vector

from ..data import Dataset, RealData
from ._common import (DSA_STRATEGY, IterativeMethod, SyntheticSet, cache_dir, data_fingerprint, derive_seed,
                      generator, train_epochs)
from .dc import scaled_common


def train_experts(method: IterativeMethod, real: RealData, *, progress: bool = False) -> List[torch.Tensor]:
    """The cached expert trajectories: a list of (train_epochs + 1, P) tensors."""
    hp = method.hp
    keys = (method.dataset.name, data_fingerprint(real.x, real.y), method.model, hp.get("net_width"),
            hp.get("net_depth"), hp["num_experts"], hp["expert_train_epochs"], hp["lr_teacher"], hp["batch_train"],
            hp.get("dsa_strategy"), str(real.x.dtype))
    path = cache_dir("experts") / f"experts-{derive_seed(method.seed, *keys):016x}.pt"
    if path.exists():
        return [t.to(method.device) for t in torch.load(path, map_location="cpu")]
    trajectories = []
    for e in range(hp["num_experts"]):
        net = method.new_network("expert", e)
        opt = torch.optim.SGD(net.parameters(), lr=hp["lr_teacher"])
        snapshots = [parameters_to_vector(net.parameters()).detach().clone()]
        train_epochs(net, opt, real.x, real.y, hp["expert_train_epochs"], hp["batch_train"],
                     generator(method.seed, "expert", e), hp.get("dsa_strategy"), align_corners=True,
                     after_epoch=lambda _e: snapshots.append(parameters_to_vector(net.parameters()).detach().clone()))
        trajectories.append(torch.stack(snapshots).cpu())
    torch.save(trajectories, path)
    return [t.to(method.device) for t in trajectories]


class MTT(IterativeMethod):
    name = "mtt"
    mode = "exact"

    @classmethod
    def default_hparams(cls, dataset: Dataset, ipc: int = 10) -> dict:
        return dict(scaled_common(dataset, ipc), lr_img=100.0, lr_lr=1e-7 if ipc <= 1 else 1e-5, lr_teacher=0.01,
                    syn_steps=20, expert_epochs=2, max_start_epoch=2 if ipc <= 1 else 10, num_experts=5,
                    expert_train_epochs=15, batch_train=256, batch_syn=None, dsa_strategy=DSA_STRATEGY,
                    iterations=100)

    def init_synthetic(self, real: RealData, ipc: int, *, low_rank=None) -> SyntheticSet:
        syn = super().init_synthetic(real, ipc, low_rank=low_rank)
        syn.lr = torch.nn.Parameter(torch.tensor(float(self.hp["lr_teacher"]), dtype=real.x.dtype,
                                                 device=self.device))
        return syn

    def _setup(self, real: RealData, syn: SyntheticSet) -> None:
        from ..ops.trajectory_matcher import TrajectoryMatcher

        hp = self.hp
        self.experts = train_experts(self, real)
        self.net = self.new_network("student")
        self.net.train()
        self.matcher = TrajectoryMatcher(self.net, syn_steps=hp["syn_steps"], batch_syn=hp.get("batch_syn"),
                                         mode=self.mode, dsa_strategy=hp.get("dsa_strategy"), align_corners=True)
        self.opt_lr = torch.optim.SGD([syn.lr], lr=hp["lr_lr"], momentum=0.5)

    def step(self, iteration: int, real: RealData, syn: SyntheticSet) -> torch.Tensor:
        if not hasattr(self, "matcher"):
            self._setup(real, syn)
        hp = self.hp
        g = generator(self.seed, iteration, "trajectory")
        expert = self.experts[int(torch.randint(len(self.experts), (1,), generator=g))]
        last_start = min(hp["max_start_epoch"], expert.shape[0] - 1 - hp["expert_epochs"])
        start_epoch = int(torch.randint(max(last_start, 1), (1,), generator=g))
        start, target = expert[start_epoch], expert[start_epoch + hp["expert_epochs"]]
        x_syn, y_syn = syn.images(), syn.labels
        loss = self.matcher(x_syn, y_syn, syn.lr, start, target, generator=generator(self.seed, iteration, "steps"))
        net = None
        if self.addons:  # MIM4DD taps the network at the trajectory's start
            torch.nn.utils.vector_to_parameters(start, self.net.parameters())
            net = self.net
            x_real, y_real = self.real_batch(real, 256, iteration)
        else:
            x_real = y_real = None
        return self.update(loss, syn, net, x_syn, y_syn, x_real, y_real, extra_optimizers=[self.opt_lr])


class TESLA(MTT):
    name = "tesla"
    mode = "tesla"
