"""Host overhead per op call: ddfast's public op against a bare ``torch.autograd.Function`` that
calls the same compiled kernels (issue 11, "lean host path"). Tiny CPU tensors, forward+backward,
so the time is Python and dispatch, not arithmetic.

    python -m ddfast._overhead [--rounds 15] [--iters 300] [--checks once]

prints µs per call (best round) for ``ddfast`` (the public op, backend "cpp"), ``bare`` (the plain
Function) and ``registered`` (the custom op called with its ``torch.library`` autograd, the path the
eager call took before), and the ratio ddfast / bare. Rounds interleave the providers so machine
noise hits them alike; the minimum over rounds is reported.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Dict, Tuple

import torch


def _bare_function(fwd, bwd, save: Callable, grads: Callable, outputs: int = 1):
    """A plain autograd.Function: forward runs ``fwd(*tensors)``, keeps ``save(inputs, out)``;
    backward returns ``grads(bwd, saved, grad)``."""

    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out = fwd(*inputs)
            ctx.save_for_backward(*save(inputs, out))
            return out[0] if outputs == 1 else out[:outputs]

        @staticmethod
        def backward(ctx, grad, *_):
            return grads(bwd, ctx.saved_tensors, grad)

    return Bare


def _cases() -> Dict[str, Tuple[Callable, Callable, Callable]]:
    import ddfast

    ddfast.op_modules()
    ops = torch.ops.ddfast
    torch.manual_seed(0)
    cases = {}

    s, a, b = torch.randn(64, requires_grad=True), torch.randn(64), torch.randn(64)
    ddfast.param_match(s, a, b, backend="cpp")  # loads the library
    bare = _bare_function(ops.param_match_fwd, ops.param_match_bwd, lambda i, o: (i[0], i[2], o[1]),
                          lambda bwd, sv, g: (bwd(g, *sv), None, None))
    cases["param_match"] = (lambda: ddfast.param_match(s, a, b, backend="cpp").backward(),
                            lambda: bare.apply(s, a, b).backward(),
                            lambda: ops.param_match_fwd(s, a, b)[0].backward())

    # ConvNet-3's 14 parameter tensors, shrunk: conv w/b, norm w/b per block, then the classifier
    shapes = [(4, 3, 3, 3), (4,), (4,), (4,)] + [(4, 4, 3, 3), (4,), (4,), (4,)] * 2 + [(3, 16), (3,)]
    g_syn = [torch.randn(sh, requires_grad=True) for sh in shapes]
    g_real = [torch.randn(sh) for sh in shapes]
    k = len(shapes)
    ddfast.gradient_match(g_syn, g_real, backend="cpp")
    gm = _bare_function(lambda *t: ops.gradient_match_fwd(list(t[:k]), list(t[k:]), "ours", 1e-6, False, "sum"),
                        lambda g, *sv: ops.gradient_match_bwd(g, list(sv[:k]), list(sv[k:2 * k]), sv[-1], "ours",
                                                              False),
                        lambda i, o: (*i, o[1]),
                        lambda bwd, sv, g: (*bwd(g, *sv), *([None] * k)))
    cases["gradient_match"] = (lambda: ddfast.gradient_match(g_syn, g_real, backend="cpp").backward(),
                               lambda: gm.apply(*g_syn, *g_real).backward(),
                               lambda: ops.gradient_match_fwd(g_syn, g_real, "ours", 1e-6, False,
                                                              "sum")[0].backward())

    x, y = torch.randn(16, 8, requires_grad=True), torch.arange(16) % 4
    ddfast.class_means(x, y, 4, backend="cpp")
    cm = _bare_function(lambda x_, y_: ops.class_means_fwd(x_, y_, 4), ops.class_means_bwd,
                        lambda i, o: (i[1], o[1]), lambda bwd, sv, g: (bwd(g.contiguous(), *sv), None), outputs=1)
    cases["class_means"] = (lambda: ddfast.class_means(x, y, 4, backend="cpp")[0].sum().backward(),
                            lambda: cm.apply(x, y).sum().backward(),
                            lambda: ops.class_means_fwd(x, y, 4)[0].sum().backward())

    f_real, f_syn = torch.randn(16, 8), torch.randn(8, 8, requires_grad=True)
    y_real, y_syn = torch.arange(16) % 4, torch.arange(8) % 4
    ddfast.class_mean_loss(f_real, y_real, f_syn, y_syn, 4, backend="cpp")

    def bare_cml_fwd(fs, ys):
        mean_r, count_r = ops.class_means_fwd(f_real, y_real, 4)
        return ops.class_mean_loss_fwd(fs, ys, mean_r, count_r, 4)

    cml = _bare_function(bare_cml_fwd, ops.class_mean_loss_bwd, lambda i, o: (i[1], o[1], o[2]),
                         lambda bwd, sv, g: (bwd(g.contiguous(), *sv, torch.float32), None))
    cases["class_mean_loss"] = (
        lambda: ddfast.class_mean_loss(f_real, y_real, f_syn, y_syn, 4, backend="cpp").backward(),
        lambda: cml.apply(f_syn, y_syn).sum().backward(),
        lambda: ops.class_mean_loss_fwd(f_syn, y_syn, *ops.class_means_fwd(f_real, y_real, 4), 4)[0].sum().backward())
    xb, rm, rv = torch.randn(4, 3, 5, requires_grad=True), torch.randn(3), torch.rand(3) + 0.5
    ddfast.bn_stat_loss(xb, rm, rv, backend="cpp")
    bn = _bare_function(ops.bn_stat_fwd, ops.bn_stat_bwd, lambda i, o: (i[0], i[1], i[2], o[1], o[2]),
                        lambda bwd, sv, g: (bwd(g, *sv), None, None))
    cases["bn_stat_loss"] = (lambda: ddfast.bn_stat_loss(xb, rm, rv, backend="cpp").backward(),
                             lambda: bn.apply(xb, rm, rv).backward(),
                             lambda: ops.bn_stat_fwd(xb, rm, rv)[0].backward())
    return cases


def measure(rounds: int = 15, iters: int = 300, checks: str = None) -> Dict[str, Dict[str, float]]:
    """µs per forward+backward call (best round) per op and provider, and ddfast/bare."""
    from ddfast import _checks

    previous = _checks._mode
    _checks.set_checks(checks)
    try:
        cases = _cases()
        best = {op: [float("inf")] * 3 for op in cases}
        for _ in range(rounds):
            for op, fns in cases.items():
                for j, fn in enumerate(fns):
                    for _ in range(10):
                        fn()
                    start = time.thread_time()
                    for _ in range(iters):
                        fn()
                    best[op][j] = min(best[op][j], (time.thread_time() - start) / iters * 1e6)
    finally:
        _checks.set_checks(previous)
    return {op: {"ddfast_us": round(t[0], 1), "bare_function_us": round(t[1], 1), "registered_op_us": round(t[2], 1),
                 "ratio": round(t[0] / t[1], 3)} for op, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--checks", choices=("full", "once", "off"), default=None,
                        help="value-check mode (default: the device default, 'full' on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps({"torch": torch.__version__, "threads": 1, "checks": args.checks or "default",
                      "results": measure(args.rounds, args.iters, args.checks)}, indent=1))


if __name__ == "__main__":
    main()
