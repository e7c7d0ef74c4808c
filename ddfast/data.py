"""Datasets for the distillation runner: nothing is ever downloaded (SPEC 7).

``load_dataset(spec)`` returns a ``Dataset`` (train/test tensors, normalised per channel with the
training set's statistics):

* ``"digits"`` — scikit-learn's bundled digits (1797 8×8 grey images, 10 classes, shipped with
  scikit-learn), pixels / 16, a stratified 70/30 train/test split fixed by ``split_seed``.
* a ``.npz`` file with ``x`` and ``y`` (optionally ``x_test``, ``y_test``; without them the same
  stratified split is made). ``x``: (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3};
  integer pixels are divided by 255.
* a directory laid out like torchvision's ImageFolder: ``root/<class>/*.png`` (or ``root/train/<class>``
  and ``root/test/<class>``), read with PIL when installed, else matplotlib. Classes are the sorted
  sub-directory names; all images must have the same size.
* a directory holding the four IDX files of MNIST-style datasets (MNIST, Fashion-MNIST, KMNIST, as
  their authors and torchvision's ``<root>/<Name>/raw`` ship them): ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
  gzipped; the official train/test split, pixels / 255.

``RealData`` is the real-image sampler every method draws from: per-class index lists and
``get_images(c, n, generator)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Dataset:
    """Normalised train/test tensors. ``mean``/``std``: per-channel statistics that were removed."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    class_names: List[str] = field(default_factory=list)

    @property
    def channel(self) -> int:
        return self.x_train.shape[1]

    @property
    def im_size(self) -> Tuple[int, int]:
        return tuple(self.x_train.shape[2:])

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                       self.y_test.to(device), self.num_classes, self.mean, self.std, self.class_names)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return x * self.std.to(x).view(shape) + self.mean.to(x).view(shape)


def stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train index, test index): ``round(n_c · test_fraction)`` random test images per class."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return torch.cat(train_idx), torch.cat(test_idx)


def _finish(name, x_tr, y_tr, x_te, y_te, class_names=None, per_channel: bool = True) -> Dataset:
    dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
    mean = x_tr.mean(dim=dims).expand(x_tr.shape[1]).clone()
    std = x_tr.std(dim=dims).expand(x_tr.shape[1]).clone().clamp_min(1e-8)
    norm = lambda x: (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # noqa: E731
    num_classes = int(max(y_tr.max(), y_te.max() if len(y_te) else 0)) + 1
    return Dataset(name, norm(x_tr).contiguous(), y_tr, norm(x_te).contiguous(), y_te, num_classes, mean, std,
                   list(class_names or [str(c) for c in range(num_classes)]))


def load_digits(split_seed: int = 0, test_fraction: float = 0.3) -> Dataset:
    """scikit-learn's bundled 8×8 digits (no download), pixels/16, standardised with the train statistics."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:  # a dependency of ddfast; say what is missing
        raise ImportError("the 'digits' dataset needs scikit-learn (pip install scikit-learn)") from exc
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, te = stratified_split(y, test_fraction, split_seed)
    return _finish("digits", x[tr], y[tr], x[te], y[te], per_channel=False)


def _to_nchw(name: str, x: np.ndarray) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise ValueError(f"{name} must be (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.float() / 255.0 if not t.is_floating_point() else t.float()


def _labels(name: str, y: np.ndarray, n: int) -> torch.Tensor:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError(f"{name} must hold {n} non-negative integer labels, got shape {y.shape} dtype {y.dtype}")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path: str, split_seed: int = 0, test_fraction: float = 0.3) -> Dataset:
    """A local ``.npz`` with ``x``, ``y`` and optionally ``x_test``, ``y_test``."""
    with np.load(path) as f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise ValueError(f"{path} must contain arrays 'x' and 'y' (missing {sorted(missing)}); has {f.files}")
        x, y = _to_nchw("x", f["x"]), None
        y = _labels("y", f["y"], x.shape[0])
        if "x_test" in f.files and "y_test" in f.files:
            x_te = _to_nchw("x_test", f["x_test"])
            y_te = _labels("y_test", f["y_test"], x_te.shape[0])
            if x_te.shape[1:] != x.shape[1:]:
                raise ValueError(f"x_test images are {tuple(x_te.shape[1:])}, x images {tuple(x.shape[1:])}")
            return _finish(os.path.basename(path), x, y, x_te, y_te)
    tr, te = stratified_split(y, test_fraction, split_seed)
    return _finish(os.path.basename(path), x[tr], y[tr], x[te], y[te])


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_path(root: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def read_idx(path: str) -> np.ndarray:
    """One IDX file (LeCun's MNIST format; ``.gz`` read through gzip): magic 0 0 dtype ndim, big-endian dims."""
    import gzip

    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = 4 + 4 * ndim
    if len(data) - body != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} of {dtype}, the file holds {len(data) - body} bytes")
    return np.frombuffer(data, dtype=dtype, offset=body).reshape(dims).copy()  # writable, native order


def is_idx_folder(root: str) -> bool:
    return os.path.isdir(root) and all(_idx_path(root, stem) for stem in IDX_FILES)


def read_idx_folder(root: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The raw arrays of an IDX folder: train images, train labels, test images, test labels."""
    x, y, x_te, y_te = (read_idx(_idx_path(root, stem)) for stem in IDX_FILES)
    return x, y, x_te, y_te


def load_idx_folder(root: str) -> Dataset:
    """MNIST-style IDX files (module doc): the official train/test split."""
    x, y, x_te, y_te = read_idx_folder(root)
    x, x_te = _to_nchw("train images", x), _to_nchw("t10k images", x_te)
    if x_te.shape[1:] != x.shape[1:]:
        raise ValueError(f"t10k images are {tuple(x_te.shape[1:])}, train images {tuple(x.shape[1:])}")
    name = os.path.basename(root.rstrip("/"))
    if name == "raw":  # torchvision's <root>/<Name>/raw: name it after <Name>
        name = os.path.basename(os.path.dirname(root.rstrip("/")))
    return _finish(name, x, _labels("train labels", y, x.shape[0]), x_te, _labels("t10k labels", y_te, x_te.shape[0]))


def _read_image(path: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        import matplotlib.image as mpimg

        img = np.asarray(mpimg.imread(path))
        img = img[..., :3] if img.ndim == 3 and img.shape[2] == 4 else img
        return (img * 255).round().astype(np.uint8) if img.dtype.kind == "f" else img
    with Image.open(path) as im:
        return np.asarray(im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"))


def _read_folder(root: str, class_names: Optional[List[str]] = None):
    classes = class_names or sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root} has no class sub-directories (expected root/<class>/*.png)")
    images, labels = [], []
    for c, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)) if os.path.isdir(folder) \
            else []
        for f in files:
            images.append(_read_image(os.path.join(folder, f)))
            labels.append(c)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images under {root} must all have the same size, found {sorted(shapes)[:4]}")
    return _to_nchw("images", np.stack(images)), torch.tensor(labels), classes


def load_image_folder(root: str, split_seed: int = 0, test_fraction: float = 0.3) -> Dataset:
    """ImageFolder layout: ``root/<class>/*`` (split here) or ``root/train/<class>`` + ``root/test/<class>``."""
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        x, y, classes = _read_folder(train_dir)
        x_te, y_te, _ = _read_folder(test_dir, classes)
        return _finish(os.path.basename(root.rstrip("/")), x, y, x_te, y_te, classes)
    x, y, classes = _read_folder(root)
    tr, te = stratified_split(y, test_fraction, split_seed)
    return _finish(os.path.basename(root.rstrip("/")), x[tr], y[tr], x[te], y[te], classes)


def load_dataset(spec: str = "digits", *, split_seed: int = 0, device="cpu") -> Dataset:
    """``"digits"``, a ``.npz`` path, an IDX folder or an ImageFolder directory (module doc). Never downloads."""
    if not isinstance(spec, str):
        raise TypeError(f"dataset must be 'digits' or a path, got {type(spec).__name__}")
    if spec == "digits":
        ds = load_digits(split_seed)
    elif is_idx_folder(spec):
        ds = load_idx_folder(spec)
    elif os.path.isdir(spec):
        ds = load_image_folder(spec, split_seed)
    elif os.path.isfile(spec) and spec.endswith(".npz"):
        ds = load_npz(spec, split_seed)
    else:
        raise ValueError(f"dataset must be 'digits', a .npz file, an IDX folder or an ImageFolder directory; "
                         f"{spec!r} is none (ddfast never downloads data)")
    return ds.to(device)


class RealData:
    """The real training images, indexed per class: what every method samples from."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: Optional[int] = None):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
        self.x, self.y = x, y
        self.num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
        y_cpu = y.cpu()
        self.indices = [(y_cpu == c).nonzero().flatten() for c in range(self.num_classes)]

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "RealData":
        return cls(ds.x_train, ds.y_train, ds.num_classes)

    def count(self, c: int) -> int:
        return len(self.indices[c])

    def get_images(self, c: int, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` random images of class ``c`` without replacement (all of them if the class has fewer)."""
        idx = self.indices[c]
        pick = idx[torch.randperm(len(idx), generator=generator)[:n]]
        return self.x[pick.to(self.x.device)]

    def get_batch(self, n_per_class: int, generator_for_class) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images of every class (class order), class c drawn with ``generator_for_class(c)``."""
        xs = [self.get_images(c, n_per_class, generator_for_class(c)) for c in range(self.num_classes)]
        ys = [torch.full((len(x),), c, dtype=torch.long, device=self.y.device) for c, x in enumerate(xs)]
        return torch.cat(xs), torch.cat(ys)
