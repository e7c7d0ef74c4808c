"""ddfast.evaluate: batched (vmap) training equals sequential training network by network (float64),
soft labels and the relabelling hook, baselines, bad input."""
import pytest
import torch
import torch.nn.functional as F

import ddfast
from ddfast.data import load_dataset
from ddfast.evaluate import evaluate, random_subset

SMALL = dict(net_width=6, net_depth=1, num_models=3, epochs=4, batch_size=8)


@pytest.fixture(scope="module")
def data64():
    ds = load_dataset("digits")
    x, y = random_subset(ds.x_train.double(), ds.y_train, 2, seed=0)
    return x, y, (ds.x_test.double()[::3], ds.y_test[::3])


@pytest.mark.parametrize("dsa", [False, True])
def test_batched_equals_sequential_per_network_float64(data64, dsa):
    x, y, test = data64
    a, nets_a = evaluate(x, y, test, batched=True, dsa=dsa, return_networks=True, **SMALL)
    b, nets_b = evaluate(x, y, test, batched=False, dsa=dsa, return_networks=True, **SMALL)
    assert a.batched and not b.batched
    assert a.accuracies == b.accuracies
    torch.testing.assert_close(torch.tensor(a.train_losses), torch.tensor(b.train_losses), rtol=1e-12, atol=1e-12)
    for na, nb in zip(nets_a, nets_b):
        for pa, pb in zip(na.parameters(), nb.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-11, atol=1e-12)
    # the networks differ from each other (own init, data order, draws)
    assert not torch.equal(next(nets_a[0].parameters()), next(nets_a[1].parameters()))


def test_same_seed_same_accuracies_and_module_is_callable(data64):
    x, y, test = data64
    assert ddfast.evaluate(x, y, test, **SMALL).accuracies == evaluate(x, y, test, **SMALL).accuracies
    assert evaluate(x, y, test, seed=1, **SMALL).train_losses != evaluate(x, y, test, **SMALL).train_losses


def test_soft_labels_equal_hard_labels_when_one_hot(data64):
    x, y, test = data64
    hard = evaluate(x, y, test, **SMALL)
    soft = evaluate(x, F.one_hot(y, 10).double(), test, **SMALL)
    torch.testing.assert_close(torch.tensor(soft.train_losses), torch.tensor(hard.train_losses), rtol=1e-12, atol=0)


def test_soft_label_fn_relabels_every_batch(data64):
    x, y, test = data64
    seen = []

    def teacher(batch):
        seen.append(batch.shape[0])
        return F.one_hot(torch.full((batch.shape[0],), 3), 10).to(batch)

    res = evaluate(x, y, test, soft_label_fn=teacher, **dict(SMALL, epochs=30, num_models=2))
    assert sum(seen) == 2 * 30 * x.shape[0]
    assert res.accuracies == [pytest.approx(100.0 * (test[1] == 3).double().mean().item())] * 2


def test_batchnorm_networks_fall_back_to_sequential(data64):
    x, y, test = data64
    with pytest.warns(UserWarning, match="BatchNorm"):
        res = evaluate(x, y, test, model="convnetbn", **SMALL)
    assert not res.batched and len(res.accuracies) == 3


def test_bad_input(data64):
    x, y, test = data64
    tiny = dict(SMALL, epochs=1, num_models=1)  # a missed check must not start a long training run
    with pytest.raises(ValueError, match="labels"):
        evaluate(x, y[:-1], test, **tiny)
    with pytest.raises(ValueError, match="labels"):
        evaluate(x, y - 1, test, **tiny)
    with pytest.raises(ValueError, match="soft labels"):
        evaluate(x, torch.rand(len(x), 3, dtype=torch.float64), test, **tiny)
    with pytest.raises(TypeError, match="images"):
        evaluate(y, y, test, **tiny)
    with pytest.raises(ValueError, match="num_models"):
        evaluate(x, y, test, **dict(tiny, num_models=0))
    with pytest.raises(TypeError, match="test_set"):
        evaluate(x, y, test[0], **tiny)
    for bad in (-0.5, float("nan"), float("inf"), True, "0.8"):
        with pytest.raises(ValueError, match="mixup"):
            evaluate(x, y, test, mixup=bad, **tiny)


def test_mix_batch_interpolates_images_and_targets_from_the_generator_alone():
    from ddfast.evaluate import mix_batch

    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    state = torch.get_rng_state()
    xm, tm = mix_batch(x, y, 0.8, torch.Generator().manual_seed(3), 3)
    assert torch.equal(torch.get_rng_state(), state)  # no global draw: a user's run is undisturbed
    again = mix_batch(x, y, 0.8, torch.Generator().manual_seed(3), 3)
    assert torch.equal(xm, again[0]) and torch.equal(tm, again[1])
    # the formula, with λ and π drawn from the same generator in the same order
    import numpy as np

    g = torch.Generator().manual_seed(3)
    lam = float(np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=g))).beta(0.8, 0.8))
    perm = torch.randperm(6, generator=g)
    onehot = F.one_hot(y, 3).double()
    assert 0 < lam < 1
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm], rtol=0, atol=0)
    torch.testing.assert_close(tm, lam * onehot + (1 - lam) * onehot[perm], rtol=0, atol=0)
    # soft targets stay soft, interpolated the same way
    soft = torch.softmax(torch.randn(6, 3, dtype=torch.float64), 1)
    _, ts = mix_batch(x, soft, 0.8, torch.Generator().manual_seed(3), 3)
    torch.testing.assert_close(ts.sum(1), torch.ones(6, dtype=torch.float64))
    # int32 class ids mix like int64 ones; class ids need the one-hot width
    assert torch.equal(mix_batch(x, y.int(), 0.8, torch.Generator().manual_seed(3), 3)[1], tm)
    with pytest.raises(ValueError, match="num_classes"):
        mix_batch(x, y, 0.8, torch.Generator().manual_seed(3), None)


def test_mixup_evaluation_batched_equals_sequential_and_changes_training(data64):
    x, y, test = data64
    a = evaluate(x, y, test, batched=True, mixup=0.8, **SMALL)
    b = evaluate(x, y, test, batched=False, mixup=0.8, **SMALL)
    torch.testing.assert_close(torch.tensor(a.train_losses), torch.tensor(b.train_losses), rtol=1e-12, atol=1e-12)
    plain = evaluate(x, y, test, **SMALL)
    assert a.train_losses != plain.train_losses  # mixed targets: a different objective
    # a network with more outputs than the test labels reach: the one-hot width is the network's
    from ddfast.models import get_network

    few = (test[0][test[1] < 5], test[1][test[1] < 5])
    keep = y < 5
    res = evaluate(x[keep], y[keep], few, mixup=0.8, model=lambda: get_network("convnet", 1, 10, (8, 8), width=6,
                                                                               depth=1), **dict(SMALL, num_models=1))
    assert len(res.accuracies) == 1


def test_label_temperature_loss_is_hintons_distillation_loss_float64():
    from ddfast.evaluate import _soft_ce

    s = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 5, dtype=torch.float64) * 3
    for T in (1.0, 4.0, 30.0):
        loss = _soft_ce(s, t, T)
        kl = T ** 2 * F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
        entropy = -(F.softmax(t / T, 1) * F.log_softmax(t / T, 1)).sum(1).mean()
        torch.testing.assert_close(loss, kl + T ** 2 * entropy, rtol=1e-12, atol=1e-12)
        g, = torch.autograd.grad(loss, s)
        torch.testing.assert_close(g, T * (F.softmax(s / T, 1) - F.softmax(t / T, 1)) / 7, rtol=1e-12, atol=1e-14)
    # at a high temperature the gradient is logit matching: (s − t, centred) / C per row
    s0 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t0 = torch.randn(4, 5, dtype=torch.float64)
    g, = torch.autograd.grad(_soft_ce(s0, t0, 1e6), s0)
    d = s0.detach() - t0
    torch.testing.assert_close(g, (d - d.mean(1, keepdim=True)) / 5 / 4, rtol=1e-4, atol=1e-7)


def test_adamw_recipe_with_logit_labels_equals_a_plain_loop_float64(data64):
    """INFER's students: AdamW + per-epoch cosine rate, T² · KL on logits; the same as written out."""
    import math

    from ddfast.methods._common import derive_seed, generator, seeded_network
    from ddfast.models import get_network

    x, y, test = data64
    logits = torch.randn(len(x), 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4
    kw = dict(SMALL, num_models=1, epochs=5)
    res, (net,) = evaluate(x, logits, test, optimizer="adamw", lr=1e-3, weight_decay=0.01, label_temperature=30.0,
                           batched=False, return_networks=True, **kw)
    build = lambda: get_network("convnet", 1, 10, (8, 8), width=6, depth=1)  # noqa: E731
    ref = seeded_network(build, derive_seed(0, "eval-init", 0), "cpu").double()
    gen = generator(0, "eval-order", 0)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    ref.train()
    for _ in range(5):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 8):
            idx = order[i:i + 8]
            out = ref(x[idx])
            loss = 900.0 * F.kl_div(F.log_softmax(out / 30, 1), F.softmax(logits[idx] / 30, 1), reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert math.isfinite(res.train_losses[0])
    # batched (vmap) training follows the same recipe network by network
    a = evaluate(x, logits, test, optimizer="adamw", lr=1e-3, weight_decay=0.01, label_temperature=30.0, mixup=0.8,
                 batched=True, **SMALL)
    b = evaluate(x, logits, test, optimizer="adamw", lr=1e-3, weight_decay=0.01, label_temperature=30.0, mixup=0.8,
                 batched=False, **SMALL)
    torch.testing.assert_close(torch.tensor(a.train_losses), torch.tensor(b.train_losses), rtol=1e-10, atol=1e-12)


def test_bad_student_recipe(data64):
    x, y, test = data64
    tiny = dict(SMALL, epochs=1, num_models=1)
    logits = torch.randn(len(x), 10, dtype=torch.float64)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "30"):
        with pytest.raises(ValueError, match="label_temperature"):
            evaluate(x, logits, test, label_temperature=bad, **tiny)
    with pytest.raises(ValueError, match="label_temperature"):
        evaluate(x, y, test, label_temperature=30.0, **tiny)  # class ids are not logits
    with pytest.raises(ValueError, match="optimizer"):
        evaluate(x, y, test, optimizer="adam", **tiny)


def test_mixup_with_a_labeller_labels_the_mixed_images():
    """With soft_label_fn and mixup the labeller sees the mixed minibatch (SRe2L's relabelling,
    INFER's val_dyn.py), drawn from the network's generator as mix_images draws it."""
    from ddfast.evaluate import _Trainer, mix_images

    x = torch.randn(6, 1, 4, 4)
    seen = []

    def labeller(xb):
        seen.append(xb.clone())
        return torch.softmax(xb.mean((1, 2, 3)).unsqueeze(1) * torch.arange(3.0), 1)

    trainer = _Trainer(x, None, epochs=1, lr=0.1, batch_size=6, momentum=0.9, weight_decay=0.0, dsa_strategy=None,
                       align_corners=False, soft_label_fn=labeller, mixup=0.8, num_classes=3)
    (xb, tb), = list(trainer.batches(torch.Generator().manual_seed(5)))
    gen = torch.Generator().manual_seed(5)
    order = torch.randperm(6, generator=gen)
    want = mix_images(x[order], 0.8, gen)[0]
    torch.testing.assert_close(xb, want)
    torch.testing.assert_close(seen[0], want)
    torch.testing.assert_close(tb, labeller(want))
