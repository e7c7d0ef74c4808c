"""MIM4DD add-on: a mutual-information (contrastive) term for any dataset-distillation loss.

MIM4DD ("Embarrassingly Simple Dataset Distillation via Mutual Information Maximization",
NeurIPS 2023) treats synthetic/real samples with the same label as positive pairs and the rest as
negatives, and maximises a contrastive (NCE) lower bound of their mutual information on the
feature maps of selected layers of a synthetic-side and a real-side network.

Formulation implemented here (ours: the paper's exact critic, projection heads and layer
weights have no public code to compare against, so this follows the abstract and CRD-style
practice):

    loss(x_syn, y_syn, x_real, y_real) = Σ_l w_l · supcon_nce(z_syn_l, y_syn, z_real_l, y_real,
                                                             temperature, variant, noise_ratio)
    z_syn_l  = normalize(P_syn_l(flatten(syn_net.layer_l(x_syn))))
    z_real_l = normalize(P_real_l(flatten(real_net.layer_l(x_real))))

with P_*_l a Linear projection head (``proj_dim``, 128 by default) per selected layer and side,
followed by L2 normalisation (eps 1e-12); supcon_nce then runs with ``normalize=False``.
Features are captured with forward hooks on the modules named in ``layers``. The real side runs
under ``torch.no_grad()`` (the real network's activations are constants; its projection heads
still get gradients) unless ``real_grad=True``. Add ``λ · mim.loss(...)`` to the base method's loss
and put ``mim.parameters()`` (the heads) in an optimizer; ``syn_net``/``real_net`` are not
registered as submodules, so ``mim.parameters()`` holds the heads only.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .supcon_nce import supcon_nce


class _FeatureTap:
    """Forward hooks on named modules of one network; stores each output while armed."""

    def __init__(self, net: nn.Module, layers: Sequence[str], argname: str):
        modules = dict(net.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"{argname} has no module named {missing}; available: {sorted(modules)[:20]}…")
        self.features: Dict[str, torch.Tensor] = {}
        self.armed = False
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name):
        def hook(_module, _inputs, output):
            if self.armed:
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"layer {name!r} must output a tensor to be tapped, got {type(output).__name__}")
                self.features[name] = output
        return hook

    def run(self, net: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.features = {}
        self.armed = True
        try:
            net(x)
        finally:
            self.armed = False
        captured, self.features = self.features, {}
        return captured

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


class MIM4DD(nn.Module):
    """Contrastive MI term between synthetic and real features of selected layers (see module doc).

    Args:
        syn_net: network applied to the synthetic images.
        layers: names (as in ``named_modules()``) of the layers whose outputs are contrasted.
        feature_dims: flattened output size of each layer; None → ``nn.LazyLinear`` heads (sized on
            the first call; create the optimizer after it).
        real_net: network applied to the real images (default: ``syn_net``).
        proj_dim: output size of every projection head.
        layer_weights: one weight per layer (default 1 each).
        temperature, variant, noise_ratio, backend: passed to ``ddfast.supcon_nce``.
        real_grad: let gradients flow into the real network's activations.
    """

    def __init__(self, syn_net: nn.Module, layers: Sequence[str], feature_dims: Optional[Sequence[int]] = None, *,
                 real_net: Optional[nn.Module] = None, proj_dim: int = 128,
                 layer_weights: Optional[Sequence[float]] = None, temperature: float = 0.1,
                 variant: str = "infonce", noise_ratio: float = 1.0, real_grad: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(syn_net, nn.Module):
            raise TypeError(f"syn_net must be an nn.Module, got {type(syn_net).__name__}")
        if real_net is not None and not isinstance(real_net, nn.Module):
            raise TypeError(f"real_net must be an nn.Module or None, got {type(real_net).__name__}")
        if isinstance(layers, str) or len(layers) == 0:
            raise ValueError("layers must be a non-empty sequence of module names")
        layers = list(layers)
        if feature_dims is not None and len(feature_dims) != len(layers):
            raise ValueError(f"feature_dims must have one entry per layer ({len(layers)}), got {len(feature_dims)}")
        if layer_weights is None:
            layer_weights = [1.0] * len(layers)
        if len(layer_weights) != len(layers):
            raise ValueError(f"layer_weights must have one entry per layer ({len(layers)}), got {len(layer_weights)}")
        if not isinstance(proj_dim, int) or proj_dim < 1:
            raise ValueError(f"proj_dim must be a positive int, got {proj_dim!r}")
        self.layers = layers
        self.layer_weights = [float(w) for w in layer_weights]
        self.temperature, self.variant, self.noise_ratio = temperature, variant, noise_ratio
        self.real_grad, self.backend = real_grad, backend
        # plain attributes, not submodules: the networks belong to the base method
        object.__setattr__(self, "syn_net", syn_net)
        object.__setattr__(self, "real_net", real_net if real_net is not None else syn_net)

        def head(i):
            return nn.LazyLinear(proj_dim) if feature_dims is None else nn.Linear(int(feature_dims[i]), proj_dim)

        self.syn_heads = nn.ModuleList(head(i) for i in range(len(layers)))
        self.real_heads = nn.ModuleList(head(i) for i in range(len(layers)))
        self._syn_tap = _FeatureTap(syn_net, layers, "syn_net")
        self._real_tap = self._syn_tap if self.real_net is syn_net else _FeatureTap(self.real_net, layers, "real_net")

    def syn_features(self, x_syn: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Raw outputs of the tapped layers of ``syn_net`` on ``x_syn``."""
        return self._syn_tap.run(self.syn_net, x_syn)

    def real_features(self, x_real: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Raw outputs of the tapped layers of ``real_net`` on ``x_real`` (no grad unless real_grad)."""
        with torch.set_grad_enabled(self.real_grad and torch.is_grad_enabled()):
            return self._real_tap.run(self.real_net, x_real)

    @staticmethod
    def project(head: nn.Module, feature: torch.Tensor) -> torch.Tensor:
        return F.normalize(head(feature.flatten(1)), dim=1, eps=1e-12)

    def loss(self, x_syn: torch.Tensor, y_syn: torch.Tensor, x_real: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
        """Σ_l w_l · supcon_nce of the projected layer-l features (scalar, differentiable to x_syn and the heads)."""
        feats_syn = self.syn_features(x_syn)
        feats_real = self.real_features(x_real)
        total = None
        for i, name in enumerate(self.layers):
            if name not in feats_syn or name not in feats_real:
                raise RuntimeError(f"layer {name!r} did not run in the forward pass of the network")
            z_syn = self.project(self.syn_heads[i], feats_syn[name])
            z_real = self.project(self.real_heads[i], feats_real[name])
            term = self.layer_weights[i] * supcon_nce(
                z_syn, y_syn, z_real, y_real, temperature=self.temperature, normalize=False, variant=self.variant,
                noise_ratio=self.noise_ratio, backend=self.backend)
            total = term if total is None else total + term
        return total

    forward = loss

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the networks (the module is unusable afterwards)."""
        self._syn_tap.remove()
        self._real_tap.remove()
