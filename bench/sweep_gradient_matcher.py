"""Sweep: GradientMatcher strategies on ConvNet-3 DC steps of growing size (forward + image backward).

    python -m ddfast.bench.sweep_gradient_matcher [--device cuda] [--strategies loop,segmented,vmap]

Prints, per configuration, the first-layer activations of the whole real batch (what the CPU
"auto" switch looks at) and the median ms of each strategy. The numbers behind
``_CPU_SEGMENTED_MAX_ACTIVATIONS`` in ``ddfast/ops/gradient_matcher.py`` come from this sweep.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from ddfast.ops.gradient_matcher import ConvNet, GradientMatcher

from .runner import _median_time, _run_step

# (classes, ipc, real per class, width, image size)
CONFIGS = [(10, 1, 8, 32, 16), (3, 2, 10, 64, 28), (10, 1, 8, 32, 32), (10, 2, 16, 32, 32), (10, 2, 16, 128, 16),
           (10, 1, 8, 128, 32), (10, 10, 32, 64, 32)]


def time_step(matcher, data, device, repeats: int) -> float:
    """Median ms of forward + image backward, after one warm-up call (which builds the plan)."""
    inputs = {"x_syn": data[2]}
    step = lambda: _run_step(lambda: matcher(*data), inputs, ("x_syn",), collect=False)  # noqa: E731
    step()
    return statistics.median(_median_time(step, device, repeats, 0.0, max_repeats=repeats)) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategies", default="loop,segmented,vmap")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-configs", type=int, default=len(CONFIGS), help="run only the first N configurations")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = torch.device(args.device)
    for classes, ipc, real, width, im in CONFIGS[:args.max_configs]:
        torch.manual_seed(0)
        model = ConvNet(3, classes, width=width, depth=3, im_size=im).to(device)
        x_real = torch.randn(classes * real, 3, im, im, device=device)
        x_syn = torch.randn(classes * ipc, 3, im, im, device=device, requires_grad=True)
        y_real = torch.arange(classes, device=device).repeat_interleave(real)
        y_syn = torch.arange(classes, device=device).repeat_interleave(ipc)
        data = (x_real, y_real, x_syn, y_syn)
        row = {s: round(time_step(GradientMatcher(model, strategy=s), data, device, args.repeats), 1)
               for s in args.strategies.split(",")}
        activations = classes * real * width * im * im
        print(f"classes {classes} ipc {ipc} real {real} width {width} {im}px  "
              f"activations {activations / 1e6:.2f}M  ms {row}", flush=True)


if __name__ == "__main__":
    main()
