"""dsa cases: DSA's per-iteration augmentation, every class's real and synthetic batch with its own
Siamese transform. Reference: one DiffAugment call per class and batch (the DSA loop: DC's
DiffAugment restated op by op in ``bench/dc_diffaugment.py``, its torch.random.manual_seed per draw included);
ddfast: one dsa_augment call over all of them (groups = classes), with the reference's random
stream (rng="reference": its generator calls per class, host work per class) or with Philox draws
on the device (rng="device": no host sync, no host work per image). Forward+backward; the gradient
flows to the synthetic images."""
import torch

import ddfast
from ddfast.ops.dsa import ParamDiffAug

from ..case import Case
from ..dc_diffaugment import dc_diff_augment

STRATEGY = "color_crop_cutout_flip_scale_rotate"


def class_seeds(classes: int):
    """One fixed DSA seed per class (also used by the dm_step cases)."""
    return [1000 + 7 * c for c in range(classes)]


def _inputs(classes, n_real, n_syn, size):
    def make(device):
        g = torch.Generator().manual_seed(0)
        real = torch.randn(classes * n_real, 3, size, size, generator=g).to(device)
        syn = torch.randn(classes * n_syn, 3, size, size, generator=g).to(device).requires_grad_(True)
        groups = torch.cat([torch.arange(classes).repeat_interleave(n_real),
                            torch.arange(classes).repeat_interleave(n_syn)]).to(device)
        seeds = class_seeds(classes)
        return {"real": real, "syn": syn, "groups": groups, "seeds": seeds, "n_real": n_real, "n_syn": n_syn}
    return make


def _reference(real, syn, groups, seeds, n_real, n_syn):
    param, outs = ParamDiffAug(), []  # one settings object for the whole loop, as DC's args.dsa_param
    for c, seed in enumerate(seeds):
        outs.append(dc_diff_augment(real[c * n_real:(c + 1) * n_real], STRATEGY, seed, param))
    for c, seed in enumerate(seeds):
        outs.append(dc_diff_augment(syn[c * n_syn:(c + 1) * n_syn], STRATEGY, seed, param))
    return torch.cat(outs)


def _fused_with(rng):
    def fused(backend, real, syn, groups, seeds, n_real, n_syn):
        return ddfast.dsa_augment(torch.cat([real, syn]), groups, STRATEGY, seeds, backend=backend, rng=rng)
    return fused


def cases():
    out = []
    for label, classes, n_real, n_syn, default in (("cifar10-b2560", 10, 256, 10, False),
                                                    ("small-c4-b64", 4, 16, 2, True)):
        for rng, suffix in (("reference", ""), ("device", "-device-rng")):
            out.append(Case(
                name=f"dsa/{label}{suffix}",
                op="dsa",
                make_inputs=_inputs(classes, n_real, n_syn, 32),
                reference=_reference,
                fused=_fused_with(rng),
                grad_inputs=("syn",),
                default=default,
                # forward reads and writes every image; backward reads and writes the gradient
                bytes_moved=lambda inp: 4 * (inp["real"].numel() + inp["syn"].numel()) * inp["real"].element_size(),
                size=classes * (n_real + n_syn),
                # rng="device" draws another stream than the reference loop: same work, other numbers
                tol=1e-4 if rng == "reference" else float("inf"),
                notes=f"mode 'S' (DC's default): each class draws one op family per call; rng={rng!r}"
                      + ("" if rng == "reference" else " (not the reference's stream: outputs not compared)"),
            ))
    return out
