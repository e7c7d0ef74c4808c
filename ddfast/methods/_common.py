"""Pieces every method shares: seeded generators, the synthetic set, the base class, add-ons."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Dataset, RealData
from ..models import get_network

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # DC/DSA/DM/MTT's default strategy


# --- randomness: one generator per (seed, keys) ---------------------------------------------------

def merge_hparams(defaults: Dict[str, Any], overrides: Optional[dict], method: str) -> Dict[str, Any]:
    """The method's defaults updated with the caller's overrides; an unknown key is a ValueError."""
    unknown = set(overrides or {}) - set(defaults)
    if unknown:
        raise ValueError(f"hparams: unknown key(s) {sorted(unknown)} for {method}; known: {sorted(defaults)}")
    return {**defaults, **(overrides or {})}


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (ints/strings): the same keys give the same seed, on
    any machine, whatever else was drawn before (so class order or splitting cannot change it)."""
    text = repr((int(seed),) + tuple(keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *keys) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def seeded_network(build: Callable[[], nn.Module], seed: int, device) -> nn.Module:
    """``build()`` under a forked global RNG seeded with ``seed`` (module init uses the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build()
    return net.to(device)


# --- the synthetic set --------------------------------------------------------------------------

class SyntheticSet(nn.Module):
    """Learnable synthetic images (a tensor parameter, or ``LowRankImages`` factors) and their labels.

    ``images()`` is the (N, C, H, W) tensor the methods train on; ``image_parameters()`` what the
    image optimiser updates; ``labels``: (N,) class ids (or (N, C) soft labels); ``lr``: a learnable
    step size (MTT/TESLA), None otherwise.
    """

    def __init__(self, images, labels: torch.Tensor):
        super().__init__()
        from ..ops.low_rank_images import LowRankImages

        if isinstance(images, LowRankImages):
            self.low_rank = images
            self.pixels = None
        else:
            self.low_rank = None
            self.pixels = nn.Parameter(images.detach().clone())
        self.register_buffer("labels", labels.detach().clone())
        self.lr: Optional[nn.Parameter] = None

    def images(self) -> torch.Tensor:
        return self.low_rank() if self.low_rank is not None else self.pixels

    def image_parameters(self) -> List[nn.Parameter]:
        return list(self.low_rank.parameters()) if self.low_rank is not None else [self.pixels]

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class DistillOutput:
    """What a distillation returns: images, labels (hard (N,) or soft (N, C)), the loss per iteration."""
    images: torch.Tensor
    labels: torch.Tensor
    losses: List[float] = field(default_factory=list)
    soft_label_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def initial_images(real: RealData, ipc: int, init: str, seed: int):
    """(images, labels): ``ipc`` per class, real images ("real") or N(0, 1) noise ("noise"); class c
    drawn from its own generator."""
    if init not in ("real", "noise"):
        raise ValueError(f"init must be 'real' or 'noise', got {init!r}")
    xs, ys = [], []
    shape = tuple(real.x.shape[1:])
    for c in range(real.num_classes):
        g = generator(seed, "init", c)
        if init == "real":
            x = real.get_images(c, ipc, g)
            if len(x) < ipc:  # a class smaller than ipc: repeat its images
                x = x.repeat((ipc + len(x) - 1) // len(x), 1, 1, 1)[:ipc]
        else:
            x = torch.randn((ipc,) + shape, generator=g).to(real.x)
        xs.append(x)
        ys.append(torch.full((ipc,), c, dtype=torch.long, device=real.x.device))
    return torch.cat(xs), torch.cat(ys)


# --- DSA draws ------------------------------------------------------------------------------------

def class_seeds(seed: int, num_classes: int, *keys) -> List[int]:
    """One DSA seed per class (the class's real and synthetic batch share it, as DSA's Siamese rule)."""
    return [int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator(seed, *keys, c, "dsa"))) for c in
            range(num_classes)]


def augment_classes(x: torch.Tensor, y: torch.Tensor, strategy: str, seeds: Sequence[int], *,
                    align_corners: bool = False, rng: str = "fast") -> torch.Tensor:
    """DSA with one transform per class (``seeds[c]`` for the images of class c): DSA's Siamese rule
    when the real and synthetic batches get the same seeds. rng "fast" draws all classes' parameters
    with one generator call (seeded from the seeds); "reference" replays DatasetCondensation's
    per-class generator calls (bitwise its DiffAugment, but it re-seeds torch's global generator
    several times per class, which costs milliseconds each)."""
    from ..ops.dsa import dsa_augment

    return dsa_augment(x, y, strategy, list(seeds), align_corners=align_corners, rng=rng)


def augment_per_image(x: torch.Tensor, strategy: str, gen: torch.Generator, *, align_corners: bool = False
                      ) -> torch.Tensor:
    """DSA with an independent draw per image (what DC's ``seed=-1`` training calls do), reproducible:
    each image is its own group, the seeds come from ``gen``, one "fast" generator call draws all."""
    from ..ops.dsa import dsa_augment

    seeds = torch.randint(0, 2 ** 31 - 1, (x.shape[0],), generator=gen).tolist()
    return dsa_augment(x, torch.arange(x.shape[0]), strategy, seeds, align_corners=align_corners, rng="fast")


# --- network training between distillation steps (DC/CAFE inner loop, MTT experts) ----------------

def train_epochs(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
                 batch_size: int, gen: torch.Generator, dsa_strategy: Optional[str] = None,
                 align_corners: bool = False, after_epoch: Optional[Callable[[int], None]] = None) -> None:
    """``epochs`` shuffled passes of SGD on (x, y) (DC's ``epoch('train', ...)``), DSA per image if asked."""
    net.train()
    for e in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(x.device)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            xb = x[idx]
            if dsa_strategy:
                xb = augment_per_image(xb, dsa_strategy, gen, align_corners=align_corners)
            opt.zero_grad()
            F.cross_entropy(net(xb), y[idx]).backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(e)


# --- add-ons ------------------------------------------------------------------------------------

class MIM4DDAddon:
    """MIM4DD's contrastive term (``ddfast.MIM4DD`` / ``supcon_nce``) added with weight ``lam`` to a
    method's loss: syn vs real features of the method's current network (its ``features`` output),
    projected by heads that persist across iterations and are trained by their own Adam optimiser."""

    def __init__(self, lam: float, feature_dim: int, *, proj_dim: int = 128, temperature: float = 0.1,
                 lr: float = 1e-3, seed: int = 0, device="cpu"):
        if not lam > 0:
            raise ValueError(f"mim4dd weight must be > 0, got {lam}")
        self.lam = float(lam)
        self.temperature = temperature
        self.feature_dim = feature_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "mim4dd-heads"))
            self.syn_heads = nn.ModuleList([nn.Linear(feature_dim, proj_dim)]).to(device)
            self.real_heads = nn.ModuleList([nn.Linear(feature_dim, proj_dim)]).to(device)
        self.opt = torch.optim.Adam(list(self.syn_heads.parameters()) + list(self.real_heads.parameters()), lr=lr)

    def term(self, net: nn.Module, x_syn, y_syn, x_real, y_real) -> torch.Tensor:
        from ..ops.mim4dd import MIM4DD

        mim = MIM4DD(net, ["features"], [self.feature_dim], proj_dim=self.syn_heads[0].out_features,
                     temperature=self.temperature)
        mim.syn_heads, mim.real_heads = self.syn_heads, self.real_heads  # the persistent heads
        try:
            return self.lam * mim.loss(x_syn, y_syn, x_real, y_real)
        finally:
            mim.remove_hooks()

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        self.opt.step()


# --- the base class of iterative methods --------------------------------------------------------

class IterativeMethod:
    """Base of the iterative methods (contract in ``ddfast.methods``): seeding, networks, the image
    optimiser and ``update`` (loss + add-on terms → backward → optimiser steps)."""

    name = "base"
    kind = "iterative"

    def __init__(self, dataset: Dataset, hparams: Optional[dict] = None, *, seed: int = 0, device="cpu",
                 model: str = "convnet", addons: Sequence = ()):
        self.dataset = dataset
        self.hp = dict(hparams or {})
        self.seed = int(seed)
        self.device = torch.device(device)
        self.model = model
        self.addons = list(addons)
        self.num_classes = dataset.num_classes
        self._opt_img = None

    @classmethod
    def default_hparams(cls, dataset: Dataset, ipc: int = 10) -> dict:
        raise NotImplementedError

    # networks
    def build_network(self) -> nn.Module:
        ds = self.dataset
        return get_network(self.model, ds.channel, ds.num_classes, ds.im_size, width=self.hp.get("net_width"),
                           depth=self.hp.get("net_depth"))

    def new_network(self, *keys) -> nn.Module:
        """A fresh network initialised from ``(seed, *keys)``."""
        net = seeded_network(self.build_network, derive_seed(self.seed, "net", *keys), self.device)
        return net.to(self.dataset.x_train.dtype)

    def feature_dim(self) -> int:
        net = self.build_network().to(self.dataset.x_train.dtype)
        with torch.no_grad():
            return net.features(torch.zeros((1, self.dataset.channel) + tuple(self.dataset.im_size),
                                            dtype=self.dataset.x_train.dtype)).flatten(1).shape[1]

    # the synthetic set
    def init_synthetic(self, real: RealData, ipc: int, *, low_rank: Optional[int] = None) -> SyntheticSet:
        from ..ops.low_rank_images import LowRankImages, low_rank_budget_ipc

        init = self.hp.get("init", "real")
        if low_rank is None:
            x, y = initial_images(real, ipc, init, self.seed)
            return SyntheticSet(x, y).to(self.device)
        h, w = self.dataset.im_size
        n_per_class = low_rank_budget_ipc(ipc, h, w, low_rank)
        x, y = initial_images(real, n_per_class, init, self.seed)
        return SyntheticSet(LowRankImages.from_images(x, rank=low_rank), y).to(self.device)

    def image_optimizer(self, syn: SyntheticSet) -> torch.optim.Optimizer:
        if self._opt_img is None:
            self._opt_img = torch.optim.SGD(syn.image_parameters(), lr=self.hp["lr_img"],
                                            momentum=self.hp.get("momentum_img", 0.5))
        return self._opt_img

    def update(self, loss: torch.Tensor, syn: SyntheticSet, net: Optional[nn.Module], x_syn, y_syn, x_real, y_real,
               extra_optimizers: Sequence[torch.optim.Optimizer] = ()) -> torch.Tensor:
        """Add the add-on terms, back-propagate, step the image optimiser (and ``extra_optimizers``)."""
        total = loss
        for addon in self.addons:
            total = total + addon.term(net, x_syn, y_syn, x_real, y_real)
        opts = [self.image_optimizer(syn)] + list(extra_optimizers)
        for opt in opts:
            opt.zero_grad()
        for addon in self.addons:
            addon.zero_grad()
        total.backward()
        for opt in opts:
            opt.step()
        for addon in self.addons:
            addon.step()
        return total.detach()

    def augment_pair(self, x_real, y_real, x_syn, y_syn, *keys):
        """DSA (``hp["dsa_strategy"]``; unchanged without one) of a real and a synthetic batch, one
        seed per class shared by both sides (DSA's Siamese rule), drawn from (seed, *keys); the real
        side carries no graph."""
        strategy = self.hp.get("dsa_strategy")
        if not strategy:
            return x_real, x_syn
        seeds = class_seeds(self.seed, self.num_classes, *keys)
        rng = self.hp.get("dsa_rng", "fast")
        with torch.no_grad():
            x_real = augment_classes(x_real, y_real, strategy, seeds, rng=rng)
        return x_real, augment_classes(x_syn, y_syn, strategy, seeds, rng=rng)

    def real_batch(self, real: RealData, n_per_class: int, *keys):
        """A real batch of every class, class c drawn with ``generator(seed, *keys, c, "real")``."""
        return real.get_batch(n_per_class, lambda c: generator(self.seed, *keys, c, "real"))

    def step(self, iteration: int, real: RealData, syn: SyntheticSet) -> torch.Tensor:
        raise NotImplementedError


# --- the on-disk cache (expert trajectories, baselines) -------------------------------------------

def cache_dir(*parts: str):
    """``$DDFAST_CACHE_DIR`` (default ``~/.cache/ddfast``) / parts, created."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("DDFAST_CACHE_DIR") or Path.home() / ".cache" / "ddfast")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of tensors' contents (cache keys change when the data does)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def cosine_lr(base_lr: float, step: int, steps: int) -> float:
    """SRe2L's ``lr_cosine_policy`` without warm-up (= ``CosineAnnealingLR(T_max=steps)`` at ``step``)."""
    return 0.5 * (1 + math.cos(math.pi * step / steps)) * base_lr
