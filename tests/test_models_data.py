"""ddfast.models (the DD networks) and ddfast.data (digits, .npz, ImageFolder; the real sampler)."""
import numpy as np
import pytest
import torch

from ddfast.data import RealData, load_dataset, load_npz, read_idx, stratified_split
from ddfast.models import ConvNet, ConvNetBN, ResNet, embed, get_network, has_batchnorm
from ddfast.ops.gradient_matcher import ConvNet as OpsConvNet


@pytest.mark.parametrize("name", ["convnet", "convnetbn", "convnetgn", "convnetln", "convnetnn", "resnet", "resnetbn"])
def test_every_network_classifies_and_embeds(name):
    net = get_network(name, 1, 10, (8, 8), width=8, depth=2)
    x = torch.randn(3, 1, 8, 8)
    assert net(x).shape == (3, 10)
    assert embed(net, x).shape[0] == 3 and net.classifier(embed(net, x)).shape == (3, 10)
    assert has_batchnorm(net) == name.endswith("bn")


def test_convnet_is_the_ops_class_not_a_copy():
    assert ConvNet is OpsConvNet
    assert isinstance(ConvNetBN(3, 10, 16, 2, (16, 16)).features[1], torch.nn.BatchNorm2d)
    assert sum(p.numel() for p in ResNet(3, 10, 8, 1).parameters()) > 0


def test_get_network_rejects_unknown_names():
    with pytest.raises(ValueError, match="name"):
        get_network("vgg", 1, 10, (8, 8))


def test_digits_dataset():
    ds = load_dataset("digits")
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.num_classes == 10 and len(ds.x_train) + len(ds.x_test) == 1797
    assert abs(ds.x_train.mean().item()) < 1e-5
    assert torch.allclose(ds.denormalize(ds.x_train).max(), torch.tensor(1.0), atol=1e-5)  # pixels/16 ≤ 1


def test_npz_with_and_without_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)  # NHWC uint8
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = load_npz(str(tmp_path / "a.npz"))
    assert ds.x_train.shape[1:] == (3, 6, 6) and len(ds.x_train) + len(ds.x_test) == 40
    assert torch.allclose(ds.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    np.savez(tmp_path / "b.npz", x=x[:, :, :, 0], y=y, x_test=x[:8, :, :, 0], y_test=y[:8])
    ds = load_dataset(str(tmp_path / "b.npz"))
    assert ds.x_train.shape == (40, 1, 6, 6) and ds.x_test.shape == (8, 1, 6, 6)
    np.savez(tmp_path / "c.npz", x=x, y=y.astype(np.float32))
    with pytest.raises(ValueError, match="y"):
        load_npz(str(tmp_path / "c.npz"))


def _write_idx(path, array, gz):
    import gzip
    import struct

    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    head = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open(str(path) + ".gz", "wb") if gz else open(path, "wb")) as f:
        f.write(head + array.tobytes())


def test_idx_folder_mnist_layout(tmp_path):
    """MNIST/Fashion-MNIST raw files, gzipped or not (torchvision's <Name>/raw): the official split, pixels/255."""
    rng = np.random.default_rng(0)
    root = tmp_path / "FashionMNIST" / "raw"
    root.mkdir(parents=True)
    x, x_te = rng.integers(0, 256, (30, 5, 7), dtype=np.uint8), rng.integers(0, 256, (6, 5, 7), dtype=np.uint8)
    y, y_te = np.arange(30, dtype=np.uint8) % 3, np.arange(6, dtype=np.uint8) % 3
    _write_idx(root / "train-images-idx3-ubyte", x, gz=True)
    _write_idx(root / "train-labels-idx1-ubyte", y, gz=True)
    _write_idx(root / "t10k-images-idx3-ubyte", x_te, gz=False)
    _write_idx(root / "t10k-labels-idx1-ubyte", y_te, gz=False)
    assert np.array_equal(read_idx(str(root / "t10k-images-idx3-ubyte")), x_te)
    ds = load_dataset(str(root))
    assert ds.name == "FashionMNIST" and ds.num_classes == 3
    assert ds.x_train.shape == (30, 1, 5, 7) and ds.x_test.shape == (6, 1, 5, 7)
    assert torch.equal(ds.y_train, torch.from_numpy(y.astype(np.int64)))
    assert torch.allclose(ds.denormalize(ds.x_test)[:, 0], torch.from_numpy(x_te / 255.0).float(), atol=1e-5)
    wide = np.arange(12, dtype=">i4").reshape(3, 4)  # a big-endian int32 payload reads as its values
    _write_idx(tmp_path / "w", wide, gz=False)
    assert read_idx(str(tmp_path / "w")).tolist() == wide.tolist()


def test_idx_files_that_are_not_idx_are_refused(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))
    _write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(str(tmp_path / "short"))


def test_image_folder(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((4, 4), 50 * i, dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(str(tmp_path))
    assert ds.class_names == ["cat", "dog"] and ds.x_train.shape[1:] == (1, 4, 4)
    assert len(ds.x_train) + len(ds.x_test) == 10


def test_unknown_dataset_is_never_downloaded():
    with pytest.raises(ValueError, match="never downloads"):
        load_dataset("cifar10")


def test_stratified_split_and_sampler():
    y = torch.arange(5).repeat_interleave(10)
    tr, te = stratified_split(y, 0.3, seed=1)
    assert torch.bincount(y[te]).tolist() == [3] * 5 and len(set(tr.tolist()) & set(te.tolist())) == 0
    real = RealData(torch.arange(50.).view(50, 1, 1, 1), y)
    a = real.get_images(2, 4, torch.Generator().manual_seed(0))
    b = real.get_images(2, 4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and ((a >= 20) & (a < 30)).all() and len(a.flatten().unique()) == 4
    assert real.get_images(2, 99).shape[0] == 10  # a class smaller than n: all of it
