"""``ddfast bench``: check every op against its reference, then time forward+backward.

For each case: build inputs, run the reference and every available ddfast provider once and
compare outputs and gradients (a mismatch fails the run), then time each provider (warm-up
excluded, CUDA-synchronised, median of repeats), with peak memory on CUDA. The device's copy
bandwidth and matmul peak are measured in the same run so GB/s and TFLOP/s come with the
fraction of peak. Writes JSON (device, torch, commit, peaks, results, speedups) and optional plots.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from .case import Case
from .cases import select_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- device facts ---------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], None], device: torch.device, min_repeats: int, min_seconds: float,
                 max_repeats: int = 1000) -> List[float]:
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_seconds):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure_peaks(device: torch.device) -> Dict[str, float]:
    """Copy bandwidth (GB/s, read+write) and matmul throughput (TFLOP/s) measured now."""
    n = (256 if device.type == "cuda" else 32) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = min(_median_time(lambda: dst.copy_(src), device, 5, 0.2))
    peaks = {"copy_gbs": 2 * n * 4 / t / 1e9}
    m = 8192 if device.type == "cuda" else 1024
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    for dt in dtypes:
        a = torch.randn(m, m, device=device, dtype=dt)
        b = torch.randn(m, m, device=device, dtype=dt)
        a @ b
        t = min(_median_time(lambda: a @ b, device, 3, 0.2))
        key = "matmul_tflops_" + str(dt).replace("torch.", "")
        peaks[key] = 2 * m**3 / t / 1e12
    del src, dst
    return peaks


# --- checking ---------------------------------------------------------------------------------

def _run_step(fn: Callable[[], torch.Tensor], inputs: Dict, grad_names, collect: bool = True):
    for name in grad_names:
        inputs[name].grad = None
    out = fn()
    if out.requires_grad:
        out.backward(torch.ones_like(out))
    if not collect:
        return None
    grads = {name: (inputs[name].grad.detach().clone() if inputs[name].grad is not None else None)
             for name in grad_names}
    return out.detach(), grads


def _rel_err(got: Optional[torch.Tensor], want: Optional[torch.Tensor]) -> float:
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    if got.shape != want.shape:
        return float("inf")
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    return err / max(scale, 1e-30)


def check(case: Case, inputs: Dict, ref: tuple, fn: Callable[[], torch.Tensor]) -> tuple:
    got = _run_step(fn, inputs, case.grad_inputs)
    errs = [_rel_err(got[0], ref[0])] + [_rel_err(got[1][k], ref[1][k]) for k in case.grad_inputs]
    worst = max(errs)
    return worst <= case.tol, worst


# --- running ------------------------------------------------------------------------------

def providers_for(case: Case, device: torch.device) -> Dict[str, Callable]:
    import ddfast
    from ddfast import _backend

    ddfast.op_modules()
    provs: Dict[str, Callable] = {}
    for backend in case.backends:
        if backend == "auto":
            provs["ddfast"] = lambda inputs, b=backend: case.fused(b, **inputs)
            continue
        if backend == "triton" and device.type == "cpu":
            continue  # the Triton interpreter is for correctness tests, not timing
        if case.op is not None and not _backend.available(case.op, backend, device):
            continue
        name = _backend.provider_name(backend, device)
        provs[name] = lambda inputs, b=backend: case.fused(b, **inputs)
    for variant in case.variants:  # e.g. GradientMatcher strategies: fused(variant, **inputs)
        provs[variant] = lambda inputs, v=variant: case.fused(v, **inputs)
    return provs


def run_case(case: Case, device: torch.device, peaks: Dict[str, float], min_repeats: int, min_seconds: float) -> List[Dict]:
    rows = []
    inputs = case.make_inputs(device)
    ref_fn = lambda: case.reference(**inputs)  # noqa: E731
    ref = _run_step(ref_fn, inputs, case.grad_inputs)
    provs = providers_for(case, device)
    all_provs = {"reference": None, **provs}
    for name in all_provs:
        row = {"case": case.name, "provider": name, "device": device.type}
        try:
            fn = ref_fn if name == "reference" else (lambda p=provs[name]: p(inputs))
            if name != "reference":
                ok, err = check(case, inputs, ref, fn)
                row["check"] = "ok" if ok else "MISMATCH"
                row["max_rel_err"] = err
            else:
                row["check"] = "reference"
            step = lambda: _run_step(fn, inputs, case.grad_inputs, collect=False)  # noqa: E731
            step()  # warm-up (compiles kernels, fills caches)
            step()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            else:
                row["peak_mem_mb"] = None  # torch exposes no CPU allocator peak
            times = _median_time(step, device, min_repeats, min_seconds)
            row["median_ms"] = statistics.median(times) * 1e3
            row["repeats"] = len(times)
            sec = row["median_ms"] / 1e3
            if case.bytes_moved is not None:
                row["gbs"] = case.bytes_moved(inputs) / sec / 1e9
                row["frac_peak_bw"] = row["gbs"] / peaks["copy_gbs"]
            if case.flops is not None:
                row["tflops"] = case.flops(inputs) / sec / 1e12
                row["frac_peak_flops"] = row["tflops"] / peaks.get("matmul_tflops_float32", float("nan"))
        except torch.cuda.OutOfMemoryError as exc:  # one provider's OOM must not stop the run
            row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        row["size"] = case.size
        rows.append(row)
    ref_ms = rows[0].get("median_ms")
    for row in rows:
        if ref_ms and row.get("median_ms"):
            row["speedup"] = ref_ms / row["median_ms"]
    return rows


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def default_out(device_label: str) -> str:
    date = _dt.date.today().isoformat()
    results = os.path.join(REPO, "bench", "results")
    folder = results if os.path.isdir(results) else os.getcwd()
    return os.path.join(folder, f"{slug(device_label)}-{date}.json")


def format_table(rows: List[Dict]) -> str:
    cols = [("case", 44, None), ("provider", 10, None), ("check", 9, None), ("median ms", 10, ("median_ms", ".3f")),
            ("speed-up", 9, ("speedup", ".2f")), ("GB/s", 8, ("gbs", ".1f")), ("TFLOP/s", 8, ("tflops", ".2f")),
            ("peak MB", 9, ("peak_mem_mb", ".1f"))]
    head = " ".join(f"{title:{'<' if fmt is None else '>'}{width}s}" for title, width, fmt in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for title, width, fmt in cols:
            if fmt is None:
                key = title
                value = ("ERROR" if "error" in r else r.get("check", "-")) if key == "check" else str(r.get(key, "-"))
                cells.append(f"{value:<{width}s}")
            else:
                v = r.get(fmt[0])
                text = format(v, fmt[1]) + ("x" if fmt[0] == "speedup" else "") if isinstance(v, (int, float)) else "-"
                cells.append(f"{text:>{width}s}")
        lines.append(" ".join(cells))
        if "error" in r:
            lines.append(f"    error: {r['error']}")
    return "\n".join(lines)


def run(*, full: bool = False, device: Optional[str] = None, select: Optional[str] = None, out: Optional[str] = None,
        min_repeats: int = 5, min_seconds: float = 0.5, plot_dir: Optional[str] = None, progress: bool = True) -> int:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = select_cases(dev.type, full, select or None)
    if not cases:
        print(f"no benchmark cases selected (full={full}, select={select!r})", file=sys.stderr)
        return 2
    label = device_name(dev)
    print(f"ddfast bench on {label}: {len(cases)} case(s), torch {torch.__version__}", flush=True)
    peaks = measure_peaks(dev)
    print("measured peaks: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()), flush=True)
    rows: List[Dict] = []
    it = tqdm(cases, desc="ddfast bench", unit="case", disable=not progress, file=sys.stderr)
    for case in it:
        it.set_postfix_str(case.name)
        try:
            rows.extend(run_case(case, dev, peaks, min_repeats, min_seconds))
        except Exception as exc:  # noqa: BLE001 - setup/reference failure of one case
            rows.append({"case": case.name, "provider": "reference", "device": dev.type,
                         "error": f"{type(exc).__name__}: {exc}"})
    speedups = {}
    for case in cases:
        mine = [r for r in rows if r["case"] == case.name and r["provider"] != "reference" and r.get("speedup")
                and r.get("check") == "ok"]
        if mine:
            best = max(mine, key=lambda r: r["speedup"])
            speedups[case.name] = {"speedup": best["speedup"], "provider": best["provider"]}
    report = {
        "device": label,
        "device_type": dev.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["ddfast", "bench"] + sys.argv[2:]) if sys.argv and sys.argv[0].endswith("ddfast") else None,
        "peaks": peaks,
        "results": rows,
        "speedups": speedups,
        "notes": {case.name: case.notes for case in cases if case.notes},
    }
    print(format_table(rows))
    path = out or default_out(label)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {path}")
    if plot_dir:
        from .plot import plot_report

        for p in plot_report(report, plot_dir):
            print(f"wrote {p}")
    bad = [r for r in rows if r.get("check") == "MISMATCH" or "error" in r]
    if bad:
        print(f"{len(bad)} row(s) failed their check or errored: "
              + ", ".join(f"{r['case']}[{r['provider']}]" for r in bad), file=sys.stderr)
        return 1
    return 0
