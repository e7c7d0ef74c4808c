"""ddfast.distill and ddfast.methods: every method on a tiny setting, DC/DM steps against the
reference loops (float64), determinism, the add-ons, the registry's two method shapes, the outputs."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import ddfast
from ddfast.data import RealData, load_dataset
from ddfast.methods import DistillOutput, derive_seed, get_method, register
from ddfast.methods._common import MIM4DDAddon

TINY = dict(outer_loop=2, inner_loop=1, batch_real=8, batch_train=256, net_width=8, net_depth=1, num_experts=1,
            expert_train_epochs=3, syn_steps=2, max_start_epoch=1, expert_epochs=1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits64(digits):
    return dataclasses.replace(digits, x_train=digits.x_train.double(), x_test=digits.x_test.double())


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "cafe", "mtt", "tesla"])
def test_every_method_runs_and_changes_the_images(digits, method):
    r = ddfast.distill(digits, method, 1, iterations=2, hparams=TINY, evaluate=False, progress=False)
    start, _ = ddfast.methods._common.initial_images(RealData.from_dataset(digits), 1, "real", 0)
    assert r.images.shape == (10, 1, 8, 8) and torch.equal(r.labels, torch.arange(10))
    assert len(r.losses) == 2 and all(torch.isfinite(torch.tensor(r.losses)))
    assert not torch.equal(r.images, start)


def _distance_wb(gr, gs):  # DatasetCondensation's distance_wb, written out
    if gr.dim() == 1:
        return torch.zeros((), dtype=gr.dtype)
    gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
    return torch.sum(1 - torch.sum(gr * gs, -1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6))


def test_dc_step_equals_the_reference_class_loop(digits64):
    hp = dict(get_method("dc").default_hparams(digits64, 2), **dict(TINY, outer_loop=1))
    real = RealData.from_dataset(digits64)
    dc = get_method("dc")(digits64, hp, seed=3)
    syn = dc.init_synthetic(real, 2)
    x = syn.images().detach().clone().requires_grad_(True)
    net = dc.new_network(0)  # what step(0) builds
    x_real, y_real = dc.real_batch(real, hp["batch_real"], 0, 0)
    params = list(net.parameters())
    loss = 0
    for c in range(10):
        gw_real = torch.autograd.grad(F.cross_entropy(net(x_real[y_real == c]), y_real[y_real == c]), params)
        gw_syn = torch.autograd.grad(F.cross_entropy(net(x[syn.labels == c]), syn.labels[syn.labels == c]), params,
                                     create_graph=True)
        loss = loss + sum(_distance_wb(r.detach(), s) for r, s in zip(gw_real, gw_syn))
    loss.backward()
    got = dc.step(0, real, syn)
    torch.testing.assert_close(got, loss.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(syn.images().detach(), x.detach() - hp["lr_img"] * x.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dsa", [False, True])
def test_dm_step_equals_the_reference_class_loop(digits64, dsa):
    from ddfast.compat.dc import DiffAugment, ParamDiffAug
    from ddfast.methods._common import DSA_STRATEGY, class_seeds

    hp = dict(get_method("dm").default_hparams(digits64, 2), **TINY, dsa_rng="reference",
              dsa_strategy=DSA_STRATEGY if dsa else None)
    real = RealData.from_dataset(digits64)
    dm = get_method("dm")(digits64, hp, seed=5)
    syn = dm.init_synthetic(real, 2)
    x = syn.images().detach().clone().requires_grad_(True)
    net = dm.new_network(1)
    x_real, y_real = dm.real_batch(real, hp["batch_real"], 1)
    seeds = class_seeds(5, 10, 1)
    loss = 0
    for c in range(10):  # DM's main loop: one DSA seed per class for its real and synthetic images
        img_real, img_syn = x_real[y_real == c], x[syn.labels == c]
        if dsa:
            img_real = DiffAugment(img_real, DSA_STRATEGY, seed=seeds[c], param=ParamDiffAug())
            img_syn = DiffAugment(img_syn, DSA_STRATEGY, seed=seeds[c], param=ParamDiffAug())
        out_real = net.features(img_real).flatten(1).detach()
        out_syn = net.features(img_syn).flatten(1)
        loss = loss + torch.sum((out_real.mean(0) - out_syn.mean(0)) ** 2)
    loss.backward()
    got = dm.step(1, real, syn)
    torch.testing.assert_close(got, loss.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(syn.images().detach(), x.detach() - hp["lr_img"] * x.grad, rtol=1e-9, atol=1e-9)


def test_same_seed_same_set_and_seeds_do_not_depend_on_order(digits):
    a = ddfast.distill(digits, "dm", 1, iterations=3, hparams=TINY, evaluate=False, progress=False, seed=7)
    b = ddfast.distill(digits, "dm", 1, iterations=3, hparams=TINY, evaluate=False, progress=False, seed=7)
    c = ddfast.distill(digits, "dm", 1, iterations=3, hparams=TINY, evaluate=False, progress=False, seed=8)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert derive_seed(7, 3, 2, "real") == derive_seed(7, 3, 2, "real") != derive_seed(7, 3, 1, "real")


def test_low_rank_holds_more_images_in_the_same_storage(digits):
    r = ddfast.distill(digits, "dm", 1, iterations=2, hparams=TINY, low_rank=2, evaluate=False, progress=False)
    assert r.images.shape[0] == 10 * ddfast.low_rank_budget_ipc(1, 8, 8, 2)
    assert torch.linalg.matrix_rank(r.images[:, 0].double(), rtol=1e-4).max() <= 2  # float32 products


def test_mim4dd_addon_adds_its_term_and_trains_its_heads(digits):
    addon = MIM4DDAddon(0.5, 8 * 6 * 6, seed=0)
    net = ddfast.models.get_network("convnet", 1, 10, (8, 8), width=8, depth=1)
    i_syn, i_real = torch.arange(0, 1200, 60), torch.arange(7, 1200, 30)  # every class on both sides
    x_syn = digits.x_train[i_syn].clone().requires_grad_(True)
    term = addon.term(net, x_syn, digits.y_train[i_syn], digits.x_train[i_real], digits.y_train[i_real])
    head = addon.syn_heads[0].weight.detach().clone()
    addon.zero_grad()
    term.backward()
    addon.step()
    assert term.item() > 0 and x_syn.grad.abs().sum() > 0 and not torch.equal(head, addon.syn_heads[0].weight)
    plain = ddfast.distill(digits, "dm", 1, iterations=2, hparams=TINY, evaluate=False, progress=False)
    mim = ddfast.distill(digits, "dm", 1, iterations=2, hparams=TINY, mim4dd=0.5, evaluate=False, progress=False)
    assert mim.losses[0] > plain.losses[0]  # same first network and batch, plus a positive NCE term


class _ConstantPipeline:
    name, kind = "constant-test", "pipeline"

    @classmethod
    def default_hparams(cls, dataset, ipc=10):
        return {"iterations": 0, "net_width": 8, "net_depth": 1}

    @classmethod
    def run(cls, dataset, ipc, *, hparams, seed, device, progress=True):
        x = dataset.x_train[: ipc * dataset.num_classes]
        soft = torch.full((x.shape[0], dataset.num_classes), 1.0 / dataset.num_classes)
        return DistillOutput(x, soft, [1.0], soft_label_fn=lambda b: F.one_hot(torch.zeros(len(b), dtype=torch.long),
                                                                             10).to(b))


def test_registry_accepts_pipeline_methods_and_soft_labels(digits, tmp_path):
    register("constant-test", _ConstantPipeline)
    r = ddfast.distill(digits, "constant-test", 1, eval_models=2, eval_epochs=10, baselines=False, progress=False,
                       json_path=str(tmp_path / "s.json"), save=str(tmp_path / "s.pt"), plot=str(tmp_path / "s.png"))
    assert r.labels.dtype == torch.float32 and r.summary["method"] == "constant-test"
    # the teacher says "class 0" for every batch, so the networks learn to answer 0 (≈10% test accuracy)
    assert r.summary["distilled_acc"] < 15
    saved = torch.load(tmp_path / "s.pt", weights_only=False)
    assert set(saved) == {"images", "labels", "method", "args"} and (tmp_path / "s.png").stat().st_size > 1000
    keys = json.loads((tmp_path / "s.json").read_text())
    assert {"method", "ipc", "distilled_acc", "distilled_acc_std", "seconds_distill", "seconds_eval", "device",
            "ddfast_version"} <= set(keys)
    with pytest.raises(ValueError, match="iterative"):
        ddfast.distill(digits, "constant-test", 1, low_rank=2, progress=False)


def test_bad_arguments(digits):
    with pytest.raises(ValueError, match="method"):
        ddfast.distill(digits, "nope", 1)
    with pytest.raises(ValueError, match="ipc"):
        ddfast.distill(digits, "dm", 0)
    with pytest.raises(ValueError, match="low_rank"):
        ddfast.distill(digits, "dm", 1, low_rank=0)
    with pytest.raises(ValueError, match="mim4dd"):
        ddfast.distill(digits, "dm", 1, mim4dd=-1.0)
    with pytest.raises(ValueError, match="full_models"):
        ddfast.distill(digits, "dm", 1, full_models=-1)
    with pytest.raises(TypeError, match="step"):
        register("broken-test", type("Broken", (), {}))
        get_method("broken-test")


def test_full_models_zero_keeps_the_random_baseline_and_skips_the_full_one(tmp_path, monkeypatch):
    from ddfast import evaluate as ev
    from ddfast.cli import main

    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "cache"))
    called = []
    monkeypatch.setattr(ev, "full_train_accuracy", lambda *a, **k: called.append(1))
    out = tmp_path / "r.json"
    assert main(["distill", "--method", "dm", "--ipc", "1", "--iterations", "1", "--eval-models", "1",
                 "--eval-epochs", "1", "--set", "net_width=8", "--set", "net_depth=1", "--full-models", "0",
                 "--no-progress", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert "random_acc" in summary and "full_acc" not in summary and not called


def test_cli_distill_then_evaluate(tmp_path, capsys):
    from ddfast.cli import main

    syn = tmp_path / "syn.pt"
    assert main(["distill", "--method", "dm", "--ipc", "1", "--iterations", "2", "--no-eval", "--no-progress",
                 "--set", "net_width=8", "--set", "net_depth=1", "--save", str(syn)]) == 0
    assert main(["evaluate", str(syn), "--models", "2", "--epochs", "2", "--sequential", "--no-progress",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert "2 networks" in capsys.readouterr().out
    plain = json.loads((tmp_path / "e.json").read_text())
    assert len(plain["accuracies"]) == 2
    # a set saved with eval_mixup (INFER's default) is re-evaluated with it unless --mixup says otherwise
    blob = torch.load(syn, weights_only=False)
    blob["args"]["hparams"]["eval_mixup"] = 0.8
    torch.save(blob, syn)
    runs = {}
    for extra in ([], ["--mixup", "0"]):
        assert main(["evaluate", str(syn), "--models", "2", "--epochs", "2", "--sequential", "--no-progress",
                     "--json", str(tmp_path / "e.json")] + extra) == 0
        runs[tuple(extra)] = json.loads((tmp_path / "e.json").read_text())
    assert plain["mixup"] == 0.0 and runs[()]["mixup"] == 0.8 and runs[("--mixup", "0")]["mixup"] == 0.0
    assert runs[("--mixup", "0")]["accuracies"] == plain["accuracies"]
    # ... and with the saved student recipe (INFER's: AdamW, logit labels at T = 30) unless flags say otherwise
    blob["labels"] = torch.randn(blob["labels"].shape[0], 10)  # logits
    blob["args"]["hparams"].update(eval_mixup=0.0, eval_label_temperature=30.0, eval_optimizer="adamw", eval_lr=1e-3,
                                   eval_weight_decay=0.01)
    torch.save(blob, syn)
    for extra in ([], ["--optimizer", "sgd", "--lr", "0.01", "--weight-decay", "5e-4", "--label-temperature", "4"]):
        assert main(["evaluate", str(syn), "--models", "1", "--epochs", "1", "--sequential", "--no-progress",
                     "--json", str(tmp_path / "e.json")] + extra) == 0
        runs[tuple(extra)] = json.loads((tmp_path / "e.json").read_text())
    assert {k: runs[()][k] for k in ("label_temperature", "optimizer", "lr", "weight_decay")} == \
        dict(label_temperature=30.0, optimizer="adamw", lr=1e-3, weight_decay=0.01)
    flags = runs[tuple(extra)]
    assert (flags["optimizer"], flags["lr"], flags["label_temperature"]) == ("sgd", 0.01, 4.0)
