"""The ``ddfast`` command: ``ddfast info`` and ``ddfast bench``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddfast", description="Fused operators for dataset distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device, and which backend runs each op (and why not)")
    p_info.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p_info.add_argument("--kernels", action="store_true",
                        help="also compile every kernel for sm_90 (no GPU needed; cached) and print registers, "
                             "spills, shared memory, tensor-core instructions and 128-bit loads per kernel")
    p_bench = sub.add_parser("bench", help="check every op against its reference, then time it")
    p_bench.add_argument("--full", action="store_true", help="run every case (default: the quick ones)")
    p_bench.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p_bench.add_argument("-k", "--select", default=None, help="regular expression on case names")
    p_bench.add_argument("--out", default=None, help="JSON path (default: bench/results/<device>-<date>.json)")
    p_bench.add_argument("--plot", default=None, metavar="DIR", help="write one PNG per op into DIR")
    p_bench.add_argument("--repeats", type=int, default=5, help="minimum timed repeats per provider")
    p_bench.add_argument("--min-seconds", type=float, default=0.5, help="minimum timed seconds per provider")
    p_bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_bench.add_argument("--list", action="store_true", help="list the cases and exit")
    p_bench.add_argument("--compile-reference", action="store_true",
                         help="also time torch.compile of each reference (a compile failure is an error row)")
    p_bench.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile-reference")
    p_bench.add_argument("--kernels", action="store_true",
                         help="add the sm_90 kernel report (registers, spills, ...) to the JSON")
    sub.add_parser("distill-digits", help="distil scikit-learn's digits with DM or DC and evaluate", add_help=False)
    sub.add_parser("distill", help="distil a dataset with dc|dsa|dm|cafe|mtt|tesla|sre2l|dwa|infer and evaluate it",
                   add_help=False)
    sub.add_parser("evaluate", help="train M fresh networks on a saved synthetic set (mean ± std)", add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("distill", "evaluate"):  # the runner owns its arguments
        from .distill import evaluate_main
        from .distill import main as distill_main

        return distill_main(argv[1:]) if argv[0] == "distill" else evaluate_main(argv[1:])
    if argv and argv[0] == "distill-digits":  # the example owns its arguments
        from .examples.digits import main as digits_main

        return digits_main(argv[1:])
    p_report = sub.add_parser("report", help="markdown table of a `ddfast bench` JSON file")
    p_report.add_argument("json", help="a file written by ddfast bench")
    p_validate = sub.add_parser("validate", help="info, tests, sanitizers and bench in one run; logs + SUMMARY.md into DIR")
    from .validate import add_arguments as _validate_arguments

    _validate_arguments(p_validate)
    args = parser.parse_args(argv)

    if args.command == "report":
        from .bench.report import main as report_main

        return report_main(args.json)
    if args.command == "validate":
        from .validate import main as validate_main

        return validate_main(args)
    if args.command == "info":
        from .info import info

        info(args.device)
        if args.kernels:
            from .info import print_kernels

            return print_kernels()
        return 0
    from .bench.cases import all_cases
    from .bench.runner import run

    if args.list:
        for case in all_cases():
            print(f"{case.name:48s} {'default' if case.default else 'full'}")
        return 0
    return run(full=args.full, device=args.device, select=args.select, out=args.out, min_repeats=args.repeats,
               min_seconds=args.min_seconds, plot_dir=args.plot, progress=not args.no_progress,
               compile_reference=args.compile_reference, compile_backend=args.compile_backend, kernels=args.kernels)


if __name__ == "__main__":
    sys.exit(main())
