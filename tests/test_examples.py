"""``ddfast distill-digits``: the alias of ``ddfast distill --dataset digits`` (no download)."""
import json

import torch

from ddfast.examples import digits


def test_digits_split_is_stratified_and_standardised():
    (x_tr, y_tr), (x_te, y_te) = digits.load_digits_split(seed=0)
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797
    assert torch.bincount(y_tr).min() > 100 and torch.bincount(y_te).min() > 40
    assert abs(x_tr.mean().item()) < 1e-5 and abs(x_tr.std().item() - 1) < 1e-3


def test_old_flags_translate_to_distill_flags():
    assert digits.translate(["--method", "dc", "--epochs", "5", "--epochs=7"]) == [
        "--dataset", "digits", "--method", "dc", "--eval-epochs", "5", "--eval-epochs=7"]


def test_cli_alias_runs_the_runner(tmp_path, capsys):
    from ddfast.cli import main

    out = tmp_path / "r.json"
    assert main(["distill-digits", "--ipc", "1", "--iterations", "2", "--epochs", "2", "--eval-models", "2",
                 "--no-baselines", "--no-progress", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["method"] == "dm" and summary["dataset"] == "digits" and summary["eval_epochs"] == 2
    assert summary["iterations"] == 2 and len(summary["distilled_accs"]) == 2
    assert "distilled" in capsys.readouterr().out
