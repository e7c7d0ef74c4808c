"""The networks dataset distillation uses, in one place (SPEC 7).

* ``ConvNet`` — DatasetCondensation's ConvNet family (``depth`` × [conv3×3 → norm → act → pool] →
  linear). The class itself lives in ``ddfast.ops.gradient_matcher`` (the op's tests and benchmarks
  use it) and is re-exported here, not copied. ``ConvNetBN`` is the same network with BatchNorm.
* ``ResNet`` — a small residual network (stem + three stages of BasicBlocks, widths w, 2w, 4w) with
  instance norm (DC's ``ResNet18`` convention) or BatchNorm (SRe2L-style teachers).
* ``get_network(name, channel, num_classes, im_size)`` builds one of them by name.

Every network here has ``features`` (the embedding, flattened by ``embed``) and ``classifier``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ._checks import check_choice
from .ops.gradient_matcher import ConvNet

__all__ = ["ConvNet", "ConvNetBN", "ResNet", "BasicBlock", "get_network", "embed", "NETWORKS",
           "has_batchnorm"]


def ConvNetBN(channel: int, num_classes: int, width: int = 128, depth: int = 3, im_size=(32, 32), **kwargs) -> ConvNet:
    """DC's ``ConvNetBN``: the ConvNet with BatchNorm after every convolution."""
    return ConvNet(channel, num_classes, width, depth, norm="batchnorm", im_size=im_size, **kwargs)


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batchnorm" else nn.GroupNorm(channels, channels, affine=True)


class BasicBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus the (projected) input, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, out_ch)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet: conv3×3 stem, stages of ``blocks`` BasicBlocks at widths (w, 2w, 4w) with
    strides (1, 2, 2), global average pooling, linear. ``norm``: "instancenorm" or "batchnorm"."""

    def __init__(self, channel: int, num_classes: int, width: int = 16, blocks: int = 1, norm: str = "instancenorm"):
        super().__init__()
        check_choice("norm", norm, ("instancenorm", "batchnorm"))
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be a positive int, got {blocks!r}")
        layers = [nn.Conv2d(channel, width, 3, 1, 1, bias=False), _norm(norm, width), nn.ReLU()]
        in_ch = width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(in_ch, out_ch, 2 if (stage > 0 and b == 0) else 1, norm))
                in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


NETWORKS = ("convnet", "convnetbn", "convnetgn", "convnetln", "convnetnn", "resnet", "resnetbn")


def get_network(name: str, channel: int, num_classes: int, im_size: Tuple[int, int], *, width: Optional[int] = None,
                depth: Optional[int] = None) -> nn.Module:
    """A fresh network by (case-insensitive) name: ``convnet`` (instance norm, DC's default),
    ``convnetbn``, ``convnetgn`` (GroupNorm(4)), ``convnetln``, ``convnetnn`` (no norm), ``resnet``
    (instance norm), ``resnetbn``. ``width``/``depth``: ConvNet width and depth (128, 3), ResNet
    base width and blocks per stage (16, 1). Initialised from torch's global generator."""
    key = check_choice("name", str(name).lower(), NETWORKS)
    if key.startswith("resnet"):
        return ResNet(channel, num_classes, width or 16, depth or 1, "batchnorm" if key == "resnetbn" else "instancenorm")
    norm = {"convnet": "instancenorm", "convnetbn": "batchnorm", "convnetgn": "groupnorm", "convnetln": "layernorm",
            "convnetnn": "none"}[key]
    return ConvNet(channel, num_classes, width or 128, depth or 3, norm=norm, im_size=tuple(im_size))


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The flattened embedding DM/CAFE match: ``model.embed(x)`` if defined, else ``model.features(x)``."""
    if hasattr(model, "embed"):
        return model.embed(x)
    return model.features(x).flatten(1)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
