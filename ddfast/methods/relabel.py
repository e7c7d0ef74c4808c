"""Relabel: soft labels from a teacher for a synthetic set (SRe2L / FKD), and the crops they belong to.

SRe2L trains students on its recovered images with soft labels from the squeezed teacher, one soft
label per random-resized crop (FKD, Shen & Xing 2022). Two ways to supply them:

* **on the fly**: the teacher labels every augmented batch while the student trains
  (``teacher_soft_label_fn``; plugs into ``ddfast.evaluate(..., soft_label_fn=...)``). Label
  storage 0 bytes, but the teacher must be kept (its parameter bytes) and run every step.
* **stored** (``FKDSoftLabels``): for every epoch and image, the crop box, the flip bit and the
  teacher's top-k probabilities (fp16) with their class indices are generated once and saved; a
  student replays exactly those crops (``train_students_on_stored_labels``). The rest of the
  probability mass is spread evenly over the other classes (FKD's marginal smoothing).
  ``nbytes`` is the storage; it grows with epochs × images × (k + box).

Crops use one ``grid_sample`` for a whole batch (a box and a flip per image); with bilinear
sampling, ``align_corners=False`` and sample points clamped to the box this equals slicing the box
and resizing it with ``F.interpolate(mode="bilinear")`` (torchvision's RandomResizedCrop on tensors,
without antialias).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

Teachers = Union[nn.Module, Sequence[nn.Module]]


# --- random-resized crops -----------------------------------------------------------------------

def random_resized_crop_boxes(n: int, height: int, width: int, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n, 4) integer boxes (top, left, h, w) drawn as torchvision's RandomResizedCrop.get_params:
    area fraction uniform in ``scale``, log-uniform aspect ratio, 10 tries, else a centre crop."""
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"need n >= 0 and a positive image size, got n={n}, height={height}, width={width}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    boxes = torch.empty(n, 4, dtype=torch.long)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        boxes[i] = torch.tensor(_one_box(height, width, area, scale, ratio, log_ratio, generator))
    return boxes


def _one_box(height, width, area, scale, ratio, log_ratio, generator):
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # fallback: the largest centre crop with the ratio clamped into range (torchvision's rule)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, flips: Optional[torch.Tensor] = None,
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Crop box ``boxes[i]`` = (top, left, h, w) of image i, resize it bilinearly to ``size``
    (default: the input size) and mirror it horizontally where ``flips[i]``; differentiable in x."""
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, height, width = x.shape
    boxes = boxes.to(device=x.device, dtype=x.dtype)
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must be ({n}, 4), got shape {tuple(boxes.shape)}")
    top, left, h, w = boxes.unbind(1)
    sx = w / width
    sy = h / height
    if flips is not None:
        sx = torch.where(flips.to(x.device).bool(), -sx, sx)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * top + h) / height - 1
    out_h, out_w = size if size is not None else (height, width)
    grid = F.affine_grid(theta, [n, x.shape[1], out_h, out_w], align_corners=False)
    # resizing a crop clamps at the crop's edge pixels, not the image's: clamp the sample points to
    # the centres of the box's first and last pixels (normalised: (2 i + 1) / size - 1)
    lo = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], 1)
    hi = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1], 1)
    grid = torch.maximum(torch.minimum(grid, hi[:, None, None]), lo[:, None, None])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_crop_flip(x: torch.Tensor, *, scale=(0.08, 1.0), flip: bool = True, same_for_batch: bool = False,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RandomResizedCrop + RandomHorizontalFlip. ``same_for_batch``: one box and one flip for the
    whole batch, as SRe2L's recover applies torchvision transforms to its batch tensor."""
    n, _, height, width = x.shape
    draws = 1 if same_for_batch else n
    boxes = random_resized_crop_boxes(draws, height, width, scale=scale, generator=generator)
    flips = (torch.rand(draws, generator=generator) < 0.5) if flip else torch.zeros(draws, dtype=torch.bool)
    if same_for_batch:
        boxes, flips = boxes.expand(n, 4), flips.expand(n)
    return crop_resize(x, boxes, flips)


# --- teachers -----------------------------------------------------------------------------------

def _as_list(teachers: Teachers):
    models = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("teachers must be an nn.Module or a non-empty sequence of them")
    return models


@torch.no_grad()
def teacher_logits(teachers: Teachers, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Mean logits of the teachers (eval mode) on ``x`` — INFER averages its M architectures."""
    models = _as_list(teachers)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        out = torch.cat([sum(m(x[i:i + batch_size]) for m in models) / len(models)
                         for i in range(0, len(x), batch_size)])
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return out


def teacher_soft_label_fn(teachers: Teachers, temperature: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """On-the-fly relabelling: ``fn(augmented_batch) -> softmax(teacher logits / T)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    models = _as_list(teachers)

    def soft_labels(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(teacher_logits(models, batch) / temperature, dim=1)

    return soft_labels


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (what on-the-fly relabelling must keep)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# --- stored FKD soft labels ---------------------------------------------------------------------

@dataclass
class FKDSoftLabels:
    """Per epoch and image: crop box (fp16, fractions of the image), flip bit, top-k teacher
    probabilities (fp16) and their classes (uint8 up to 256 classes, else int16)."""
    boxes: torch.Tensor      # (E, N, 4) float16: top, left, h, w as fractions of H, W
    flips: torch.Tensor      # (E, N) bool
    top_probs: torch.Tensor  # (E, N, k) float16
    top_index: torch.Tensor  # (E, N, k) uint8 / int16
    num_classes: int
    temperature: float

    @property
    def epochs(self) -> int:
        return self.boxes.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.boxes, self.flips, self.top_probs, self.top_index))

    def crops(self, images: torch.Tensor, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """The stored crops of ``images[index]`` for ``epoch``."""
        h, w = images.shape[-2:]
        frac = self.boxes[epoch, index.cpu()].float()
        boxes = torch.stack([frac[:, 0] * h, frac[:, 1] * w, frac[:, 2] * h, frac[:, 3] * w], 1).round()
        return crop_resize(images[index], boxes, self.flips[epoch, index.cpu()])

    def targets(self, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """Dense (n, C) probabilities: stored top-k, the remaining mass spread evenly."""
        probs = self.top_probs[epoch, index.cpu()].float()
        cls = self.top_index[epoch, index.cpu()].long()
        k = probs.shape[1]
        rest = (1 - probs.sum(1, keepdim=True)).clamp_min(0) / max(self.num_classes - k, 1)
        dense = rest.expand(len(probs), self.num_classes).clone()
        return dense.scatter(1, cls, probs)


@torch.no_grad()
def generate_fkd_labels(teachers: Teachers, images: torch.Tensor, *, epochs: int, k: int = 5,
                        temperature: float = 1.0, scale=(0.08, 1.0), flip: bool = True, seed: int = 0,
                        batch_size: int = 512) -> FKDSoftLabels:
    """Draw ``epochs`` crops per image and store the teacher's top-k probabilities on each."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    n, _, h, w = images.shape
    num_classes = teacher_logits(teachers, images[:1]).shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, {num_classes}], got {k}")
    g = torch.Generator().manual_seed(seed)
    idx_dtype = torch.uint8 if num_classes <= 256 else torch.int16
    boxes, flips, probs, index = [], [], [], []
    for _ in range(epochs):
        box = random_resized_crop_boxes(n, h, w, scale=scale, generator=g)
        fl = (torch.rand(n, generator=g) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
        crops = crop_resize(images, box, fl)
        p = torch.softmax(teacher_logits(teachers, crops, batch_size) / temperature, dim=1)
        top = p.topk(k, dim=1)
        boxes.append((box.float() / torch.tensor([h, w, h, w])).half())
        flips.append(fl)
        probs.append(top.values.half().cpu())
        index.append(top.indices.to(idx_dtype).cpu())
    return FKDSoftLabels(torch.stack(boxes), torch.stack(flips), torch.stack(probs), torch.stack(index),
                         num_classes, float(temperature))


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(target ‖ softmax(logits/T)) up to the target's entropy: −Σ p log q, batch mean (SRe2L's KD)."""
    return -(target_probs * torch.log_softmax(logits / temperature, dim=1)).sum(1).mean()


def train_students(model_fn: Callable[[], nn.Module], n: int, batch_fn, test_set, *, epochs: int,
                   num_students: int = 1, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.01,
                   temperature: float = 1.0, seed: int = 0) -> Tuple[float, float]:
    """Fresh students trained with AdamW + cosine (SRe2L's small-data validation recipe) on
    ``batch_fn(epoch, index, generator) -> (inputs, target probabilities)``, soft cross-entropy at
    ``temperature``; (mean, std) test accuracy in percent."""
    x_test, y_test = test_set
    accs = []
    for s in range(num_students):
        torch.manual_seed(seed + s)
        g = torch.Generator().manual_seed(seed + s)
        net = model_fn().to(x_test.device)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        for epoch in range(epochs):
            net.train()
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                inputs, target = batch_fn(epoch, order[i:i + batch_size], g)
                loss = soft_cross_entropy(net(inputs), target.to(x_test.device), temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(x_test[i:i + 1024]).argmax(1) for i in range(0, len(x_test), 1024)])
        accs.append((pred == y_test).float().mean().item() * 100)
    t = torch.tensor(accs)
    return t.mean().item(), (t.std().item() if len(accs) > 1 else 0.0)


def stored_label_batches(images: torch.Tensor, labels: FKDSoftLabels):
    """``batch_fn`` replaying the stored crops and top-k labels (SRe2L / FKD relabel)."""
    def batch(epoch, index, _gen):
        return labels.crops(images, epoch, index.to(images.device)), labels.targets(epoch, index)
    return batch


def mixup_static_batches(images: torch.Tensor, soft_labels: torch.Tensor, *, alpha: float = 0.8, scale=(0.5, 1.0),
                         flip: bool = True):
    """``batch_fn`` with one static soft label per image and mixup whose labels are interpolated
    like the images, ``lam · l_i + (1 − lam) · l_j`` (INFER's label interpolation), after a random
    crop + flip per image; no teacher call and no per-crop label."""
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))

    def batch(_epoch, index, gen):
        x = random_crop_flip(images[index.to(images.device)], scale=scale, flip=flip, generator=gen)
        t = soft_labels[index.to(soft_labels.device)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
            lam = float(beta.sample())
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]
    return batch


def online_teacher_batches(images: torch.Tensor, teachers: Teachers, *, temperature: float = 1.0, scale=(0.08, 1.0),
                           flip: bool = True):
    """``batch_fn`` drawing a fresh random-resized crop + flip per image and labelling it with the
    teacher(s) on the fly (SRe2L's small-data relabel; nothing stored)."""
    label = teacher_soft_label_fn(teachers, temperature)

    def batch(_epoch, index, gen):
        x = random_crop_flip(images[index.to(images.device)], scale=scale, flip=flip, generator=gen)
        return x, label(x)
    return batch
