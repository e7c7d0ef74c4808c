"""Per-seed table of the Fashion-MNIST 14×14 runs in runs/: each method against the random real subset
of the same size, evaluated the same way (the runner's baseline: same teacher labels, same recipe).

    python summary.py
"""
import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    rows = {}
    for path in sorted(glob.glob(os.path.join(HERE, "runs", "*.json"))):
        d = json.load(open(path))
        rows.setdefault((d["method"], d["ipc"]), []).append(d)
    for (method, ipc), runs in sorted(rows.items()):
        runs.sort(key=lambda d: d["seed"])
        diffs = [d["distilled_acc"] - d["random_acc"] for d in runs]
        per_seed = ", ".join(f"seed {d['seed']}: {d['distilled_acc']:.2f} vs {d['random_acc']:.2f} ({x:+.2f})"
                             for d, x in zip(runs, diffs))
        print(f"{method} ipc {ipc} ({runs[0]['n_images']} instances): {per_seed}; mean diff "
              f"{statistics.mean(diffs):+.2f}, ahead at {sum(x > 0 for x in diffs)}/{len(diffs)}")


if __name__ == "__main__":
    main()
