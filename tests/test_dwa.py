"""DWA's directed weight adjustment against its formula, and a smoke run of the pipeline."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from ddfast.methods import dwa, get_method


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                      nn.Flatten(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 1.5)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _formula(model, x, y, rho, steps):
    """w_{k+1} = w_k + (ρ/K) · ∇L(w_k) / (‖∇L(w_k)‖₂ + 1e-12), all parameters in one norm, eval mode."""
    w = {k: v.clone() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(params):
        return F.cross_entropy(functional_call(model, {**params, **buffers}, (x,)), y)

    for _ in range(steps):
        g = grad(loss)(w)
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        w = {k: w[k] + (rho / steps) * g[k] / (norm + 1e-12) for k in w}
    return w


@pytest.mark.parametrize("steps", [1, 3])
def test_weight_adjustment_equals_formula_float64(steps):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    got = dwa.directed_weight_adjustment(model, x, y, rho=0.3, steps=steps)
    want = _formula(model, x, y, 0.3, steps)
    for name, p in got.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=1e-12, atol=1e-13)
        assert not p.requires_grad
    total = torch.sqrt(sum(((p - model.get_parameter(n)) ** 2).sum() for n, p in got.named_parameters()))
    if steps == 1:  # one step moves the weights by exactly rho
        assert total.item() == pytest.approx(0.3, rel=1e-9)
    for k, v in model.state_dict().items():  # the teacher itself is untouched
        assert torch.equal(v, before[k])
    assert not got.training


def test_perturbation_raises_the_loss():
    model = _model()
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    adjusted = dwa.directed_weight_adjustment(model, x, y, rho=0.05, steps=4)
    with torch.no_grad():
        assert F.cross_entropy(adjusted(x), y) > F.cross_entropy(model(x), y)


def test_bad_arguments():
    model = _model()
    x, y = torch.randn(2, 1, 5, 5, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="rho"):
        dwa.directed_weight_adjustment(model, x, y, rho=-1.0)
    with pytest.raises(ValueError, match="steps"):
        dwa.directed_weight_adjustment(model, x, y, steps=0)


def test_dwa_pipeline_smoke(tmp_path, monkeypatch):
    from ddfast.data import load_dataset

    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path))
    ds = load_dataset("digits")
    out = get_method("dwa").run(ds, 2, hparams=dict(iterations=3, squeeze_epochs=1, teacher_width=16, steps=2),
                                progress=False)
    assert out.images.shape == (20, 1, 8, 8) and out.labels.tolist() == [c for c in range(10) for _ in range(2)]
    div = out.extra["diversity"]
    assert div["pairwise_within_class"] > 0 and div["pairwise_all"] > 0
