"""Dataset distillation on scikit-learn's bundled digits (8×8, 10 classes; no download).

Distils ``ipc`` synthetic images per class with DM (``ddfast.class_mean_loss`` over randomly
initialised ConvNet embeddings, Zhao & Bilen 2023) or DC (``ddfast.GradientMatcher``, Zhao et al.
2021), then trains fresh ConvNets on (a) the distilled set and (b) a random real subset of the
same size, and reports their test accuracy. Everything is seeded: the same command prints the
same numbers on the same machine.

    ddfast distill-digits --method dm --ipc 10 --iterations 300
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import trange

NUM_CLASSES = 10


def load_digits_split(seed: int = 0, test_fraction: float = 0.3, device="cpu"):
    """Standardised (N, 1, 8, 8) float tensors, stratified train/test split with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return (x[train_idx].to(device), y[train_idx].to(device)), (x[test_idx].to(device), y[test_idx].to(device))


class DigitsConvNet(nn.Module):
    """DD's ConvNet at 8×8: [conv3×3 → instance norm → ReLU → avg-pool 2] × 2 → linear."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers, c = [], 1
        for _ in range(2):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                       nn.AvgPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(width * 2 * 2, num_classes)

    def embed(self, x):
        return self.features(x)

    def forward(self, x):
        return self.classifier(self.features(x))


def train_and_test(x_train, y_train, x_test, y_test, *, epochs: int = 300, seed: int = 0, lr: float = 0.01) -> float:
    """Train a fresh ConvNet on (x_train, y_train) full-batch; test accuracy in percent."""
    torch.manual_seed(seed)
    net = DigitsConvNet().to(x_train.device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(net(x_train), y_train).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return (net(x_test).argmax(1) == y_test).float().mean().item() * 100


def random_real_subset(x, y, ipc: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten().cpu()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    idx = torch.cat(picks).to(x.device)
    return x[idx].clone(), y[idx].clone()


def distill(x_real, y_real, *, method: str = "dm", ipc: int = 10, iterations: int = 300, lr_img: float = None,
            seed: int = 0, progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """Synthetic set (ipc per class, initialised from real images) and the loss per iteration."""
    import ddfast

    if method not in ("dm", "dc"):
        raise ValueError(f"method must be 'dm' or 'dc', got {method!r}")
    x_syn, y_syn = random_real_subset(x_real, y_real, ipc, seed)
    x_syn.requires_grad_(True)
    lr_img = lr_img if lr_img is not None else (1.0 if method == "dm" else 0.1)
    opt = torch.optim.SGD([x_syn], lr=lr_img, momentum=0.5)
    torch.manual_seed(seed)
    losses = []
    for _ in trange(iterations, desc=f"distilling ({method.upper()}, ipc {ipc})", disable=not progress):
        net = DigitsConvNet().to(x_real.device)  # a fresh random network each iteration, as DM/DC do
        for p in net.parameters():
            p.requires_grad_(method == "dc")
        if method == "dm":
            with torch.no_grad():
                f_real = net.embed(x_real)
            loss = ddfast.class_mean_loss(f_real, y_real, net.embed(x_syn), y_syn, num_classes=NUM_CLASSES)
        else:
            loss = ddfast.GradientMatcher(net, metric="ours")(x_real, y_real, x_syn, y_syn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return x_syn.detach(), y_syn, losses


def run(method="dm", ipc=10, iterations=300, epochs=300, seed=0, device="cpu", progress=True) -> Dict[str, float]:
    (x_tr, y_tr), (x_te, y_te) = load_digits_split(seed, device=device)
    t0 = time.perf_counter()
    x_syn, y_syn, losses = distill(x_tr, y_tr, method=method, ipc=ipc, iterations=iterations, seed=seed,
                                   progress=progress)
    seconds = time.perf_counter() - t0
    x_rand, y_rand = random_real_subset(x_tr, y_tr, ipc, seed)
    return {
        "method": method, "ipc": ipc, "iterations": iterations, "distill_seconds": seconds,
        "loss_first": losses[0] if losses else float("nan"), "loss_last": losses[-1] if losses else float("nan"),
        "acc_random_real": train_and_test(x_rand, y_rand, x_te, y_te, epochs=epochs, seed=seed),
        "acc_distilled": train_and_test(x_syn, y_syn, x_te, y_te, epochs=epochs, seed=seed),
        "acc_full_train": train_and_test(x_tr, y_tr, x_te, y_te, epochs=epochs, seed=seed),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddfast distill-digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("dm", "dc"), default="dm")
    parser.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=300, help="training epochs of the evaluation networks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    r = run(args.method, args.ipc, args.iterations, args.epochs, args.seed, args.device, not args.no_progress)
    print(f"digits, {r['method'].upper()}, {r['ipc']} image(s)/class, {r['iterations']} iterations "
          f"({r['distill_seconds']:.1f} s): loss {r['loss_first']:.4g} -> {r['loss_last']:.4g}")
    print(f"  test accuracy, trained on random real images : {r['acc_random_real']:.1f}%")
    print(f"  test accuracy, trained on distilled images   : {r['acc_distilled']:.1f}%")
    print(f"  test accuracy, trained on the full train set : {r['acc_full_train']:.1f}%")
    return 0
