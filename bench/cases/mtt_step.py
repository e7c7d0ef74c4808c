"""mtt_step cases: one mtt-distillation iteration (syn_steps student steps + loss, backward to the
images, the learning rate and soft labels), TrajectoryMatcher's modes against their references.

- ``.../sN``: reference = ``mode="unrolled"`` (distill.py's create_graph loop, memory linear in the
  steps), provider ``ddfast`` = ``mode="exact"`` (same gradient, reverse sweep over stored θ_i).
- ``.../sN-tesla``: reference = ``tesla_reference`` (TESLA's loop as its code runs), ``ddfast`` =
  ``mode="tesla"`` (the same approximation, θ_i recomputed instead of stored).
- ``datm-...``: DATM's CIFAR-100 ipc 10 setting (80 steps, 1000 images per step, learnable soft
  labels): unrolled does not fit a GPU there (~240 GB reported), so the reference is exact mode with
  ``checkpoint_every=8`` (another reverse-sweep schedule), ``ddfast`` is plain exact mode and
  variant ``micro100`` is exact mode with ``micro_batch=100`` (one step's graph bounded too).
Every call re-seeds torch's global generator, so reference and ddfast draw the same minibatches
and DSA parameters. ConvNet-3 with instance norm (mtt's default), DSA on (mtt's default strategy).
"""
import torch

import ddfast
from ddfast.ops.gradient_matcher import ConvNet
from ddfast.ops.trajectory_matcher import tesla_reference

from ..case import Case

DSA = "color_crop_cutout_flip_scale_rotate"


def _inputs(num_classes, ipc, width, depth, im, soft):
    def make(device):
        torch.manual_seed(0)
        model = ConvNet(3, num_classes, width=width, depth=depth, norm="instancenorm", im_size=im).to(device)
        start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        g = torch.Generator().manual_seed(0)
        target = start + 0.01 * torch.randn(start.shape, generator=g).to(device)
        images = torch.randn(num_classes * ipc, 3, im, im, generator=g).to(device).requires_grad_(True)
        labels = torch.arange(num_classes).repeat_interleave(ipc).to(device)
        if soft:  # DATM: learnable soft labels (initialised from an expert's logits there; here a sharpened one-hot)
            labels = torch.softmax(5 * torch.nn.functional.one_hot(labels, num_classes).float(), 1).requires_grad_(True)
        return {"model": model, "image_syn": images, "label_syn": labels,
                "syn_lr": torch.tensor(0.01, device=device, requires_grad=True), "start": start, "target": target}
    return make


def _matcher(mode, steps, batch_syn, **kw):
    def run(model, image_syn, label_syn, syn_lr, start, target):
        torch.manual_seed(1)
        tm = ddfast.TrajectoryMatcher(model, syn_steps=steps, batch_syn=batch_syn, mode=mode, dsa_strategy=DSA, **kw)
        return tm(image_syn, label_syn, syn_lr, start, target)
    return run


def _tesla_ref(steps, batch_syn):
    def run(model, image_syn, label_syn, syn_lr, start, target):
        torch.manual_seed(1)
        return tesla_reference(model, image_syn, label_syn, syn_lr, start, target, syn_steps=steps,
                               batch_syn=batch_syn, dsa_strategy=DSA)
    return run


def _fused(mode, steps, batch_syn, **kw):
    # provider "ddfast" (backend "auto"); variant "micro100": the same with micro_batch=100
    runs = {"auto": _matcher(mode, steps, batch_syn, **kw),
            "micro100": _matcher(mode, steps, batch_syn, micro_batch=100, **kw)}
    return lambda which, **inputs: runs[which](**inputs)


def cases():
    out = []
    configs = [  # label, classes, ipc, width, depth, px, steps, batch_syn, default
        ("convnet2-w16-c4-ipc2-16px-s5", 4, 2, 16, 2, 16, 5, None, True),
        ("convnet3-w32-c10-ipc10-32px-s20", 10, 10, 32, 3, 32, 20, None, False),  # CPU-sized
        ("convnet3-cifar10-ipc10-s20", 10, 10, 128, 3, 32, 20, None, False),
        ("convnet3-cifar10-ipc10-s40", 10, 10, 128, 3, 32, 40, None, False),
        ("convnet3-cifar10-ipc10-s80", 10, 10, 128, 3, 32, 80, None, False),
    ]
    for label, classes, ipc, width, depth, im, steps, batch_syn, default in configs:
        common = dict(make_inputs=_inputs(classes, ipc, width, depth, im, soft=False), backends=("auto",),
                      grad_inputs=("image_syn", "syn_lr"), default=default, size=steps, devices=("cpu", "cuda"))
        out.append(Case(name=f"mtt_step/{label}", reference=_matcher("unrolled", steps, batch_syn),
                        fused=_fused("exact", steps, batch_syn), tol=1e-3,
                        notes="reference = unrolled (distill.py's create_graph loop); ddfast = exact mode", **common))
        out.append(Case(name=f"mtt_step/{label}-tesla", reference=_tesla_ref(steps, batch_syn),
                        fused=_fused("tesla", steps, batch_syn), tol=1e-3,
                        notes="reference = TESLA's loop (tesla_reference); ddfast = tesla mode (approximate gradient)",
                        **common))
    out.append(Case(
        name="mtt_step/datm-cifar100-ipc10-s80-b1000",
        make_inputs=_inputs(100, 10, 128, 3, 32, soft=True),
        reference=_matcher("exact", 80, 1000, checkpoint_every=8),
        fused=_fused("exact", 80, 1000),
        backends=("auto",), variants=("micro100",), grad_inputs=("image_syn", "syn_lr", "label_syn"), default=False,
        tol=1e-3, size=80,
        notes="DATM CIFAR-100 ipc 10: 80 steps x 1000 images, soft labels; unrolled does not fit (~240 GB), "
              "reference = exact with checkpoint_every=8; micro100 = exact with micro_batch=100"))
    return out


# --- peak resident memory on the CPU (the runner reports CUDA peaks only) -------------------------

def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure_rss(classes, ipc, width, im, steps, batch_syn, mode, soft, repeats=1, **kw):
    """One process, one config: (peak RSS growth of the first iteration in MiB, seconds per iteration)."""
    import time

    inputs = _inputs(classes, ipc, width, 3, im, soft)(torch.device("cpu"))
    run = _matcher(mode, steps, batch_syn, **kw) if mode != "tesla-reference" else _tesla_ref(steps, batch_syn)
    base = _rss_kib("VmRSS")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(**inputs).backward()
        times.append(time.perf_counter() - t0)
    return (_rss_kib("VmHWM") - base) / 1024, min(times)


def compare_modes(steps, ipc, width, repeats, classes=10, im=32):
    """Seconds per iteration of unrolled / exact / tesla in one process, interleaved, best of ``repeats``."""
    import time

    inputs = _inputs(classes, ipc, width, 3, im, False)(torch.device("cpu"))
    runs = {mode: _matcher(mode, steps, None) for mode in ("unrolled", "exact", "tesla")}
    best = {mode: float("inf") for mode in runs}
    for _ in range(repeats):
        for mode, run in runs.items():
            t0 = time.perf_counter()
            run(**inputs).backward()
            best[mode] = min(best[mode], time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    # python -m ddfast.bench.cases.mtt_step CLASSES IPC WIDTH PX STEPS BATCH|none MODE hard|soft [REPEATS]
    #                                        [checkpoint_every=K] [micro_batch=M]
    # python -m ddfast.bench.cases.mtt_step compare STEPS IPC WIDTH REPEATS
    import sys

    if sys.argv[1] == "compare":
        st, ip, wd, rp = (int(a) for a in sys.argv[2:6])
        best = compare_modes(st, ip, wd, rp)
        print(f"steps={st} ipc={ip} width={wd} best of {rp}: " + ", ".join(f"{m} {t:.2f} s" for m, t in best.items())
              + f"; exact/unrolled {best['exact'] / best['unrolled']:.2f}, tesla/unrolled "
              f"{best['tesla'] / best['unrolled']:.2f}")
        sys.exit(0)
    c, i, w, px, s, b, mode, soft = sys.argv[1:9]
    extra = sys.argv[9:]
    reps = int(extra.pop(0)) if extra and "=" not in extra[0] else 1
    kw = {k: int(v) for k, v in (a.split("=") for a in extra)}
    mib, sec = measure_rss(int(c), int(i), int(w), int(px), int(s), None if b == "none" else int(b), mode,
                           soft == "soft", reps, **kw)
    print(f"classes={c} ipc={i} width={w} px={px} steps={s} batch_syn={b} mode={mode} {soft} {kw}: "
          f"peak RSS growth {mib:.0f} MiB, {sec:.2f} s/iteration (torch threads {torch.get_num_threads()})")
