"""The built-in digits distillation example (scikit-learn's bundled data, no download)."""
import subprocess
import sys

import pytest
import torch

from ddfast.examples import digits


def test_digits_split_is_stratified_and_standardised():
    (x_tr, y_tr), (x_te, y_te) = digits.load_digits_split(seed=0)
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797
    assert torch.bincount(y_tr).min() > 100 and torch.bincount(y_te).min() > 40
    assert abs(x_tr.mean().item()) < 1e-5 and abs(x_tr.std().item() - 1) < 1e-3


@pytest.mark.parametrize("method", ["dm", "dc"])
def test_distillation_lowers_its_loss(method):
    (x_tr, y_tr), _ = digits.load_digits_split(seed=0)
    x_syn, y_syn, losses = digits.distill(x_tr, y_tr, method=method, ipc=1, iterations=8, progress=False)
    assert x_syn.shape == (10, 1, 8, 8) and torch.equal(y_syn, torch.arange(10))
    assert all(torch.isfinite(torch.tensor(losses)))
    if method == "dm":  # DM's loss falls steadily; DC's fluctuates with the random network
        assert losses[-1] < losses[0]


def test_distilled_images_beat_random_real_ones_with_dm():
    r = digits.run("dm", ipc=1, iterations=60, epochs=100, seed=0, progress=False)
    assert r["loss_last"] < r["loss_first"]
    assert r["acc_distilled"] > r["acc_random_real"]
    assert 10 < r["acc_random_real"] and r["acc_full_train"] > 90


def test_cli_entry_point():
    res = subprocess.run([sys.executable, "-m", "ddfast.cli", "distill-digits", "--ipc", "1", "--iterations", "3",
                          "--epochs", "5", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "trained on distilled images" in res.stdout


def test_bad_method():
    (x_tr, y_tr), _ = digits.load_digits_split()
    with pytest.raises(ValueError, match="method"):
        digits.distill(x_tr, y_tr, method="mtt", iterations=1)
