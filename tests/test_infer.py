"""INFER: budget accounting, compensator shapes (one shared perturbation per group), static labels, smoke run."""
import pytest
import torch
from torch import nn

from ddfast.methods import get_method, infer


def test_budget_matches_infer_accounting():
    b = infer.infer_budget(10, 100, 4)  # INFER's CIFAR-100 ipc 10: int(10 / 1.04) = 9 groups
    assert b == {"base_per_class": 9, "compensators": 36, "instances_per_compensator": 100,
                 "stored_images": 9 * 104, "budget_images": 1000, "instances": 9 * 100 * 5}
    b = infer.infer_budget(10, 10, 3)
    assert b["base_per_class"] == 7 and b["stored_images"] == 91 <= b["budget_images"] == 100
    assert b["instances"] == 7 * 10 * 4
    with pytest.raises(ValueError, match="ipc=1"):
        infer.infer_budget(1, 10, 3)
    assert infer.infer_budget(1, 10, 1, base=1)["stored_images"] == 11  # explicit, over budget by one
    with pytest.raises(ValueError, match="num_archs"):
        infer.infer_budget(10, 10, 0)


def test_compensated_set_instances():
    g, c, m = 2, 3, 2
    base = torch.randn(g, c, 1, 4, 4)
    ufc = torch.randn(g, m, 1, 4, 4)
    cset = infer.CompensatedSet(base, ufc)
    x, y = cset.instances()
    assert cset.stored_images() == g * c + g * m
    assert x.shape == (g * c * (m + 1), 1, 4, 4) and torch.bincount(y).tolist() == [g * (m + 1)] * c
    # class-major; within a class, group by group: the base image, then base + each compensator
    for cls in range(c):
        block = x[y == cls].reshape(g, m + 1, 1, 4, 4)
        for gi in range(g):
            torch.testing.assert_close(block[gi, 0], base[gi, cls])
            for mi in range(m):
                torch.testing.assert_close(block[gi, mi + 1], base[gi, cls] + ufc[gi, mi])


def test_one_compensator_is_shared_by_all_classes():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 3)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    base = torch.randn(3, 1, 6, 6)
    u, losses = infer.optimise_compensator(teacher, base, torch.arange(3), iterations=5, jitter=1)
    assert u.shape == (1, 1, 6, 6) and u.abs().sum() > 0 and len(losses) == 5
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="targets"):
        infer.optimise_compensator(teacher, base, torch.arange(2), iterations=1)


def test_infer_pipeline_smoke(tmp_path, monkeypatch):
    from ddfast.data import load_dataset

    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path))
    ds = load_dataset("digits")
    out = get_method("infer").run(ds, 2, hparams=dict(iterations=3, squeeze_epochs=1, teacher_width=16,
                                                        num_archs=1), progress=False)
    budget = out.extra["budget"]  # ipc 2, 10 classes, 1 architecture: 1 group + 1 compensator
    assert budget["base_per_class"] == 1 and budget["stored_images"] == 11 and budget["instances"] == 20
    assert out.images.shape == (20, 1, 8, 8) and out.labels.shape == (20, 10)
    # the labels are the teacher's logits on the instances (INFER distils them at T = 30) ...
    torch.testing.assert_close(out.labels, infer.static_soft_labels(out.teachers, out.images))
    torch.testing.assert_close(out.static_label_fn(out.images), out.labels)
    # ... or, without a label temperature, probabilities at the relabelling temperature
    probs = get_method("infer").run(ds, 2, hparams=dict(iterations=3, squeeze_epochs=1, teacher_width=16, num_archs=1,
                                                          eval_label_temperature=None), progress=False)
    torch.testing.assert_close(probs.labels, torch.softmax(out.labels / 4.0, 1))
    assert out.extra["label_storage"]["static_label_bytes"] == 20 * 10 * 2
    # the generated instances of a class differ from their base image by the one shared compensator
    x, y = out.images, torch.arange(10).repeat_interleave(2)  # class-major instances
    diffs = torch.stack([x[y == c][1] - x[y == c][0] for c in range(10)])
    torch.testing.assert_close(diffs, diffs[:1].expand_as(diffs), rtol=1e-5, atol=1e-5)


def test_mixup_interpolates_static_labels_like_the_images():
    from ddfast.methods import relabel

    values = torch.arange(1.0, 7.0)  # image i is the constant v_i (crops and flips keep it constant)
    images = values.view(6, 1, 1, 1).expand(6, 1, 4, 4).contiguous()
    labels = torch.eye(6)
    batch = relabel.mixup_static_batches(images, labels, alpha=0.8, scale=(0.5, 1.0))
    x, t = batch(0, torch.arange(6), torch.Generator().manual_seed(3))
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    # each target mixes two one-hot labels; the image mixes the same two values with the same weights
    torch.testing.assert_close(x.mean((1, 2, 3)), t @ values, rtol=1e-5, atol=1e-5)


def test_distill_scores_the_random_subset_with_the_methods_labels(tmp_path, monkeypatch):
    """A relabelling method's random-real baseline is evaluated with the same (teacher) labels."""
    import importlib

    runner = importlib.import_module("ddfast.distill")

    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path))
    seen = []

    from ddfast.evaluate import EvalResult

    def fake_evaluate(images, labels, dataset, **kwargs):
        seen.append((kwargs.get("desc"), labels.dtype, tuple(labels.shape), kwargs.get("mixup"),
                     {k: kwargs.get(k) for k in ("label_temperature", "optimizer", "lr", "weight_decay")}, labels))
        return EvalResult([50.0], 0.0, False)

    monkeypatch.setattr("ddfast.evaluate.evaluate", fake_evaluate)
    monkeypatch.setattr("ddfast.evaluate.full_train_accuracy", lambda *a, **k: EvalResult([90.0], 0.0, False))
    r = runner.distill("digits", "infer", 2, hparams=dict(iterations=2, squeeze_epochs=1, teacher_width=16,
                                                             num_archs=1), eval_models=1, eval_epochs=1,
                       progress=False)
    random_calls = [s for s in seen if s[0] == "evaluating random real"]
    assert random_calls and random_calls[0][1].is_floating_point and random_calls[0][2][1] == 10
    assert r.summary["random_labels"] == "static teacher labels"
    # INFER's students train with mixup of the static labels: the distilled set and its baseline alike
    assert {s[3] for s in seen} == {0.8} and r.summary["eval_mixup"] == 0.8
    # ... and INFER's student recipe (val_static.py): logit labels at T = 30, AdamW(1e-3, wd 0.01)
    recipe = dict(label_temperature=30.0, optimizer="adamw", lr=1e-3, weight_decay=0.01)
    assert len(seen) == 2 and all(s[4] == recipe for s in seen)
    assert r.summary["eval_label_temperature"] == 30.0 and r.summary["eval_optimizer"] == "adamw"
    for s in seen:  # the labels are the teachers' logits, not probabilities
        assert not torch.allclose(s[5].sum(1), torch.ones(s[5].shape[0]))
    torch.testing.assert_close(r.labels, seen[0][5].cpu())


def test_dynamic_labels_are_infer_dyn_for_both_sets(tmp_path, monkeypatch):
    """labels="dynamic" (INFER+Dyn, val_dyn.py): no stored labels; the teachers label every minibatch
    of the distilled set and of its random baseline alike; an unknown mode is refused."""
    import importlib

    from ddfast.data import load_dataset
    from ddfast.evaluate import EvalResult

    runner = importlib.import_module("ddfast.distill")
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path))
    hp = dict(iterations=2, squeeze_epochs=1, teacher_width=16, num_archs=1)
    out = get_method("infer").run(load_dataset("digits"), 2, hparams=dict(hp, labels="dynamic"), progress=False)
    assert out.static_label_fn is None and out.soft_label_fn is not None
    torch.testing.assert_close(out.soft_label_fn(out.images), infer.static_soft_labels(out.teachers, out.images))
    assert out.extra["label_storage"]["static_label_bytes"] == 0 and out.extra["label_storage"]["teacher_bytes_kept"]
    seen = []

    def fake_evaluate(images, labels, dataset, **kwargs):
        seen.append((kwargs.get("desc"), kwargs.get("soft_label_fn"), kwargs.get("mixup")))
        return EvalResult([50.0], 0.0, False)

    monkeypatch.setattr("ddfast.evaluate.evaluate", fake_evaluate)
    monkeypatch.setattr("ddfast.evaluate.full_train_accuracy", lambda *a, **k: EvalResult([90.0], 0.0, False))
    r = runner.distill("digits", "infer", 2, hparams=dict(hp, labels="dynamic"), eval_models=1, eval_epochs=1,
                       progress=False)
    assert [s[0] for s in seen] == ["evaluating distilled", "evaluating random real"]
    assert seen[0][1] is not None and seen[1][1] is seen[0][1] and {s[2] for s in seen} == {0.8}
    assert r.summary["random_labels"] == "teacher on the fly"
    with pytest.raises(ValueError, match="labels must be one of"):
        get_method("infer").run(load_dataset("digits"), 2, hparams=dict(hp, labels="bogus"), progress=False)
