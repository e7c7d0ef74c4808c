"""``ddfast bench``: check every op against its reference, then time forward+backward.

For each case: build inputs, run the reference, the case's baselines (e.g. DC's per-class loop),
optionally ``torch.compile`` of the reference, and every available ddfast provider once; compare
outputs and gradients with the reference (a mismatch fails the run), then time each provider
(warm-up excluded, CUDA-synchronised, median of repeats), with peak memory on CUDA, and count the
device-independent figures of one call (``counters``: dispatched ops, host syncs, host µs). The
device's copy bandwidth and matmul peak are measured in the same run so GB/s and TFLOP/s come with
the fraction of peak. Writes JSON (device, torch, commit, peaks, results, speedups, definitions)
and optional plots.
"""
from __future__ import annotations

import copy
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

from . import counters
from .case import Case, release_persistent
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
                 max_repeats: int = 1000, host_times: bool = False):
    """Wall times of ``fn`` (synchronised); with ``host_times`` also the times until fn returned, unsynchronised."""
    times, hosts = [], []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_seconds):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t0)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return (times, hosts) if host_times else times


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

def _leaves(value) -> List[torch.Tensor]:
    """A grad input: one leaf tensor, or a list of them (e.g. a model's per-tensor gradients)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _collected_grad(value) -> Optional[torch.Tensor]:
    """The .grad of a grad input; a list of leaves flattened into one tensor, a leaf the step did not
    reach as zeros (DC's rank-1 tensors under "ours"), as one flat leaf's gradient would hold them."""
    if not isinstance(value, (list, tuple)):
        return value.grad.detach().clone() if value.grad is not None else None
    if all(leaf.grad is None for leaf in value):
        return None
    return torch.cat([(leaf.grad.detach() if leaf.grad is not None else torch.zeros_like(leaf)).reshape(-1)
                      for leaf in value])


def _run_step(fn: Callable[[], torch.Tensor], inputs: Dict, grad_names, collect: bool = True):
    """One forward and backward (ones as every output's gradient); with ``collect``, (output, grads).
    A step may return a tuple of tensors (an op with several outputs): compared as one flat tensor."""
    for name in grad_names:
        for leaf in _leaves(inputs[name]):
            leaf.grad = None
    out = fn()
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    wanted = [o for o in outs if o.requires_grad]
    if wanted:
        torch.autograd.backward(wanted, [torch.ones_like(o) for o in wanted])
    if not collect:
        return None
    grads = {name: _collected_grad(inputs[name]) for name in grad_names}
    value = outs[0].detach() if len(outs) == 1 else torch.cat([o.detach().reshape(-1) for o in outs])
    return value, grads


def _rel_err(got: Optional[torch.Tensor], want: Optional[torch.Tensor]) -> float:
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    if got.shape != want.shape:
        return float("inf")
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    return err / max(scale, 1e-30)


def _errors(case: Case, got: tuple, want: tuple) -> List[float]:
    return [_rel_err(got[0], want[0])] + [_rel_err(got[1][k], want[1][k]) for k in case.grad_inputs]


def _to_float64(value):
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value).double()
    if torch.is_tensor(value) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float64(v) for v in value)
    return value


class ExactReference:
    """The case's reference in float64 on fresh inputs, computed once and only when needed: a
    provider that misses ``case.tol`` against the fp32 reference is judged against float64 instead.
    On a GPU the fp32 reference itself can be far from exact: cuDNN's TF32 convolutions (torch's
    default) and the ill-conditioned DC/DM image gradients put it 5e-2 from float64 (H200), and a
    provider that sums in another order lands as far, on the other side."""

    def __init__(self, case: Case, device: torch.device, inputs: Dict):
        self.case, self.device, self.inputs = case, device, inputs
        self._value: Optional[tuple] = None
        self._ref_errors: Optional[List[float]] = None
        self.error: Optional[str] = None

    def get(self) -> Optional[tuple]:
        if self._value is None and self.error is None:
            try:
                fresh = self.case.make_inputs(self.device)
                if not _same_inputs(fresh, self.inputs):  # unseeded inputs, or a provider changed a module
                    raise ValueError("fresh inputs differ from the checked ones")
                inputs = {k: _to_float64(v) for k, v in fresh.items()}
                self._value = _run_step(lambda: self.case.reference(**inputs), inputs, self.case.grad_inputs)
            except Exception as exc:  # noqa: BLE001 - no float64 judge: the fp32 verdict stands
                self.error = f"{type(exc).__name__}: {exc}"
        return self._value

    def errors_of(self, ref: tuple) -> List[float]:
        """The fp32 reference's own errors against float64 (computed once per case)."""
        if self._ref_errors is None:
            self._ref_errors = _errors(self.case, ref, self.get())
        return self._ref_errors


def _same_inputs(a: Dict, b: Dict) -> bool:
    def same(x, y):
        if isinstance(x, torch.nn.Module):
            sx, sy = x.state_dict(), y.state_dict()
            return sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
        if torch.is_tensor(x):
            return torch.is_tensor(y) and x.shape == y.shape and torch.equal(x.detach(), y.detach())
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(same, x, y))
        return x == y
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


FP64_MARGIN = 2.0  # a provider may err against float64 up to this many times the fp32 reference's own error


def check(case: Case, inputs: Dict, ref: tuple, fn: Callable[[], torch.Tensor],
          exact: Optional[ExactReference] = None) -> tuple:
    """(ok, worst error against the fp32 reference, details). Within ``case.tol`` of the fp32
    reference is ok; otherwise, with ``exact``, ok when every output errs against float64 at most
    FP64_MARGIN times as much as the fp32 reference does (or within ``case.tol`` of float64)."""
    got = _run_step(fn, inputs, case.grad_inputs)
    worst = max(_errors(case, got, ref))
    truth = exact.get() if exact is not None and worst > case.tol else None
    if truth is None:
        return worst <= case.tol, worst, {}
    got_errs, ref_errs = _errors(case, got, truth), exact.errors_of(ref)
    ok = all(g <= max(FP64_MARGIN * r, case.tol) for g, r in zip(got_errs, ref_errs))
    return ok, worst, {"check_basis": "float64", "err_vs_fp64": max(got_errs), "ref_err_vs_fp64": max(ref_errs)}


# --- running ------------------------------------------------------------------------------

REFERENCE, COMPILED, FLOOR = "reference", "reference-compiled", "floor"


def providers_for(case: Case, device: torch.device) -> Dict[str, Callable]:
    """The ddfast providers of a case: name -> fn(inputs)."""
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
    cuda_only = case.cuda_variants if device.type == "cuda" else ()
    for variant in case.variants + cuda_only:  # e.g. GradientMatcher strategies: fused(variant, **inputs)
        provs[variant] = lambda inputs, v=variant: case.fused(v, **inputs)
    return provs


def _compiled_reference(case: Case, backend: str) -> Callable:
    """torch.compile of the case's reference; the compile itself happens on the first call."""
    import torch._dynamo

    torch._dynamo.reset()  # fresh caches: cases share reference functions, whose recompiles would hit the limit
    compiled = torch.compile(case.reference, backend=backend)
    return lambda inputs: compiled(**inputs)


def all_providers(case: Case, device: torch.device, compile_reference: bool = False,
                  compile_backend: str = "inductor") -> Dict[str, tuple]:
    """name -> (role, fn(inputs)); roles: "reference", "baseline" (incl. the compiled reference), "floor"
    (Case.floor), "ddfast"."""
    provs: Dict[str, tuple] = {REFERENCE: ("reference", lambda inputs: case.reference(**inputs))}
    for name, fn in case.baselines.items():
        provs[name] = ("baseline", lambda inputs, f=fn: f(**inputs))
    if case.floor is not None:
        provs[FLOOR] = ("floor", lambda inputs: case.floor(**inputs))
    if compile_reference:
        provs[COMPILED] = ("baseline", None)  # built lazily in run_case so a failure is that row's error
    for name, fn in providers_for(case, device).items():
        provs[name] = ("ddfast", fn)
    return provs


def _measure_counters(row: Dict, step: Callable[[], None], device: torch.device, compiled: bool) -> None:
    row["ops"] = None if compiled else counters.count_ops(step)
    row["syncs"] = counters.count_syncs(step, device.type)
    if device.type == "cpu":
        row["host_us"] = None if compiled else counters.host_us_cpu(step)


def _measure_device_time(row: Dict, step: Callable[[], None], nbytes: int, peaks: Dict[str, float]) -> None:
    try:
        us = counters.device_us(step)
    except Exception as exc:  # noqa: BLE001 - a profiler failure costs this column only
        row["device_us_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return
    if us:
        row["device_us"] = us
        row["kernel_gbs"] = nbytes / (us * 1e-6) / 1e9
        row["frac_peak_bw_kernel"] = row["kernel_gbs"] / peaks["copy_gbs"]


def _time_provider(case: Case, name: str, role: str, fn: Callable, inputs: Dict, ref: tuple, device: torch.device,
                   peaks: Dict[str, float], min_repeats: int, min_seconds: float,
                   exact: Optional[ExactReference] = None) -> Dict:
    row: Dict = {"case": case.name, "provider": name, "role": role, "device": device.type}
    t0 = time.perf_counter()
    if role == "reference":
        row["check"] = "reference"
        _run_step(fn, inputs, case.grad_inputs, collect=False)
    elif name in case.unchecked or role == "floor":
        row["check"] = "n/a"  # its own random draws: timed only (Case.unchecked)
        _run_step(fn, inputs, case.grad_inputs, collect=False)
    else:
        ok, err, details = check(case, inputs, ref, fn, exact)
        row["check"] = "ok" if ok else ("approx" if name in case.approximate else "MISMATCH")
        row["max_rel_err"] = err
        row.update(details)
    if name == COMPILED:
        row["compile_s"] = time.perf_counter() - t0  # first call: trace + compile + run
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
    _measure_counters(row, step, device, compiled=name == COMPILED)
    times, host_times = _median_time(step, device, min_repeats, min_seconds, host_times=True)
    row["median_ms"] = statistics.median(times) * 1e3
    row["repeats"] = len(times)
    if device.type == "cuda":
        row["host_us"] = statistics.median(host_times) * 1e6
    sec = row["median_ms"] / 1e3
    if case.bytes_moved is not None:
        row["gbs"] = case.bytes_moved(inputs) / sec / 1e9
        row["frac_peak_bw"] = row["gbs"] / peaks["copy_gbs"]
        if device.type == "cuda" and name != COMPILED:  # what the kernels reach apart from host overhead
            _measure_device_time(row, step, case.bytes_moved(inputs), peaks)
    if case.flops is not None:
        row["tflops"] = case.flops(inputs) / sec / 1e12
        row["frac_peak_flops"] = row["tflops"] / peaks.get("matmul_tflops_float32", float("nan"))
    if case.work_flops is not None and name != COMPILED:
        row["work_flops"] = case.work_flops(inputs, name)
        ref_work = case.work_flops(inputs, REFERENCE)
        if row["work_flops"] is not None and ref_work:
            row["work"] = row["work_flops"] / ref_work
    return row


def run_case(case: Case, device: torch.device, peaks: Dict[str, float], min_repeats: int, min_seconds: float,
             compile_reference: bool = False, compile_backend: str = "inductor") -> List[Dict]:
    """One row per provider (reference, baselines, compiled reference, ddfast); errors become row["error"]."""
    rows = []
    inputs = case.make_inputs(device)
    ref = _run_step(lambda: case.reference(**inputs), inputs, case.grad_inputs)
    exact = ExactReference(case, device, inputs)
    for name, (role, prov) in all_providers(case, device, compile_reference, compile_backend).items():
        try:
            if name == COMPILED:
                prov = _compiled_reference(case, compile_backend)
            row = _time_provider(case, name, role, lambda p=prov: p(inputs), inputs, ref, device, peaks,
                                 min_repeats, min_seconds, exact)
        except torch.cuda.OutOfMemoryError as exc:  # one provider's OOM must not stop the run
            row = {"case": case.name, "provider": name, "role": role, "device": device.type,
                   "error": f"out of memory: {str(exc).splitlines()[0]}"}
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - a failing provider (or compile) is that row's error
            row = {"case": case.name, "provider": name, "role": role, "device": device.type,
                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        row["size"] = case.size
        rows.append(row)
    release_persistent()  # the case's CUDA graphs, their pools and models go before the next case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _add_speedups(rows)
    return rows


def _add_speedups(rows: List[Dict]) -> None:
    """speedup: reference ms / row ms (on the floor row: the most any provider can reach);
    speedup_vs: {baseline: baseline ms / row ms} for every baseline row; with a floor row (Case.floor),
    above_floor_ms: row ms − floor ms, and speedup_above_floor: the reference's time above the floor
    ÷ the row's (absent where the row is not above the floor)."""
    ref_ms = rows[0].get("median_ms")
    bases = {r["provider"]: r["median_ms"] for r in rows if r.get("role") == "baseline" and r.get("median_ms")}
    floor_ms = next((r.get("median_ms") for r in rows if r.get("role") == "floor"), None)
    for row in rows:
        if not row.get("median_ms"):
            continue
        if ref_ms:
            row["speedup"] = ref_ms / row["median_ms"]
        vs = {name: ms / row["median_ms"] for name, ms in bases.items() if name != row["provider"]}
        if vs:
            row["speedup_vs"] = vs
        if floor_ms and row.get("role") != "floor":
            row["above_floor_ms"] = row["median_ms"] - floor_ms
            if ref_ms and ref_ms > floor_ms and row["above_floor_ms"] > 0:
                row["speedup_above_floor"] = (ref_ms - floor_ms) / row["above_floor_ms"]


def best_speedups(cases: List[Case], rows: List[Dict]) -> Dict[str, Dict]:
    """Per case: the fastest checked ddfast provider, its speed-up over the reference and each baseline."""
    out = {}
    for case in cases:
        mine = [r for r in rows if r["case"] == case.name and r.get("role", "ddfast") == "ddfast"
                and r.get("speedup") and r.get("check") == "ok"]
        if mine:
            best = max(mine, key=lambda r: r["speedup"])
            out[case.name] = {"speedup": best["speedup"], "provider": best["provider"]}
            if best.get("speedup_vs"):
                out[case.name]["vs"] = dict(best["speedup_vs"])
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def default_out(device_label: str) -> str:
    date = _dt.date.today().isoformat()
    results = os.path.join(REPO, "bench", "results")
    folder = results if os.path.isdir(results) else os.getcwd()
    return os.path.join(folder, f"{slug(device_label)}-{date}.json")


TABLE_COLUMNS = [  # title, row key (None: text column), number format
    ("case", "case", None), ("provider", "provider", None), ("check", "check", None),
    ("median ms", "median_ms", ".3f"), ("speed-up", "speedup", ".2f"), ("vs base", "vs_base", ".2f"),
    ("vs compiled", "vs_compiled", ".2f"), ("above floor", "speedup_above_floor", ".2f"), ("ops", "ops", "d"), ("syncs", "syncs", "d"), ("host us", "host_us", ".0f"),
    ("work", "work", ".2f"), ("GB/s", "gbs", ".1f"), ("kern GB/s", "kernel_gbs", ".1f"), ("TFLOP/s", "tflops", ".2f"),
    ("peak MB", "peak_mem_mb", ".1f"),
]
SPEEDUP_KEYS = ("speedup", "vs_base", "vs_compiled", "speedup_above_floor")


def table_cells(r: Dict) -> Dict:
    """The printed values of a row: its own keys plus vs_base / vs_compiled from speedup_vs."""
    vs = dict(r.get("speedup_vs") or {})
    cells = dict(r, vs_compiled=vs.pop(COMPILED, None))
    cells["vs_base"] = next(iter(vs.values()), None)  # the case's first baseline (e.g. DC's loop)
    cells["check"] = "ERROR" if "error" in r else r.get("check", "-")
    return cells


def format_number(value, fmt: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return format(value, fmt) + ("x" if key in SPEEDUP_KEYS else "")


def baselines_legend(rows: List[Dict]) -> str:
    names = {}
    for r in rows:
        if r.get("role") == "baseline" and r["provider"] != COMPILED:
            names.setdefault(r["provider"], []).append(r["case"])
    if not names:
        return ""
    return "vs base: speed-up over the case's baseline provider (" + "; ".join(
        f"{n}: {', '.join(sorted(set(cs)))}" for n, cs in names.items()) + ")"


FLOOR_LEGEND = ("above floor: the reference's time above the case's floor row (the work every provider does alike) "
                "÷ the row's; the floor row's speed-up is the most any provider can reach")


def legends(rows: List[Dict]) -> List[str]:
    """The table's footnotes: the baselines, and the floor where a case has one."""
    notes = [baselines_legend(rows), FLOOR_LEGEND if any(r.get("role") == "floor" for r in rows) else ""]
    return [text for text in notes if text]


def format_table(rows: List[Dict]) -> str:
    all_cells = [table_cells(r) for r in rows]
    cols = [(t, k, f) for t, k, f in TABLE_COLUMNS  # numeric columns nobody filled are left out
            if f is None or any(format_number(c.get(k), f, k) != "-" for c in all_cells)]
    text = [[str(c.get(k, "-")) if f is None else format_number(c.get(k), f, k) for t, k, f in cols]
            for c in all_cells]
    widths = [max([len(t)] + [len(line[i]) for line in text]) for i, (t, _, _) in enumerate(cols)]
    align = lambda s, i: s.ljust(widths[i]) if cols[i][2] is None else s.rjust(widths[i])  # noqa: E731
    head = " ".join(align(t, i) for i, (t, _, _) in enumerate(cols))
    lines = [head, "-" * len(head)]
    for r, line in zip(rows, text):
        lines.append(" ".join(align(s, i) for i, s in enumerate(line)))
        if "error" in r:
            lines.append(f"    error: {r['error']}")
    return "\n".join(lines + legends(rows))


def kernel_rows() -> List[Dict]:
    """ddfast.kernel_report's per-kernel sm_90 facts (registers, spills, shared memory, tensor-core
    and 128-bit load counts), or one error row when this build has no kernel report."""
    try:
        from ddfast.kernel_report import kernel_report
    except ImportError as exc:
        return [{"error": f"no kernel report in this build: {exc}"}]
    return kernel_report()


def _write_json(report: Dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, path)


def failed_rows(rows: List[Dict]) -> List[Dict]:
    """Rows that fail the run: mismatches and errors, except the compiled reference's (reported, not fatal)."""
    return [r for r in rows if (r.get("check") == "MISMATCH" or "error" in r) and r["provider"] != COMPILED]


def run(*, full: bool = False, device: Optional[str] = None, select: Optional[str] = None, out: Optional[str] = None,
        min_repeats: int = 5, min_seconds: float = 0.5, plot_dir: Optional[str] = None, progress: bool = True,
        compile_reference: bool = False, compile_backend: str = "inductor", kernels: bool = False) -> int:
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
    commit = git_commit()
    path = out or default_out(label)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)

    def make_report(done: List[Case], partial: bool) -> Dict:
        return {
            "device": label,
            "device_type": dev.type,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "commit": commit,
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["ddfast", "bench"] + sys.argv[2:]) if sys.argv and sys.argv[0].endswith("ddfast") else None,
            "compile_reference": compile_backend if compile_reference else None,
            "peaks": peaks,
            "results": rows,
            "speedups": best_speedups(done, rows),
            "definitions": counters.DEFINITIONS,
            "notes": {case.name: case.notes for case in done if case.notes},
            **({"partial": f"{len(done)} of {len(cases)} cases (the run was stopped or is in progress)"}
               if partial else {}),
        }

    it = tqdm(cases, desc="ddfast bench", unit="case", disable=not progress, file=sys.stderr)
    for i, case in enumerate(it):
        it.set_postfix_str(case.name)
        try:
            rows.extend(run_case(case, dev, peaks, min_repeats, min_seconds, compile_reference, compile_backend))
        except Exception as exc:  # noqa: BLE001 - setup/reference failure of one case
            rows.append({"case": case.name, "provider": REFERENCE, "role": "reference", "device": dev.type,
                         "error": f"{type(exc).__name__}: {exc}"})
        if i + 1 < len(cases):  # what is done survives a killed run (ddfast validate's step timeouts)
            _write_json(make_report(cases[:i + 1], partial=True), path)
    report = make_report(cases, partial=False)
    if kernels:
        report["kernels"] = kernel_rows()
    print(format_table(rows))
    _write_json(report, path)
    print(f"wrote {path}")
    if plot_dir:
        from .plot import plot_report

        for p in plot_report(report, plot_dir):
            print(f"wrote {p}")
    compiled_bad = [r for r in rows if r["provider"] == COMPILED and ("error" in r or r.get("check") == "MISMATCH")]
    if compiled_bad:
        print(f"torch.compile of the reference failed for {len(compiled_bad)} case(s) (reported, not fatal): "
              + ", ".join(r["case"] for r in compiled_bad), file=sys.stderr)
    bad = failed_rows(rows)
    if bad:
        print(f"{len(bad)} row(s) failed their check or errored: "
              + ", ".join(f"{r['case']}[{r['provider']}]" for r in bad), file=sys.stderr)
        return 1
    return 0
