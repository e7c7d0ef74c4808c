"""Where one bench case's device time goes: torch.profiler over a few fwd+bwd calls of one
provider, the top kernels by total device time (CUDA) or ops by CPU time (CPU).

    python -m bench.profile_case dc_step/convnet3-cifar10-ipc10 ddfast [--device cuda] [--calls 3] [--top 25]

The bench says how fast a step is; this says which kernels make it so (the next thing to fuse).
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Dict

import torch

from .case import release_persistent
from .cases import select_cases
from .runner import REFERENCE, _run_step, all_providers


def provider_step(case_name: str, provider: str, device: torch.device) -> Callable[[], None]:
    """One fwd+bwd call of ``provider`` on the case's inputs (as the bench times it)."""
    matches = select_cases(device.type, True, f"^{re.escape(case_name)}$")
    if len(matches) != 1:
        raise ValueError(f"case_name must name one bench case, got {case_name!r} ({len(matches)} matches)")
    case = matches[0]
    inputs = case.make_inputs(device)
    provs: Dict[str, tuple] = all_providers(case, device)
    if provider not in provs:
        raise ValueError(f"provider must be one of {sorted(provs)}, got {provider!r}")
    fn = provs[provider][1]
    return lambda: _run_step(lambda: fn(inputs), inputs, case.grad_inputs, collect=False)


def profile_table(step: Callable[[], None], device: torch.device, calls: int = 3, top: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step()
    step()  # warm-up: compiles, caches, graphs
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case")
    p.add_argument("provider", nargs="?", default=REFERENCE)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    try:
        print(f"{args.case} [{args.provider}] on {device}, {args.calls} calls")
        print(profile_table(provider_step(args.case, args.provider, device), device, args.calls, args.top))
    finally:
        release_persistent()
    return 0


if __name__ == "__main__":
    sys.exit(main())
