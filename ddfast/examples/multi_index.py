"""Gradient-matching distillation of a multi-index task (after Kinoshita, Nishikawa & Toyoizumi,
"Dataset Distillation Efficiently Encodes Low-Dimensional Representations from Gradient-Based
Learning of Non-Linear Tasks").

Task: x ~ N(0, I_d), y = g(Uᵀx) with U (d × r) orthonormal — only an r-dimensional subspace of the
input matters (here g(z) = z₁ z₂ for r = 2, a sum of such products for larger r — a task whose
signal sits in the Hessian, invisible to linear correlation). Learner: a two-layer network
f(x) = aᵀ tanh(Wx + b) / √L trained by full-batch gradient descent on the squared loss from a
random symmetric initialisation (f ≡ 0 at the start). Distillation: m learnable points (x_i, y_i)
whose loss gradient w.r.t. (W, b, a) matches the real data's gradient (``ddfast.gradient_match``)
at fresh random initialisations and along the network's training on the distilled points (DC's
outer/inner loop, over the first ``match_steps`` steps of training). Reported, for each m:

* the principal angles between the top-r principal subspace of the distilled points and span(U)
  (random Gaussian points give angles near 90°);
* the test loss of networks trained on the distilled points, on m random real points, and on
  the whole real training set, with the variance of y (the loss of predicting the mean) for scale.

    python -m ddfast.examples.multi_index            # small default, well under a minute on a CPU
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch


@dataclass
class Task:
    U: torch.Tensor  # (d, r) orthonormal: the relevant subspace

    @property
    def d(self) -> int:
        return self.U.shape[0]

    @property
    def r(self) -> int:
        return self.U.shape[1]

    def target(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.U
        y = torch.zeros(len(x), dtype=x.dtype)
        for i in range(0, self.r - 1, 2):
            y = y + z[:, i] * z[:, i + 1]
        if self.r % 2:
            y = y + (z[:, -1] ** 2 - 1) / math.sqrt(2)
        return y

    def sample(self, n: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.d, generator=generator, dtype=self.U.dtype)
        return x, self.target(x)


def make_task(d: int, r: int, seed: int = 0, dtype=torch.float64) -> Task:
    if not 1 <= r <= d:
        raise ValueError(f"need 1 <= r <= d, got r={r}, d={d}")
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=dtype))
    return Task(q[:, :r].contiguous())


# --- the two-layer network, functional ---------------------------------------------------------

def init_params(d: int, width: int, generator: torch.Generator, dtype=torch.float64) -> List[torch.Tensor]:
    """Symmetric initialisation (neurons in pairs with opposite output weights): f ≡ 0 at init, so
    the first-layer gradient is −a_j E[y σ'(w_j·x + b_j) x], which for this task lies close to
    E[∇²y] w_j ∈ span(U) (the low-dimensional signal the theory says distillation encodes)."""
    if width % 2:
        raise ValueError(f"width must be even (neurons come in symmetric pairs), got {width}")
    w = torch.randn(width // 2, d, generator=generator, dtype=dtype) / math.sqrt(d)
    b = torch.randn(width // 2, generator=generator, dtype=dtype)
    a = torch.randn(width // 2, generator=generator, dtype=dtype)
    return [torch.cat([w, w]), torch.cat([b, b]), torch.cat([a, -a])]


def forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w, b, a = params
    return torch.tanh(x @ w.T + b) @ a / math.sqrt(len(a))


def mse(params, x, y) -> torch.Tensor:
    return 0.5 * ((forward(params, x) - y) ** 2).mean()


def train(params, x, y, steps: int, lr: float, create_graph: bool = False) -> List[torch.Tensor]:
    """Full-batch gradient descent (the learner the points are distilled for)."""
    params = [p.detach().clone().requires_grad_(True) for p in params] if not create_graph else list(params)
    for _ in range(steps):
        grads = torch.autograd.grad(mse(params, x, y), params, create_graph=create_graph)
        params = [p - lr * g for p, g in zip(params, grads)]
        if not create_graph:
            params = [p.detach().requires_grad_(True) for p in params]
    return [p.detach() for p in params]


# --- distillation by gradient matching ---------------------------------------------------------

def distill(task: Task, m: int, *, n_real: int = 4096, width: int = 64, outer: int = 40, steps: int = 10,
            lr_net: float = 0.5, lr_syn: float = 0.05, metric: str = "mse", seed: int = 0,
            x_real=None, y_real=None) -> Tuple[torch.Tensor, torch.Tensor, List[float]]:
    """m distilled points: at each outer iteration a fresh network, trained on the distilled points
    for ``steps`` gradient steps (the start of the learner's training, where the first layer picks
    up the relevant subspace); before each step, match the gradient of the loss on the distilled
    points to the real one (``ddfast.gradient_match``) and update the points (Adam)."""
    import ddfast

    g = torch.Generator().manual_seed(seed)
    if x_real is None:
        x_real, y_real = task.sample(n_real, g)
    x_syn = (0.1 * torch.randn(m, task.d, generator=g, dtype=task.U.dtype)).requires_grad_(True)
    y_syn = torch.zeros(m, dtype=task.U.dtype, requires_grad=True)
    opt = torch.optim.Adam([x_syn, y_syn], lr=lr_syn)
    losses = []
    for _ in range(outer):
        params = [p.requires_grad_(True) for p in init_params(task.d, width, g, task.U.dtype)]
        for _ in range(steps):
            g_real = torch.autograd.grad(mse(params, x_real, y_real), params)
            g_syn = torch.autograd.grad(mse(params, x_syn, y_syn), params, create_graph=True)
            loss = ddfast.gradient_match(list(g_syn), list(g_real), metric=metric)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            params = [p.requires_grad_(True) for p in train(params, x_syn.detach(), y_syn.detach(), 1, lr_net)]
    return x_syn.detach(), y_syn.detach(), losses


# --- measurements --------------------------------------------------------------------------------

def principal_angles(points: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the top-r right-singular subspace of
    ``points`` (m × d) and span(U) (d × r)."""
    r = U.shape[1]
    _, _, vh = torch.linalg.svd(points, full_matrices=False)
    basis = vh[:r].T
    cos = torch.linalg.svdvals(basis.T @ U).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos)).sort().values


def relevant_energy(points: torch.Tensor, U: torch.Tensor) -> float:
    """Fraction of the points' squared norm inside span(U) (r/d for isotropic points)."""
    return ((points @ U).pow(2).sum() / points.pow(2).sum()).item()


def test_loss(task: Task, x, y, *, width: int, steps: int, lr: float, n_test: int, seeds: int, seed: int) -> float:
    """Mean test MSE (½(f − y)²) of ``seeds`` networks trained on (x, y) from random inits."""
    x_te, y_te = task.sample(n_test, torch.Generator().manual_seed(seed + 10_000))
    out = []
    for s in range(seeds):
        params = train(init_params(task.d, width, torch.Generator().manual_seed(seed + 20_000 + s)), x, y, steps, lr)
        with torch.no_grad():
            out.append(mse(params, x_te, y_te).item())
    return sum(out) / len(out)


def run(d: int = 16, r: int = 2, ms: Sequence[int] = (2, 4, 8, 16), *, width: int = 64, outer: int = 40,
        match_steps: int = 10, train_steps: int = 300, lr_net: float = 0.5, n_real: int = 4096, seeds: int = 3,
        seed: int = 0) -> Dict:
    task = make_task(d, r, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_real, y_real = task.sample(n_real, g)
    eval_kw = dict(width=width, steps=train_steps, lr=lr_net, n_test=4096, seeds=seeds, seed=seed)
    rows = []
    for m in ms:
        x_syn, y_syn, losses = distill(task, m, width=width, outer=outer, steps=match_steps, lr_net=lr_net,
                                       seed=seed + m, x_real=x_real, y_real=y_real)
        pick = torch.randperm(n_real, generator=torch.Generator().manual_seed(seed + 2 + m))[:m]
        x_rand, y_rand = x_real[pick], y_real[pick]
        rows.append({
            "m": m, "match_first": losses[0], "match_last": sum(losses[-match_steps:]) / match_steps,
            "angles_distilled": principal_angles(x_syn, task.U).tolist(),
            "angles_random_real": principal_angles(x_rand, task.U).tolist(),
            "energy_distilled": relevant_energy(x_syn, task.U), "energy_random_real": relevant_energy(x_rand, task.U),
            "test_loss_distilled": test_loss(task, x_syn, y_syn, **eval_kw),
            "test_loss_random_real": test_loss(task, x_rand, y_rand, **eval_kw),
        })
    return {"d": d, "r": r, "width": width, "n_real": n_real, "rows": rows,
            "test_loss_full_real": test_loss(task, x_real, y_real, **eval_kw),
            "test_loss_mean_predictor": 0.5 * task.sample(4096, torch.Generator().manual_seed(seed + 3))[1].var().item(),
            }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.examples.multi_index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--r", type=int, default=2)
    parser.add_argument("--m", type=int, nargs="+", default=[2, 4, 8, 16], help="numbers of distilled points")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--outer", type=int, default=40, help="distillation iterations (fresh networks)")
    parser.add_argument("--match-steps", type=int, default=10, help="learner steps matched per network")
    parser.add_argument("--train-steps", type=int, default=300, help="gradient steps of the learner")
    parser.add_argument("--lr-net", type=float, default=0.5, help="learning rate of the learner")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    res = run(a.d, a.r, a.m, width=a.width, outer=a.outer, match_steps=a.match_steps,
              train_steps=a.train_steps, lr_net=a.lr_net, seed=a.seed)
    print(f"multi-index task: d={res['d']}, r={res['r']}, two-layer tanh network of width {res['width']}, "
          f"{res['n_real']} real points")
    print(f"test loss: full real set {res['test_loss_full_real']:.4f}, mean predictor "
          f"{res['test_loss_mean_predictor']:.4f}")
    print(" m | principal angles to span(U), distilled | random real  | energy in span(U) dist/rand "
          "| test loss distilled | random real")
    for row in res["rows"]:
        ang_d = ", ".join(f"{v:4.1f}" for v in row["angles_distilled"])
        ang_r = ", ".join(f"{v:4.1f}" for v in row["angles_random_real"])
        print(f"{row['m']:2d} | {ang_d:>38} | {ang_r:>12} | {row['energy_distilled']:.2f} / "
              f"{row['energy_random_real']:.2f}               | {row['test_loss_distilled']:.4f}              "
              f"| {row['test_loss_random_real']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
