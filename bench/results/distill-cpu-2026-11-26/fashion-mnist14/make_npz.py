"""Fashion-MNIST at 14×14 with 600 training images per class, as an .npz for ``ddfast distill``.

A harder local dataset than the bundled digits on which a 2-core CPU still runs INFER at ipc 10 in
about 20 minutes: the official IDX files (read by ``ddfast.data.load_idx_folder``; Debian ships them
in the ``dataset-fashion-mnist`` package under /usr/share/datasets/fashion-mnist), each image
average-pooled 2×2 to 14×14, 600 training images per class drawn with seed 0, the whole official
test set (10,000). Pixels stay in [0, 1]; ddfast normalises with the training statistics.

    python make_npz.py /usr/share/datasets/fashion-mnist fmnist14-600.npz
"""
import sys

import numpy as np

from ddfast.data import read_idx_folder


def pool2(x: np.ndarray) -> np.ndarray:
    n, h, w = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2).astype(np.float32).mean(axis=(2, 4)) / 255.0


def main(root: str, out: str, per_class: int = 600, seed: int = 0) -> None:
    x, y, x_te, y_te = read_idx_folder(root)
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(10)])
    keep.sort()
    np.savez_compressed(out, x=pool2(x[keep]), y=y[keep].astype(np.int64), x_test=pool2(x_te),
                        y_test=y_te.astype(np.int64))
    print(f"{out}: {len(keep)} train, {len(y_te)} test, 14x14")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
