"""Host time of BNStatMatcher per BatchNorm, over a plain forward + backward of the same model.

    python -m bench.bn_matcher_host [--batch 2] [--size 32] [--width 8] [--rounds 15]

The bench's ResNet-18 layout (20 BatchNorm2d) on CPU at a tiny size, so that host work decides:
``plain`` (no hooks), ``per-layer`` (a hook computing ``bn_stat_loss`` for each layer, summed in
Python: how BNStatMatcher worked before ``bn_stat_loss_sum``), ``matcher`` (BNStatMatcher: record,
then one call), ``fused`` (``fuse_batchnorm=True``: each BatchNorm and its loss one ``bn_eval_stat``
call, replacing the layer's own) and ``sre2l`` (SRe2L's BNFeatureHook). Best of ``rounds``
interleaved rounds.
"""
import argparse
import time

import torch
from torch import nn

import ddfast

from .cases.bn_stat import _sre2l_step, _teacher_inputs


def _per_layer(model, x):
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    losses = {}

    def hook_for(k):
        def hook(module, inputs, _out):
            losses[k] = ddfast.bn_stat_loss(inputs[0], module.running_mean, module.running_var)
        return hook

    handles = [m.register_forward_hook(hook_for(k)) for k, m in enumerate(layers)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    total = None
    for k in sorted(losses):
        total = losses[k] if total is None else total + losses[k]
    return total


def _matcher(model, x, fuse=False):
    with ddfast.BNStatMatcher(model, fuse_batchnorm=fuse) as matcher:
        model(x)
        return matcher.loss()


def measure(batch=2, size=32, width=8, rounds=15, calls=20):
    inputs = _teacher_inputs(batch, size, width)(torch.device("cpu"))
    model, x = inputs["model"], inputs["x"]
    layers = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    steps = {"plain": lambda: model(x).sum(), "per-layer": lambda: _per_layer(model, x),
             "matcher": lambda: _matcher(model, x), "fused": lambda: _matcher(model, x, fuse=True),
             "sre2l": lambda: _sre2l_step(model, x)}
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(3):
                step().backward()
            t0 = time.perf_counter()
            for _ in range(calls):
                x.grad = None
                step().backward()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return layers, best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    layers, best = measure(a.batch, a.size, a.width, a.rounds)
    print(f"step µs (best of {a.rounds}): " + ", ".join(f"{k} {v:.0f}" for k, v in best.items()))
    print(f"per BatchNorm over plain ({layers} layers): " + ", ".join(
        f"{k} {(v - best['plain']) / layers:.1f} µs" for k, v in best.items() if k != "plain"))


if __name__ == "__main__":
    main()
