"""Plots of a ``ddfast bench`` report: one PNG per op; speed-up, peak memory and dispatched ops per case and provider."""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List


def plot_report(report: Dict, out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    by_op = defaultdict(list)
    for row in report["results"]:
        by_op[row["case"].split("/", 1)[0]].append(row)
    paths = []
    for op, rows in sorted(by_op.items()):
        cases = sorted({r["case"] for r in rows}, key=lambda c: next((r.get("size") or 0) for r in rows if r["case"] == c))
        providers = [p for p in dict.fromkeys(r["provider"] for r in rows)]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        width = 0.8 / max(1, len(providers))
        for k, prov in enumerate(providers):
            sp, mem, ops = [], [], []
            for c in cases:
                r = next((r for r in rows if r["case"] == c and r["provider"] == prov), {})
                sp.append(r.get("speedup") or 0.0)
                mem.append(r.get("peak_mem_mb") or 0.0)
                ops.append(r.get("ops") or 0)
            xs = [i + k * width for i in range(len(cases))]
            axes[0].bar(xs, sp, width, label=prov)
            axes[1].bar(xs, mem, width, label=prov)
            axes[2].bar(xs, ops, width, label=prov)
        labels = [c.split("/", 1)[1] for c in cases]
        for ax, title in ((axes[0], "speed-up over reference (fwd+bwd, median)"), (axes[1], "peak memory (MB, CUDA)"),
                          (axes[2], "dispatched ops per fwd+bwd (launch proxy)")):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, rotation=20, ha="right", fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8)
        axes[0].axhline(1.0, color="gray", lw=0.8)
        if any(r.get("ops") for r in rows):
            axes[2].set_yscale("log")
        fig.suptitle(f"{op} — {report['device']} — commit {report['commit']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
