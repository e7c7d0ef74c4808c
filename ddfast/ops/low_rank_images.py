"""LowRankImages — synthetic images stored as low-rank factors (SPEC 3.6).

Yang et al. (NeurIPS 2023): each image channel is ``A (H×r) @ B (r×W)``, so one image costs
``r·(H+W)`` numbers per channel instead of ``H·W``; at the same storage budget a method distils
``ipc' = ipc·⌊HW / (r(H+W))⌋`` images per class. Works as the synthetic set of any method here:
``images()`` (or calling the module) returns the (n, C, H, W) tensor, differentiable w.r.t. the
factors, which is what the optimiser updates.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_float_tensor


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def low_rank_budget_ipc(ipc: int, height: int, width: int, rank: int = 2) -> int:
    """Images per class that fit the storage of ``ipc`` full images: ``ipc·⌊HW / (r(H+W))⌋``."""
    for name, v in (("ipc", ipc), ("height", height), ("width", width), ("rank", rank)):
        _positive_int(name, v)
    per_image = (height * width) // (rank * (height + width))
    if per_image == 0:
        raise ValueError(f"rank {rank} stores more than a full {height}×{width} image; use rank <= "
                         f"{(height * width) // (height + width)}")
    return ipc * per_image


class LowRankImages(nn.Module):
    """``n`` synthetic images of ``channels``×``height``×``width``, each channel ``A @ B`` of rank ``rank``."""

    def __init__(self, n: int, channels: int, height: int, width: int, rank: int = 2, *, std: float = 0.1,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, v in (("n", n), ("channels", channels), ("height", height), ("width", width), ("rank", rank)):
            _positive_int(name, v)
        if rank > min(height, width):
            raise ValueError(f"rank must be <= min(height, width) = {min(height, width)}, got {rank}")
        scale = (std / rank ** 0.5) ** 0.5  # entries of A @ B then have standard deviation ≈ std
        self.A = nn.Parameter(torch.randn(n, channels, height, rank, dtype=dtype, device=device) * scale)
        self.B = nn.Parameter(torch.randn(n, channels, rank, width, dtype=dtype, device=device) * scale)

    @property
    def rank(self) -> int:
        return self.A.shape[-1]

    def images(self) -> torch.Tensor:
        return self.A @ self.B

    def forward(self) -> torch.Tensor:
        return self.images()

    @classmethod
    def from_images(cls, images: torch.Tensor, rank: int = 2) -> "LowRankImages":
        """Best rank-``rank`` approximation of each image channel (truncated SVD, Eckart–Young),
        split evenly as ``A = U·√S``, ``B = √S·Vᵀ``."""
        check_float_tensor("images", images)
        if images.dim() != 4:
            raise ValueError(f"images must be (n, C, H, W), got shape {tuple(images.shape)}")
        n, c, h, w = images.shape
        module = cls(n, c, h, w, rank, dtype=images.dtype, device=images.device)
        u, s, vh = torch.linalg.svd(images.detach().to(torch.float64 if images.dtype == torch.float64
                                                        else torch.float32), full_matrices=False)
        root = s[..., :rank].sqrt()
        with torch.no_grad():
            module.A.copy_(u[..., :, :rank] * root.unsqueeze(-2))
            module.B.copy_(root.unsqueeze(-1) * vh[..., :rank, :])
        return module

    def extra_repr(self) -> str:
        n, c, h, r = self.A.shape
        return f"n={n}, channels={c}, height={h}, width={self.B.shape[-1]}, rank={r}"
