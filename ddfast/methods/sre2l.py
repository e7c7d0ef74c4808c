"""SRe2L — Squeeze, Recover, Relabel (Yin, Xing & Shen, NeurIPS 2023), built on ``BNStatMatcher``.

* **squeeze**: train a teacher with BatchNorm on the real training set (``squeeze``; cached under
  ``$DDFAST_CACHE_DIR`` or ``~/.cache/ddfast``, keyed by the data, architecture and recipe).
* **recover**: one batch holds one image of every class; for ``iterations`` steps the batch goes
  through one random-resized crop + flip (the same for the whole batch, as torchvision transforms
  on a batch tensor) and a random roll by up to ``jitter`` pixels, and the images minimise

      CE(teacher(x_jit), y) + r_bn · [ first_bn_multiplier · R_1 + Σ_{l>1} R_l ],
      R_l = ‖μ_l(x_jit) − running_mean_l‖₂ + ‖σ²_l(x_jit) − running_var_l‖₂

  over every BatchNorm of the teacher (eval mode), with Adam(betas 0.5, 0.9), a cosine learning
  rate, and a clip to the data range after every step. ``ipc`` batches are recovered independently.
* **relabel**: soft labels from the teacher, on the fly or stored per crop (``ddfast.methods.relabel``).

Paper defaults (CIFAR recipe): lr 0.25, r_bn 0.01, first_bn_multiplier 10, 1000 iterations, jitter 4,
N(0, 1) initialisation (``init="noise"``; ``init="real"`` starts from the runner's random real subset,
``init="herding"`` from real images picked per class by herding in the teacher's embedding).
On images of 16 px or less (digits) the CPU defaults recover for 200 iterations with a 1-pixel roll
and crops of at least half the image, from the herding picks at lr 0.01 below ipc 10 and from the
random real subset at lr 0.003 from ipc 10 on (``small_image_defaults`` says why, with the
measurements). Evaluation: ``DistillOutput.soft_label_fn`` is the teacher's
``softmax(logits / temperature)`` on every augmented minibatch (``ddfast.evaluate``).
"""
from __future__ import annotations

import hashlib
import math
import os
import random
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.bn_stat import BNStatMatcher
from . import relabel
from ._common import DSA_STRATEGY, cosine_lr

# fuse_batchnorm: BNStatMatcher(fuse_batchnorm=True), each teacher BatchNorm and its loss in one pass
# each way (bn_eval_stat); the same numbers up to fp32 rounding, off by default until a GPU run measures it
DEFAULTS = dict(iterations=1000, lr=0.25, r_bn=0.01, first_bn_multiplier=10.0, jitter=4, fuse_batchnorm=False)


# --- squeeze ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("DDFAST_CACHE_DIR") or Path.home() / ".cache" / "ddfast")


def default_crop_scale(height: int, width: int) -> Tuple[float, float]:
    """SRe2L's (0.08, 1) at 32 px and above; at small sizes (digits, 8×8) such crops are a couple of
    pixels, so the lower bound is raised to 0.5."""
    return (0.08, 1.0) if min(height, width) >= 32 else (0.5, 1.0)


def build_teacher(arch: str, channel: int, num_classes: int, im_size, width: Optional[int] = None,
                  depth: Optional[int] = None) -> nn.Module:
    from ..models import get_network, has_batchnorm

    net = get_network(arch, channel, num_classes, im_size, width=width, depth=depth)
    if not has_batchnorm(net):
        raise ValueError(f"arch {arch!r} has no BatchNorm: SRe2L recovers from BatchNorm statistics")
    return net


def _data_key(*tensors: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def squeeze(x_train: torch.Tensor, y_train: torch.Tensor, num_classes: int, *, arch: str = "convnetbn",
            width: Optional[int] = 64, depth: Optional[int] = 2, epochs: int = 30, batch_size: int = 64,
            lr: float = 1e-3, crop_scale: Optional[Tuple[float, float]] = None, flip: bool = True, seed: int = 0,
            use_cache: bool = True, verbose: bool = False) -> nn.Module:
    """Train (or load from the cache) a BatchNorm teacher on the real data; returned in eval mode
    with frozen parameters. Recipe: AdamW with a one-cycle rate, random-resized crop + flip, cross-entropy."""
    n, channel, h, w = x_train.shape
    crop_scale = tuple(crop_scale or default_crop_scale(h, w))
    recipe = dict(arch=arch, width=width, depth=depth, epochs=epochs, batch_size=batch_size, lr=lr,
                  crop_scale=crop_scale, flip=flip, seed=seed, num_classes=num_classes)
    key = hashlib.sha1((_data_key(x_train, y_train) + repr(sorted(recipe.items()))).encode()).hexdigest()[:20]
    path = cache_dir() / f"teacher-{arch}-{key}.pt"
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        net = build_teacher(arch, channel, num_classes, (h, w), width, depth).to(x_train.device)
    if use_cache and path.exists():
        net.load_state_dict(torch.load(path, map_location=x_train.device))
        if verbose:
            print(f"squeeze: loaded teacher {path}")
    else:
        _train_teacher(net, x_train, y_train, epochs, batch_size, lr, crop_scale, flip, seed)
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(net.state_dict(), tmp)
            os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _train_teacher(net, x, y, epochs, batch_size, lr, crop_scale, flip, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr * 10, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb = relabel.random_crop_flip(x[idx], scale=crop_scale, flip=flip, generator=g)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


# --- recover ------------------------------------------------------------------------------------

def recover_loss(matcher: BNStatMatcher, x_jit: torch.Tensor, targets: torch.Tensor,
                 r_bn: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, bn): ``CE(teacher(x_jit), targets) + r_bn · BN`` for one recover iteration."""
    out, bn = matcher(x_jit)
    ce = F.cross_entropy(out, targets)
    return ce + r_bn * bn, ce, bn


def jitter_batch(x: torch.Tensor, *, crop_scale, flip: bool, jitter: int, rng: random.Random,
                 generator: torch.Generator) -> torch.Tensor:
    """SRe2L's per-iteration view: one random-resized crop + flip for the batch, then a roll."""
    x = relabel.random_crop_flip(x, scale=crop_scale, flip=flip, same_for_batch=True, generator=generator)
    if jitter > 0:
        x = torch.roll(x, shifts=(rng.randint(0, jitter), rng.randint(0, jitter)), dims=(2, 3))
    return x


def recover_batch(teacher: nn.Module, targets: torch.Tensor, init: torch.Tensor, *, iterations: int = 1000,
                  lr: float = 0.25, r_bn: float = 0.01, first_bn_multiplier: float = 10.0, jitter: int = 4,
                  crop_scale: Optional[Tuple[float, float]] = None, flip: bool = True,
                  clip_range: Optional[Tuple[float, float]] = None, seed: int = 0,
                  matcher: Optional[BNStatMatcher] = None, fuse_batchnorm: bool = False) -> Tuple[torch.Tensor, list]:
    """Optimise one batch (``init``: its starting images, one per entry of ``targets``) against the
    teacher; returns the images and the loss per iteration."""
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if init.shape[0] != targets.shape[0]:
        raise ValueError(f"init has {init.shape[0]} images but targets has {targets.shape[0]} labels")
    crop_scale = tuple(crop_scale or default_crop_scale(*init.shape[-2:]))
    x = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    own = matcher is None
    matcher = matcher or BNStatMatcher(teacher, first_layer_weight=first_bn_multiplier, fuse_batchnorm=fuse_batchnorm)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    losses = []
    try:
        for it in range(iterations):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, it, iterations)
            x_jit = jitter_batch(x, crop_scale=crop_scale, flip=flip, jitter=jitter, rng=rng, generator=gen)
            loss, _, _ = recover_loss(matcher, x_jit, targets, r_bn)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if clip_range is not None:
                with torch.no_grad():
                    x.clamp_(*clip_range)
            losses.append(loss.item())
    finally:
        if own:
            matcher.remove()
    return x.detach(), losses


def batch_seed(seed: int, ipc_id: int) -> int:
    """Each ipc batch draws from its own stream, so batches do not depend on each other's order."""
    return (seed * 1_000_003 + ipc_id * 7919) % (2 ** 31)


def real_init(x_real: torch.Tensor, y_real: torch.Tensor, classes: Sequence[int], ipc: int,
              seed: int) -> torch.Tensor:
    """(ipc, len(classes), C, H, W): batch i holds the i-th image of every class of
    ``ddfast.evaluate.random_subset(x, y, ipc, seed)`` — the very random real subset the runner
    evaluates as the baseline, so "recovered from real" and "random real" are a paired comparison."""
    from ..evaluate import random_subset

    counts = torch.bincount(y_real.cpu(), minlength=max(classes) + 1)
    for c in classes:
        if counts[c] < ipc:
            raise ValueError(f"class {c} has {int(counts[c])} real images, fewer than ipc={ipc}")
    x, y = random_subset(x_real, y_real, ipc, seed)
    per_class = torch.stack([x[y == c] for c in classes])  # (classes, ipc, ...)
    return per_class.transpose(0, 1).contiguous()


@torch.no_grad()
def herding_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding (Welling 2009, the coreset baseline of DC/DM): indices of ``k`` rows whose
    running mean stays closest to the mean of all rows; each pick minimises
    ‖μ − (Σ chosen + f_j) / (t + 1)‖²."""
    mu = features.mean(0)
    total = torch.zeros_like(mu)
    taken = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    order = []
    for t in range(k):
        dist = ((mu - (total + features) / (t + 1)) ** 2).sum(1).masked_fill(taken, float("inf"))
        j = int(dist.argmin())
        order.append(j)
        taken[j] = True
        total = total + features[j]
    return torch.tensor(order, dtype=torch.long, device=features.device)


@torch.no_grad()
def herding_init(teacher: nn.Module, x_real: torch.Tensor, y_real: torch.Tensor, classes: Sequence[int],
                 ipc: int) -> torch.Tensor:
    """(ipc, len(classes), C, H, W) real images chosen per class by herding in the teacher's embedding
    (``ddfast.models.embed``, eval mode): batch i holds every class's i-th pick."""
    from ..models import embed

    was_training = teacher.training
    teacher.eval()
    try:
        per_class = []
        for c in classes:
            idx = (y_real == c).nonzero().flatten()
            if idx.numel() < ipc:
                raise ValueError(f"class {c} has {idx.numel()} real images, fewer than ipc={ipc}")
            feats = torch.cat([embed(teacher, x_real[idx[i:i + 512]]) for i in range(0, idx.numel(), 512)])
            per_class.append(x_real[idx[herding_order(feats.double(), ipc)]])
    finally:
        teacher.train(was_training)
    return torch.stack(per_class).transpose(0, 1).contiguous()


INITS = ("noise", "real", "herding")


def initial_images(init: str, teacher: nn.Module, x_real, y_real, classes: Sequence[int], ipc: int,
                   seed: int) -> Optional[torch.Tensor]:
    """The starting batches (ipc, classes, ...) for ``init`` "real" or "herding"; None for "noise"."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "real":
        return real_init(x_real, y_real, classes, ipc, seed)
    if init == "herding":
        return herding_init(teacher, x_real, y_real, classes, ipc)
    return None


def recover(teacher: nn.Module, num_classes: int, ipc: int, image_shape, *, init: str = "noise",
            x_real: Optional[torch.Tensor] = None, y_real: Optional[torch.Tensor] = None, seed: int = 0,
            teacher_for_batch=None, progress: bool = False, **kw) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Recover ``ipc`` batches of one image per class. ``init``: "noise" (SRe2L: N(0, 1)), "real"
    (the runner's random real subset) or "herding" (real images chosen by herding in the teacher's
    embedding, ``herding_init``). ``teacher_for_batch(ipc_id, x_init, y)``, if given, returns the
    model to recover batch ``ipc_id`` against (DWA's perturbed teacher). Returns (images, labels, log)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    device = next(teacher.parameters()).device
    targets = torch.arange(num_classes, device=device)
    inits = initial_images(init, teacher, x_real, y_real, range(num_classes), ipc, seed)
    images, log, curves = [], {"loss_first": [], "loss_last": []}, []
    for ipc_id in range(ipc):
        s = batch_seed(seed, ipc_id)
        if inits is not None:
            x0 = inits[ipc_id]
        else:
            x0 = torch.randn((num_classes, *image_shape), generator=torch.Generator().manual_seed(s)).to(device)
        model = teacher_for_batch(ipc_id, x0, targets) if teacher_for_batch else teacher
        x, losses = recover_batch(model, targets, x0, seed=s, **kw)
        if inits is not None:  # how far recover moved the real images (relative L2)
            log.setdefault("relative_change", []).append(float((x - x0).norm() / x0.norm().clamp_min(1e-12)))
        images.append(x)
        curves.append(losses)
        if losses:
            log["loss_first"].append(losses[0])
            log["loss_last"].append(losses[-1])
        if progress:
            print(f"recover batch {ipc_id + 1}/{ipc}: loss {losses[0]:.4g} -> {losses[-1]:.4g}" if losses else "")
    log["curve"] = [sum(v) / len(v) for v in zip(*curves)]  # mean loss per iteration over the batches
    # class-major order (all images of class 0, then class 1, ...), like the other methods' sets
    x_syn = torch.stack(images, 1).reshape(num_classes * ipc, *image_shape)
    y_syn = targets.repeat_interleave(ipc)
    return x_syn, y_syn, log


# --- diversity ----------------------------------------------------------------------------------

@torch.no_grad()
def feature_diversity(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Mean pairwise L2 distance of penultimate features: over all pairs, and within each class
    (averaged over classes with two or more images) — the spread DWA aims to increase."""
    from ..models import embed

    was = model.training
    model.eval()
    f = embed(model, images).flatten(1).double()
    model.train(was)
    d = torch.cdist(f, f)
    n = len(f)
    overall = (d.sum() / (n * (n - 1))).item() if n > 1 else float("nan")
    within = []
    for c in labels.unique():
        m = labels == c
        k = int(m.sum())
        if k > 1:
            within.append((d[m][:, m].sum() / (k * (k - 1))).item())
    return {"pairwise_all": overall, "pairwise_within_class": sum(within) / len(within) if within else float("nan")}


# --- the pipeline method (registry: "sre2l") ------------------------------------------------------

def pixel_clip_range(dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    """SRe2L's clip: pixels in [0, 1] before normalisation, per channel, as (1, C, 1, 1) tensors."""
    mean = dataset.mean.to(dataset.x_train).view(1, -1, 1, 1)
    std = dataset.std.to(dataset.x_train).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


# ipc from which the small-image defaults recover gently from the random real subset instead of the herding picks
LARGE_IPC = 10


def small_image_defaults(dataset, ipc: int = 1) -> Dict:
    """CPU defaults on digits-sized data (≤ 16 px): a short recover (200 iterations) from real images,
    and the roll scaled to the image (SRe2L: 4 px at 32 px). Measured on digits (README, 3 networks):

    * ipc < 10: the herding picks in the teacher's embedding, lr 0.01. At ipc 1, from N(0, 1) noise (the
      paper's init) students reach 33 %, far below a random real subset (75.6 %); from the herding picks,
      lr 0.05 / 0.02 / 0.01 give 75.9 / 81.2 / 82.6 % against 82.3 % for the picks unrecovered — on 8×8
      digits a strong recover moves images away from what helps a student.
    * ipc ≥ 10: the random real subset (DWA's init), lr 0.003. At ipc 10 the herding picks (93.8 %) do
      not beat random subsets (93.8 / 94.0 / 94.5 % for seeds 0 / 1 / 2), recover at lr 0.01 loses
      about 0.5, and lr 0.003 from the random subset gives 94.3 / 94.6 / 94.4 % (chosen on seed 0,
      checked on seeds 1 and 2). ipc 2–9 is not measured."""
    if min(dataset.im_size) > 16:
        return {}
    jitter = max(1, round(4 * min(dataset.im_size) / 32))
    if ipc >= LARGE_IPC:
        return dict(iterations=200, lr=0.003, init="real", jitter=jitter)
    return dict(iterations=200, lr=0.01, init="herding", jitter=jitter)


def teacher_hparams(dataset) -> Dict:
    small = min(dataset.im_size) <= 16
    return dict(teacher_arch="convnetbn", teacher_width=64 if small else 128, teacher_depth=2 if small else 3,
                squeeze_epochs=30, squeeze_lr=1e-3, crop_scale=default_crop_scale(*dataset.im_size), flip=True,
                temperature=4.0, relabel_topk=5, relabel_epochs=0, cache=True,
                # the runner evaluates with DSA when this is set: relabelled augmented batches, as SRe2L
                dsa_strategy=DSA_STRATEGY)


def squeeze_for(dataset, hp: Dict, seed: int, *, arch=None, width=None, depth=None, progress=False) -> nn.Module:
    return squeeze(dataset.x_train, dataset.y_train, dataset.num_classes, arch=arch or hp["teacher_arch"],
                   width=width or hp["teacher_width"], depth=depth or hp["teacher_depth"],
                   epochs=hp["squeeze_epochs"], lr=hp["squeeze_lr"], crop_scale=hp["crop_scale"], flip=hp["flip"],
                   seed=seed, use_cache=bool(hp["cache"]), verbose=progress)


def relabel_outputs(teachers, images: torch.Tensor, hp: Dict, seed: int):
    """(soft_label_fn, storage report[, FKD labels]) for the relabel stage."""
    teachers = teachers if isinstance(teachers, (list, tuple)) else [teachers]
    fn = relabel.teacher_soft_label_fn(teachers, hp["temperature"])
    report = {"online_teacher_bytes": sum(relabel.parameter_bytes(t) for t in teachers), "online_label_bytes": 0}
    stored = None
    if hp.get("relabel_epochs", 0) > 0:
        stored = relabel.generate_fkd_labels(teachers, images, epochs=hp["relabel_epochs"], k=hp["relabel_topk"],
                                             temperature=hp["temperature"], scale=hp["crop_scale"], flip=hp["flip"],
                                             seed=seed)
        report["stored_topk_label_bytes"] = stored.nbytes()
        report["stored_topk_epochs"] = stored.epochs
    return fn, report, stored


class SRe2L:
    """``ddfast distill --method sre2l``: squeeze → recover (one batch per ipc slot) → relabel."""

    name = "sre2l"
    kind = "pipeline"

    @classmethod
    def default_hparams(cls, dataset, ipc: int = 10) -> Dict:
        hp = dict(DEFAULTS, init="noise")
        hp.update(teacher_hparams(dataset))
        hp.update(small_image_defaults(dataset, ipc))
        return hp

    @classmethod
    def run(cls, dataset, ipc: int, *, hparams: Optional[Dict] = None, seed: int = 0, device="cpu",
            progress: bool = True):
        """The whole pipeline. ``extra`` (JSON-safe): recover losses, label storage, diversity."""
        from ._common import DistillOutput, merge_hparams

        hp = merge_hparams(cls.default_hparams(dataset, ipc), hparams, cls.name)
        dataset = dataset.to(device)
        teacher = squeeze_for(dataset, hp, seed, progress=progress)
        x, y, log = recover(teacher, dataset.num_classes, ipc, tuple(dataset.x_train.shape[1:]), init=hp["init"],
                            x_real=dataset.x_train, y_real=dataset.y_train, seed=seed,
                            teacher_for_batch=cls.teacher_for_batch(teacher, hp, dataset, seed), progress=progress,
                            **recover_kwargs(hp, dataset))
        fn, report, _ = relabel_outputs(teacher, x, hp, seed)
        extra = {"recover": {k: v for k, v in log.items() if k != "curve"}, "label_storage": report,
                 "diversity": feature_diversity(teacher, x, y)}
        return DistillOutput(x, y, losses=log.pop("curve"), soft_label_fn=fn, extra=extra)

    @classmethod
    def teacher_for_batch(cls, teacher, hp, dataset, seed):
        return None  # SRe2L: every batch is recovered against the same teacher


def recover_kwargs(hp: Dict, dataset) -> Dict:
    return dict(iterations=hp["iterations"], lr=hp["lr"], r_bn=hp["r_bn"],
                first_bn_multiplier=hp["first_bn_multiplier"], jitter=hp["jitter"], crop_scale=hp["crop_scale"],
                flip=hp["flip"], clip_range=pixel_clip_range(dataset), fuse_batchnorm=hp["fuse_batchnorm"])
