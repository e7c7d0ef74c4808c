"""INFER against its random subset at ipc 10, paired by seed (same seed: same teacher, same subset draw,
same evaluation networks' seeds). Reads the runner JSONs ``ufc-1000it/infer-ipc10-seed*.json`` and,
for seeds 0-3, ``diagnostics.log`` (INFER from its ``ufc_lr=0.25 iters=1000`` lines, the random subset
from its first eight lines: the same sets and evaluation as the runner with the current defaults).

    python paired.py [DIR]

Prints each seed's pair, the mean difference, its standard error, the paired t statistic, a
bootstrap 95 % interval of the mean difference (10 000 resamples of the seeds) and the exact
two-sided sign-test p-value."""
import ast
import glob
import json
import math
import os
import sys

import numpy as np


def load(folder):
    rows = []
    for path in glob.glob(os.path.join(folder, "infer-ipc10-seed*.json")):
        with open(path) as f:
            d = json.load(f)
        rows.append((d["seed"], d["distilled_acc"], d["random_acc"]))
    return sorted(rows)


def load_diagnostics(path):
    """{seed: (infer, random)} from diagnostics.log lines ``{options} which acc ± std % ...``."""
    infer, rand = {}, {}
    with open(path) as f:
        for line in f:
            if not line.startswith("{"):
                continue
            opts, rest = line[:line.index("}") + 1], line[line.index("}") + 1:].split()
            opts, which, acc = ast.literal_eval(opts), rest[0], float(rest[1])
            base = {"seed", "T", "opt", "lr", "wd"}
            if which == "random" and set(opts) == base:
                rand[int(opts["seed"])] = acc
            elif which == "infer" and set(opts) == base | {"ufc_lr", "iters", "which"} \
                    and opts["ufc_lr"] == "0.25" and opts["iters"] == "1000":
                infer[int(opts["seed"])] = acc
    return {s: (infer[s], rand[s]) for s in sorted(infer) if s in rand}


def sign_test_p(wins: int, n: int) -> float:
    k = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "ufc-1000it")
    rows = load(folder)
    seen = {seed for seed, _, _ in rows}
    diag = os.path.join(os.path.dirname(os.path.abspath(folder)), "diagnostics.log")
    if os.path.exists(diag):
        rows = sorted(rows + [(s, i, r) for s, (i, r) in load_diagnostics(diag).items() if s not in seen])
    for seed, infer, rand in rows:
        print(f"seed {seed:2d}: INFER {infer:6.2f}  random {rand:6.2f}  diff {infer - rand:+.2f}")
    d = np.array([i - r for _, i, r in rows])
    n = len(d)
    se = d.std(ddof=1) / math.sqrt(n)
    boot = np.random.default_rng(0).choice(d, size=(10_000, n)).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    wins = int((d > 0).sum())
    print(f"{n} seeds: INFER {np.mean([i for _, i, _ in rows]):.2f}, random {np.mean([r for _, _, r in rows]):.2f}; "
          f"mean diff {d.mean():+.3f} (se {se:.3f}, t = {d.mean() / se:.2f}); bootstrap 95 % [{lo:+.3f}, {hi:+.3f}]; "
          f"INFER ahead at {wins}/{n}, sign test p = {sign_test_p(wins, n):.3f}")


if __name__ == "__main__":
    main()
