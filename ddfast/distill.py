"""The end-to-end runner: distil a dataset with any registered method, then evaluate it (SPEC 7).

    ddfast distill --dataset digits --method dm --ipc 10 --json out.json --plot out.png --save syn.pt
    ddfast evaluate syn.pt --models 20 --batched

    import ddfast
    result = ddfast.distill("digits", method="dm", ipc=10)
    result.images, result.labels, result.summary["distilled_acc"]

Steps: load the data (``ddfast.data.load_dataset``; never a download); build the method with its
default hyper-parameters for the data (overridable with ``hparams``); for iterative methods
``init_synthetic`` then ``step`` per iteration (tqdm shows the loss), with the add-ons MIM4DD
(``mim4dd=λ``) and low-rank images (``low_rank=r``) composed in; pipeline methods run whole. Then
``ddfast.evaluate`` trains ``eval_models`` fresh networks on the result, on a random real subset of
the same size and (cached) on the full training set, and a summary table is printed.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

__all__ = ["distill", "DistillResult", "main", "evaluate_main"]


@dataclass
class DistillResult:
    images: torch.Tensor
    labels: torch.Tensor
    losses: List[float]
    summary: Dict[str, Any] = field(default_factory=dict)
    soft_label_fn: Any = None


def _resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def _eval_settings(hp: dict, eval_dsa: Optional[bool]) -> dict:
    dsa = bool(hp.get("dsa_strategy")) if eval_dsa is None else bool(eval_dsa)
    return {"model": hp.get("model", "convnet"), "net_width": hp.get("net_width"), "net_depth": hp.get("net_depth"),
            "dsa": dsa, "align_corners": bool(hp.get("align_corners", False)),
            "mixup": float(hp.get("eval_mixup", 0.0))}  # INFER: its students train with mixup


def student_recipe(hp: dict) -> dict:
    """A method's own student training (INFER: AdamW, logit labels at T = 30), as ``evaluate`` keywords;
    empty for DC's recipe, so cached baselines keep their keys."""
    out = {}
    if hp.get("eval_label_temperature") is not None:
        out["label_temperature"] = float(hp["eval_label_temperature"])
    if hp.get("eval_optimizer", "sgd") != "sgd":
        out["optimizer"] = hp["eval_optimizer"]
    for key in ("lr", "weight_decay"):
        if hp.get("eval_" + key) is not None:
            out[key] = float(hp["eval_" + key])
    return out


def _run_iterative(cls, ds, real, ipc, hp, *, seed, device, model, mim4dd, low_rank, iterations, progress):
    from tqdm import trange

    from .methods._common import MIM4DDAddon

    probe = cls(ds, hp, seed=seed, device=device, model=model)
    addons = [MIM4DDAddon(mim4dd, probe.feature_dim(), seed=seed, device=device)] if mim4dd else []
    method = cls(ds, hp, seed=seed, device=device, model=model, addons=addons)
    syn = method.init_synthetic(real, ipc, low_rank=low_rank)
    losses = []
    bar = trange(iterations, desc=f"{cls.name} ipc {ipc}", disable=not progress)
    for it in bar:
        loss = float(method.step(it, real, syn))
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4g}")
    with torch.no_grad():
        images = syn.images().detach().clone()
    extra = {"syn_lr": float(syn.lr.detach())} if syn.lr is not None else {}
    return images, syn.labels.clone(), losses, None, extra


def distill(dataset: Any = "digits", method: str = "dm", ipc: int = 10, *, iterations: Optional[int] = None,
            seed: int = 0, device: Optional[str] = None, mim4dd: Optional[float] = None,
            low_rank: Optional[int] = None, hparams: Optional[dict] = None, model: str = "convnet",
            evaluate: bool = True, eval_models: int = 5, eval_epochs: int = 300, eval_dsa: Optional[bool] = None,
            batched: bool = True, baselines: bool = True, full_models: int = 2, full_epochs: int = 30,
            progress: bool = True, save: Optional[str] = None, json_path: Optional[str] = None,
            plot: Optional[str] = None) -> DistillResult:
    """Distil ``dataset`` with ``method`` at ``ipc`` images per class and evaluate it (module doc).

    dataset: "digits", a .npz path, an MNIST-style IDX folder, an ImageFolder directory, or a
        ``ddfast.data.Dataset``.
    iterations: distillation iterations (default: the method's default for the data).
    mim4dd: weight λ of the MIM4DD contrastive term (None: off). low_rank: rank r of the low-rank
    image parameterisation at the same storage (None: full images).
    hparams: overrides of the method's default hyper-parameters.
    eval_*: networks and epochs of the evaluation; eval_dsa: DSA while evaluating (default: when
    the method distils with DSA). baselines: also evaluate a random real subset of the same size
    and (cached) the full training set with ``full_models`` networks × ``full_epochs`` (0 networks:
    skipped, e.g. a large local dataset on a CPU).
    """
    import ddfast

    from .data import Dataset, RealData, load_dataset
    from .evaluate import evaluate as evaluate_fn
    from .evaluate import cached_evaluate, full_train_accuracy, random_subset
    from .methods import get_method, is_pipeline

    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0):
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    if isinstance(full_models, bool) or not isinstance(full_models, int) or full_models < 0:
        raise ValueError(f"full_models must be a non-negative int (0 skips the full-data baseline), got {full_models!r}")
    if low_rank is not None and (isinstance(low_rank, bool) or not isinstance(low_rank, int) or low_rank < 1):
        raise ValueError(f"low_rank must be a positive int rank, got {low_rank!r}")
    if mim4dd is not None and not (isinstance(mim4dd, (int, float)) and mim4dd > 0):
        raise ValueError(f"mim4dd must be a positive weight, got {mim4dd!r}")
    dev = _resolve_device(device)
    cls = get_method(method)
    ds = dataset.to(dev) if isinstance(dataset, Dataset) else load_dataset(dataset, device=dev)
    hp = cls.default_hparams(ds, ipc)
    hp.update(hparams or {})
    iterations = int(hp.get("iterations", 0)) if iterations is None else iterations
    hp["iterations"] = iterations

    t0 = time.perf_counter()
    static_fn = None
    if is_pipeline(cls):
        if mim4dd or low_rank:
            raise ValueError(f"--mim4dd and --low-rank apply to iterative methods, not to {method!r}")
        out = cls.run(ds, ipc, hparams=hp, seed=seed, device=dev, progress=progress)
        images, labels, losses, soft_fn, extra = out.images, out.labels, list(out.losses), out.soft_label_fn, \
            dict(out.extra)
        static_fn = getattr(out, "static_label_fn", None)  # INFER: x -> the teachers' static soft labels
    else:
        images, labels, losses, soft_fn, extra = _run_iterative(
            cls, ds, RealData.from_dataset(ds), ipc, hp, seed=seed, device=dev, model=model, mim4dd=mim4dd,
            low_rank=low_rank, iterations=iterations, progress=progress)
    seconds_distill = time.perf_counter() - t0

    summary: Dict[str, Any] = {
        "method": cls.name, "dataset": ds.name, "ipc": ipc, "n_images": int(images.shape[0]), "iterations": iterations,
        "seed": seed, "mim4dd": mim4dd, "low_rank": low_rank, "seconds_distill": seconds_distill,
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "ddfast_version": ddfast.__version__, "torch_version": torch.__version__,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "hparams": {k: v for k, v in hp.items() if isinstance(v, (int, float, str, bool, type(None)))}, **extra,
    }
    if evaluate:
        ev = _eval_settings(dict(hp, model=model), eval_dsa)
        recipe = student_recipe(hp)
        common = dict(model=ev["model"], net_width=ev["net_width"], net_depth=ev["net_depth"], num_models=eval_models,
                      epochs=eval_epochs, seed=seed, batched=batched, progress=progress, dsa=ev["dsa"],
                      align_corners=ev["align_corners"], mixup=ev["mixup"], **recipe)
        t1 = time.perf_counter()
        res = evaluate_fn(images, labels, ds, soft_label_fn=soft_fn, desc="evaluating distilled", **common)
        summary.update(distilled_acc=res.mean, distilled_acc_std=res.std, distilled_accs=res.accuracies,
                       seconds_eval=time.perf_counter() - t1, eval_models=eval_models, eval_epochs=eval_epochs,
                       eval_dsa=ev["dsa"], eval_mixup=ev["mixup"], eval_batched=res.batched,
                       **{"eval_" + k: v for k, v in recipe.items()})
        if baselines:
            x_r, y_r = random_subset(ds.x_train, ds.y_train, ipc, seed)
            if soft_fn is None and static_fn is None:
                rnd = cached_evaluate("random", x_r, y_r, ds, desc="evaluating random real", **common)
            else:  # a relabelling method: the random subset gets the same teacher labels (like for like)
                with torch.no_grad():
                    y_eval = static_fn(x_r.to(dev)).to(x_r.device) if static_fn is not None else y_r
                rnd = evaluate_fn(x_r, y_eval, ds, soft_label_fn=soft_fn, desc="evaluating random real", **common)
                summary["random_labels"] = "static teacher labels" if static_fn is not None else "teacher on the fly"
            summary.update(random_acc=rnd.mean, random_acc_std=rnd.std)
            if full_models > 0:  # 0: skipped (a large local dataset on a CPU)
                full = full_train_accuracy(ds, model=ev["model"], net_width=ev["net_width"],
                                           net_depth=ev["net_depth"], num_models=full_models, epochs=full_epochs,
                                           seed=seed, batched=batched, progress=progress)
                summary.update(full_acc=full.mean, full_acc_std=full.std, full_models=full_models,
                               full_epochs=full_epochs)
    result = DistillResult(images.cpu(), labels.cpu(), losses, summary, soft_fn)
    if progress or save or json_path or plot:
        print(format_summary(summary))
    if save:
        torch.save({"images": result.images, "labels": result.labels, "method": cls.name,
                    "args": {"dataset": dataset if isinstance(dataset, str) else ds.name, "ipc": ipc, "seed": seed,
                             "iterations": iterations, "mim4dd": mim4dd, "low_rank": low_rank, "model": model,
                             "hparams": summary["hparams"], "mean": ds.mean, "std": ds.std}}, save)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
    if plot:
        save_plot(plot, ds.denormalize(result.images) if result.images.shape[1] == ds.channel else result.images,
                  result.labels, losses, title=f"{cls.name.upper()} · {ds.name} · ipc {ipc}")
    return result


def format_summary(s: dict) -> str:
    """A small table of one run."""
    def pct(key):
        if key not in s:
            return "—"
        std = s.get(key + "_std")
        return f"{s[key]:6.2f}" + (f" ± {std:.2f}" if std is not None else "")

    extras = "".join(f", {k} {s[k]}" for k in ("mim4dd", "low_rank") if s.get(k))
    rows = [f"{s['method'].upper()} on {s['dataset']}, ipc {s['ipc']} ({s['n_images']} images){extras}, "
            f"{s['iterations']} iterations, device {s['device']}",
            f"  {'distilled':<12} {pct('distilled_acc'):>16} %",
            f"  {'random real':<12} {pct('random_acc'):>16} %",
            f"  {'full train':<12} {pct('full_acc'):>16} %",
            f"  distill {s['seconds_distill']:.1f} s" + (f", evaluate {s['seconds_eval']:.1f} s" if 'seconds_eval' in s
                                                         else "")]
    return "\n".join(rows)


def save_plot(path: str, images: torch.Tensor, labels: torch.Tensor, losses: List[float], title: str = "") -> None:
    """PNG: the synthetic images (one row per class) and the loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hard = labels if not labels.is_floating_point() else labels.argmax(1)
    classes = sorted(set(hard.tolist()))
    per_class = max(int((hard == c).sum()) for c in classes)
    cols = min(per_class, 10)
    fig = plt.figure(figsize=(cols * 0.9 + 4, len(classes) * 0.9 + 0.5))
    grid = fig.add_gridspec(len(classes), cols + 5)
    imgs = images.detach().float().cpu()
    lo, hi = float(imgs.min()), float(imgs.max())
    for r, c in enumerate(classes):
        members = imgs[hard == c][:cols]
        for k in range(members.shape[0]):
            ax = fig.add_subplot(grid[r, k])
            im = members[k]
            im = im[0] if im.shape[0] == 1 else im.permute(1, 2, 0)
            ax.imshow(((im - lo) / max(hi - lo, 1e-12)).numpy(), cmap="gray" if im.dim() == 2 else None)
            ax.axis("off")
    ax = fig.add_subplot(grid[:, cols + 1:])
    ax.plot(losses)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def build_parser(prog: str = "ddfast distill") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Distil a dataset with a DD method and evaluate it")
    p.add_argument("--dataset", default="digits", help="'digits', a .npz file, an IDX folder (MNIST-style) or an ImageFolder directory")
    p.add_argument("--method", default="dm",
                   help="dc, dsa, dm, cafe, mtt, tesla, sre2l, dwa, infer (and any registered method)")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    p.add_argument("--iterations", type=int, default=None, help="distillation iterations (default: the method's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--model", default="convnet", help="network (ddfast.models.get_network name)")
    p.add_argument("--mim4dd", type=float, default=None, metavar="LAMBDA", help="add MIM4DD's NCE term, weight λ")
    p.add_argument("--low-rank", type=int, default=None, metavar="R", help="low-rank images of rank R (same storage)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a hyper-parameter")
    p.add_argument("--eval-models", type=int, default=5)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--eval-dsa", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--sequential", action="store_true", help="evaluate the networks one after the other")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--full-models", type=int, default=2, metavar="N",
                   help="networks of the whole-training-set baseline (30 epochs each; 0 skips it)")
    p.add_argument("--save", default=None, metavar="OUT.pt")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    p.add_argument("--no-progress", action="store_true")
    return p


def _parse_overrides(items: List[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        if value.lower() in ("true", "false"):  # flags (flip, fuse_batchnorm, ...): "false" is not a truthy string
            out[key] = value.lower() == "true"
            continue
        for conv in (int, float):
            try:
                out[key] = conv(value)
                break
            except ValueError:
                continue
        else:
            out[key] = None if value.lower() in ("none", "") else value
    return out


def main(argv=None, prog: str = "ddfast distill") -> int:
    a = build_parser(prog).parse_args(argv)
    distill(a.dataset, a.method, a.ipc, iterations=a.iterations, seed=a.seed, device=a.device, mim4dd=a.mim4dd,
            low_rank=a.low_rank, hparams=_parse_overrides(a.set), model=a.model, evaluate=not a.no_eval,
            eval_models=a.eval_models, eval_epochs=a.eval_epochs,
            eval_dsa=None if a.eval_dsa == "auto" else a.eval_dsa == "on", batched=not a.sequential,
            baselines=not a.no_baselines, full_models=a.full_models, progress=not a.no_progress, save=a.save,
            json_path=a.json, plot=a.plot)
    return 0


def evaluate_main(argv=None) -> int:
    """``ddfast evaluate SYN.pt``: M fresh networks on a saved synthetic set, mean ± std accuracy."""
    from .data import load_dataset
    from .evaluate import evaluate

    p = argparse.ArgumentParser(prog="ddfast evaluate", description=evaluate_main.__doc__)
    p.add_argument("syn", help="a file written by `ddfast distill --save`")
    p.add_argument("--dataset", default=None, help="test data (default: the one the set was distilled from)")
    p.add_argument("--models", type=int, default=5, help="networks to train")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--model", default=None, help="network name (default: the distillation's)")
    p.add_argument("--dsa", action="store_true", help="DSA on every training minibatch")
    p.add_argument("--mixup", type=float, default=None, metavar="ALPHA",
                   help="Beta(α, α) mixup of every minibatch, targets interpolated (0: off; default: the "
                        "distillation's eval_mixup, 0.8 for INFER, else 0)")
    p.add_argument("--label-temperature", type=float, default=None, metavar="T",
                   help="the labels are logits distilled at T (default: the distillation's, 30 for INFER)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="student optimiser (default: the distillation's; INFER: adamw, else DC's sgd)")
    p.add_argument("--lr", type=float, default=None, help="student learning rate (default: the recipe's)")
    p.add_argument("--weight-decay", type=float, default=None, help="student weight decay (default: the recipe's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--batched", dest="batched", action="store_true", default=True, help="all networks at once")
    g.add_argument("--sequential", dest="batched", action="store_false", help="one network after the other")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    blob = torch.load(a.syn, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or "images" not in blob or "labels" not in blob:
        raise SystemExit(f"{a.syn} is not a synthetic set saved by ddfast distill (needs 'images' and 'labels')")
    args = blob.get("args", {})
    dev = _resolve_device(a.device)
    ds = load_dataset(a.dataset or args.get("dataset", "digits"), device=dev)
    hp = args.get("hparams", {})
    mixup = float(hp.get("eval_mixup", 0.0)) if a.mixup is None else a.mixup
    recipe = student_recipe(hp)
    for key, value in (("label_temperature", a.label_temperature), ("optimizer", a.optimizer), ("lr", a.lr),
                       ("weight_decay", a.weight_decay)):
        if value is not None:
            recipe[key] = value
    res = evaluate(blob["images"].to(dev), blob["labels"].to(dev), ds, model=a.model or args.get("model", "convnet"),
                   net_width=hp.get("net_width"), net_depth=hp.get("net_depth"), num_models=a.models, epochs=a.epochs,
                   dsa=a.dsa, seed=a.seed, batched=a.batched, progress=not a.no_progress,
                   mixup=mixup, **recipe)
    print(f"{blob.get('method', '?')} synthetic set {tuple(blob['images'].shape)} on {ds.name}: {res}")
    print("  per network: " + ", ".join(f"{x:.2f}" for x in res.accuracies))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"method": blob.get("method"), "accuracies": res.accuracies, "mean": res.mean, "std": res.std,
                       "seconds": res.seconds, "batched": res.batched, "epochs": a.epochs,
                       "dsa": a.dsa, "mixup": mixup, **recipe}, f, indent=2)
    return 0


class _CallableModule(type(json)):
    """``ddfast.distill`` is both this module and the function: once the submodule is imported the
    package attribute is the module, so calling it forwards to ``distill()``."""

    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
