"""``ddfast validate --out DIR``: everything that proves a build on one machine, in one command.

Steps (each a subprocess with its own timeout, its log written to DIR/<step>.log):

* ``info``          ``ddfast info``
* ``info-kernels``  ``ddfast info --kernels`` (sm_90 compile report; when ddfast.kernel_report exists)
* ``tests``         the test suite (junit XML parsed). On CUDA every CUDA test must run: a skipped
                    CUDA test, or none selected at all, fails the step.
* ``bench``         ``ddfast bench`` (``--full`` on CUDA) with JSON and plots
* ``bench-compiled`` ``ddfast bench --compile-reference`` (the default cases)
* ``memcheck``      ``compute-sanitizer --tool memcheck`` over the CUDA tests of the ops with kernels
* ``racecheck``     ``compute-sanitizer --tool racecheck`` over the compiled-backend CUDA tests of the
                    ops whose CUDA kernels use shared memory (found in csrc/cuda and its headers)

CUDA-only steps are SKIP without a GPU. ``--quick`` (for CI): a subset of the tests, no kernel
report, the bench with small repeats. DIR receives SUMMARY.md and summary.json: PASS/FAIL/SKIP
per step with duration and details, the worst speed-up, the failures. Exit status 1 when any step
fails. The whole run is held to ``--budget-min`` minutes: a step never gets more than what is
left, and a step that cannot start in time fails.

On a CUDA machine the defaults fit a GPU lease (``apply_device_defaults``: 9.5 minutes, the CUDA
tests only, no kernel report and no compiled-reference bench, which need no GPU). The lease is
then one command: ``pip install --no-deps --no-build-isolation -e . && ddfast validate --out DIR``
(the install builds the ops in parallel, ~35 s on an H200 machine's 16 cores).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
QUICK_TESTS = ["tests/test_param_match.py", "tests/test_class_means.py"]
QUICK_TESTS_K = "not slow"
# a skip reason holding this marks a combination the test does not apply to (e.g. the torch
# reference where the test checks a fused kernel): not a CUDA test that failed to run
NOT_APPLICABLE = "not applicable:"


@dataclass
class Step:
    name: str
    cmd: List[str]
    timeout_s: float
    needs_cuda: bool = False
    env: Dict[str, str] = field(default_factory=dict)
    skip_reason: Optional[str] = None       # set when planning decides the step cannot run here
    clean: List[str] = field(default_factory=list)  # outputs (in DIR) removed first, so none is stale
    # post(result, out_dir) reads the step's outputs, fills result["details"], may turn PASS into FAIL
    post: Optional[Callable[[Dict, str], None]] = None
    # commands run at the same time instead of ``cmd`` (one sanitizer process per test file: one
    # process over all files did not finish in a lease); the step fails if any of them does
    parts: List[List[str]] = field(default_factory=list)

    def command(self) -> str:
        return " & ".join(" ".join(c) for c in self.parts) if self.parts else " ".join(self.cmd)


# --- running one step ---------------------------------------------------------------------------

def run_step(step: Step, out_dir: str, cuda: bool, time_left_s: float) -> Dict:
    result = {"name": step.name, "command": step.command(), "log": f"{step.name}.log", "details": {}}
    if step.needs_cuda and not cuda:
        return dict(result, status=SKIP, reason="no CUDA device", duration_s=0.0, log=None)
    if step.skip_reason:
        return dict(result, status=SKIP, reason=step.skip_reason, duration_s=0.0, log=None)
    if time_left_s < 5:
        return dict(result, status=FAIL, reason="not run: the time budget is spent", duration_s=0.0, log=None)
    for name in step.clean:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    timeout = min(step.timeout_s, time_left_s)
    log_path = os.path.join(out_dir, result["log"])
    t0, cpu0 = time.perf_counter(), _children_cpu_s()
    returncode, timed_out = _run_logged(step, log_path, timeout)
    result.update(duration_s=round(time.perf_counter() - t0, 1), cpu_s=round(_children_cpu_s() - cpu0, 1),
                  returncode=returncode, timeout_s=round(timeout))
    if timed_out:
        result.update(status=FAIL, reason=f"timed out after {timeout:.0f} s")
    elif returncode != 0:
        result.update(status=FAIL, reason=f"exit status {returncode}")
    else:
        result.update(status=PASS)
    if step.post is not None:
        try:
            step.post(result, out_dir)
        except Exception as exc:  # noqa: BLE001 - unreadable outputs fail the step, never the run
            result.update(status=FAIL, reason=f"{result.get('reason', '')} outputs unreadable: "
                                               f"{type(exc).__name__}: {exc}".strip())
    return result


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_logged(step: Step, log_path: str, timeout: float):
    """Run in its own process group (killed whole on timeout), stdout+stderr into the log; the
    parts of a parallel step each into their own section, in order. A part that selects no test
    (pytest's exit status 5, a narrow ``-k``) does not fail the step."""
    env = dict(os.environ, **step.env)
    cmds = step.parts or [step.cmd]
    logs = [log_path] if len(cmds) == 1 else [f"{log_path}.{i}" for i in range(len(cmds))]
    procs, codes, timed_out = [], [], False
    try:
        for cmd, path in zip(cmds, logs):
            log = open(path, "w")
            log.write(f"$ {' '.join(cmd)}\n" + (f"# env: {step.env}\n" if step.env else ""))
            log.flush()
            try:
                procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                               start_new_session=True), log))
            except BaseException:
                log.close()
                raise
        deadline = time.monotonic() + timeout
        for proc, log in procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.01)))
            except subprocess.TimeoutExpired:
                _kill(proc)
                codes.append(proc.returncode)
                log.write(f"\n# killed: timed out after {timeout:.0f} s\n")
                timed_out = True
    finally:  # a part that failed to start (or any error) leaves nothing running and no log open
        for proc, log in procs:
            if proc.poll() is None:
                _kill(proc)
            log.close()
    if len(cmds) > 1:
        with open(log_path, "w") as out:
            for path, code in zip(logs, codes):
                with open(path) as part:
                    out.write(part.read() + f"# exit status {code}\n\n")
                os.remove(path)
        codes = [0 if code == 5 else code for code in codes]
    return next((c for c in codes if c), 0), timed_out


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group ended between the timeout and the kill
        pass
    proc.wait()


# --- outputs of the steps -------------------------------------------------------------------

def _is_cuda_test(name: str, message: str) -> bool:
    params = name[name.find("["):] if "[" in name else ""
    return "cuda" in params.lower() or "cuda" in name.lower() or bool(re.search(r"cuda|gpu", message, re.I))


def parse_junit(path: str) -> Dict:
    """Counts of a pytest junit XML file, with the CUDA tests counted apart."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "cuda_tests": 0, "cuda_skipped": 0}
    failed, cuda_skipped = [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        message = next((child.get("message", "") for child in case if child.tag == outcome), "")
        counts["tests"] += 1
        counts[{"failure": "failed", "error": "errors", "skipped": "skipped"}.get(outcome, "passed")] += 1
        cuda_test = _is_cuda_test(case.get("name", ""), message)
        counts["cuda_tests"] += cuda_test
        if outcome in ("failure", "error"):
            failed.append(name)
        elif outcome == "skipped" and cuda_test and NOT_APPLICABLE not in message:
            counts["cuda_skipped"] += 1
            cuda_skipped.append(f"{name}: {message[:120]}")
    return dict(counts, failed_tests=failed[:50], cuda_skipped_tests=cuda_skipped[:50])


def _post_tests(cuda: bool):
    def post(result: Dict, out_dir: str) -> None:
        xml = os.path.join(out_dir, "tests.xml")
        if not os.path.exists(xml):
            result.update(status=FAIL, reason=(result.get("reason") or "") + " (no junit XML written)")
            return
        details = parse_junit(xml)
        result["details"] = details
        if cuda and details["cuda_tests"] == 0:
            result.update(status=FAIL, reason="no CUDA test was selected on a CUDA machine")
        elif cuda and details["cuda_skipped"]:
            result.update(status=FAIL, reason=f"{details['cuda_skipped']} CUDA test(s) skipped on a CUDA machine")
        elif details["tests"] == 0:
            result.update(status=FAIL, reason="no test was selected")
        if result["status"] == FAIL and not result.get("reason"):
            result["reason"] = f"{details['failed']} failed, {details['errors']} errors"
    return post


def _post_info_kernels(result: Dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, result["log"])) as f:
        if "unrecognized arguments: --kernels" in f.read():
            result.update(status=SKIP, reason="this build's `ddfast info` has no --kernels")


def bench_details(report: Dict) -> Dict:
    """Worst (smallest) best-provider speed-up over the cases, against the reference and each baseline."""
    speedups = report.get("speedups", {})
    details: Dict = {"cases": len({r["case"] for r in report.get("results", [])}),
                     "rows": len(report.get("results", []))}
    if speedups:
        case, best = min(speedups.items(), key=lambda kv: kv[1]["speedup"])
        details["worst_speedup"] = {"case": case, "provider": best["provider"], "speedup": round(best["speedup"], 3)}
    vs: Dict[str, Dict] = {}
    for case, best in speedups.items():
        for baseline, value in (best.get("vs") or {}).items():
            if baseline not in vs or value < vs[baseline]["speedup"]:
                vs[baseline] = {"case": case, "provider": best["provider"], "speedup": round(value, 3)}
    if vs:
        details["worst_speedup_vs"] = vs
    kernel_bw = kernel_bandwidth(report.get("results", []))
    if kernel_bw:
        details["kernel_bandwidth"] = kernel_bw
    bad = [f"{r['case']}[{r['provider']}]: {r.get('error') or r.get('check')}" for r in report.get("results", [])
           if "error" in r or r.get("check") == "MISMATCH"]
    if bad:
        details["failed_rows"] = bad[:50]
    return details


def kernel_bandwidth(rows: List[Dict]) -> Dict[str, Dict]:
    """Per bandwidth case, the ddfast provider whose kernels reach the largest share of the copy
    peak (bench's kern GB/s: bytes ÷ profiler device time), beside its wall-clock share."""
    best: Dict[str, Dict] = {}
    for r in rows:
        if r.get("role") != "ddfast" or not r.get("frac_peak_bw_kernel"):
            continue
        if r["case"] not in best or r["frac_peak_bw_kernel"] > best[r["case"]]["kernel"]:
            best[r["case"]] = {"provider": r["provider"], "kernel": round(r["frac_peak_bw_kernel"], 3),
                               "wall": round(r.get("frac_peak_bw") or 0.0, 3)}
    return best


# Issue 13's speed targets on an H100 (one run): (label, case, measure, threshold). measure:
# "reference" or a baseline provider (speed-up of the fastest exact ddfast provider over it),
# "above_floor" (the speed-up of the time above the case's floor row: the part the providers differ
# in), or "kernel_bw" (the kernels' share of the copy peak measured in the same run).
TARGETS = (
    ("DC step, ConvNet-3 CIFAR-10 ipc 10", "dc_step/convnet3-cifar10-ipc10", "reference", 4.0),
    ("DC step, ipc 50", "dc_step/convnet3-cifar10-ipc50", "reference", 3.0),
    ("DM step (device DSA) vs DM's loop", "dm_step/convnet3-cifar10-ipc50-device-rng", "dm-loop", 4.0),
    ("DM step (DM's own DSA draws, exact) vs its loop", "dm_step/convnet3-cifar10-ipc50", "reference", 4.0),
    ("gradient_match vs DC's per-class loop, 10 classes", "gradient_match/convnet3-cifar10-c10", "dc-loop", 20.0),
    ("gradient_match, ResNet-18 gradient sets", "gradient_match/resnet18-c10", "kernel_bw", 0.70),
    ("class_means", "class_mean/n65536-d2048-c100", "kernel_bw", 0.70),
    ("param_match, ResNet-18", "param_match/resnet18-11M", "kernel_bw", 0.70),
    ("DSA (device RNG, the default)", "dsa/cifar10-b2560-device-rng", "reference", 5.0),
    ("DSA (reference RNG)", "dsa/cifar10-b2560", "reference", 5.0),
    ("BN statistics, one layer", "bn_stat/b32-c64-32x32", "reference", 2.0),
    ("BN statistics, one large layer", "bn_stat/b100-c64-112x112", "reference", 2.0),
    ("BN statistics inside SRe2L's ResNet-18 step", "bn_stat/resnet18-224-b100", "above_floor", 2.0),
    ("SRe2L's ResNet-18 step, whole", "bn_stat/resnet18-224-b100", "reference", 2.0),
)
# opt-in lossy modes: not what the targets are about
APPROXIMATE_PROVIDERS = ("bf16-real",)


# measures read straight from a row (any other names a baseline: the row's speedup_vs entry)
_ROW_MEASURES = {"reference": "speedup", "kernel_bw": "frac_peak_bw_kernel", "above_floor": "speedup_above_floor"}


def target_verdicts(rows: List[Dict]) -> List[Dict]:
    """Each issue-13 target against the bench rows: the best exact ddfast provider's value, MET or
    MISSED, or "not measured" when the run has no such row (a CPU run, a case left out)."""
    def measured(r: Dict, measure: str):
        if measure in _ROW_MEASURES:
            return r.get(_ROW_MEASURES[measure])
        return (r.get("speedup_vs") or {}).get(measure)

    # per case, the floor row's speed-up: the most any provider can reach on the whole step
    bounds = {r["case"]: r["speedup"] for r in rows if r.get("role") == "floor" and r.get("speedup")}
    out = []
    for label, case, measure, threshold in TARGETS:
        mine = [r for r in rows if r.get("case") == case and r.get("role", "ddfast") == "ddfast"
                and r.get("check") == "ok" and r.get("provider") not in APPROXIMATE_PROVIDERS]
        scored = [(measured(r, measure), r["provider"]) for r in mine if measured(r, measure)]
        verdict = {"target": label, "case": case, "measure": measure, "threshold": threshold}
        if scored:
            value, provider = max(scored)
            verdict.update(value=round(value, 3), provider=provider, status="MET" if value >= threshold else "MISSED")
            if measure == "reference" and case in bounds:
                verdict["bound"] = round(bounds[case], 3)
        else:
            verdict["status"] = "not measured"
        out.append(verdict)
    return out


def _post_bench(json_name: str):
    def post(result: Dict, out_dir: str) -> None:
        path = os.path.join(out_dir, json_name)
        if not os.path.exists(path):
            if result["status"] == PASS:
                result.update(status=FAIL, reason=f"{json_name} not written")
            return
        with open(path) as f:
            report = json.load(f)
        result["details"] = bench_details(report)
        result["details"]["json"] = json_name
        result["details"]["targets"] = target_verdicts(report.get("results", []))
        if report.get("partial"):
            result["details"]["partial"] = report["partial"]
    return post


# --- planning -------------------------------------------------------------------------------

def _op_test_files(shared_memory_only: bool = False) -> List[str]:
    """tests/test_<op>.py of the ops with kernels (Triton or CUDA); with shared_memory_only, the ops
    whose CUDA source (or a local header it includes) declares __shared__ memory."""
    ops = set()
    cuda_dir = os.path.join(REPO, "csrc", "cuda")
    for name in sorted(os.listdir(cuda_dir)) if os.path.isdir(cuda_dir) else []:
        if name.endswith(".cu") and (not shared_memory_only or _uses_shared_memory(os.path.join(cuda_dir, name))):
            ops.add(name[:-3])
    kernels_dir = os.path.join(REPO, "kernels")
    if not shared_memory_only and os.path.isdir(kernels_dir):
        ops |= {n[:-3] for n in os.listdir(kernels_dir) if n.endswith(".py") and not n.startswith("_")}
    return [f"tests/test_{op}.py" for op in sorted(ops) if os.path.exists(os.path.join(REPO, "tests", f"test_{op}.py"))]


def _uses_shared_memory(path: str, seen=None) -> bool:
    seen = set() if seen is None else seen
    if path in seen or not os.path.exists(path):
        return False
    seen.add(path)
    with open(path) as f:
        text = f.read()
    if "__shared__" in text:
        return True
    headers = re.findall(r'#include\s+"([^"]+)"', text)
    return any(_uses_shared_memory(os.path.join(os.path.dirname(path), h), seen) for h in headers)


def find_compute_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if found is None and root and os.path.exists(os.path.join(root, "bin", "compute-sanitizer")):
            found = os.path.join(root, "bin", "compute-sanitizer")
    return found


def _have_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def plan(args, cuda: bool, out_dir: str) -> List[Step]:
    py = sys.executable
    cli = [py, "-m", "ddfast.cli"]
    device = ["--device", "cuda" if cuda else "cpu"]
    size = STEP_SIZES[cuda]
    steps = [Step("info", cli + ["info"] + device, size["info_s"])]

    kernels = Step("info-kernels", cli + ["info", "--kernels"] + device, 300, post=_post_info_kernels)
    if not _have_module("ddfast.kernel_report"):
        kernels.skip_reason = "this build has no `ddfast info --kernels` (ddfast.kernel_report)"
    elif args.quick:
        kernels.skip_reason = "--quick"
    elif cuda and not args.kernel_report:
        kernels.skip_reason = "a CPU-side compile check (any machine runs it); --kernel-report runs it here"
    steps.append(kernels)

    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    tests = args.tests or (QUICK_TESTS if args.quick else ["tests"])
    tests_k = args.tests_k if args.tests_k is not None else (QUICK_TESTS_K if args.quick else None)
    jobs = ["-n", str(args.jobs)] if args.jobs > 0 and _have_module("xdist") else []
    steps.append(Step("tests", pytest + tests + (["-k", tests_k] if tests_k else []) + jobs
                      + [f"--junitxml={os.path.join(out_dir, 'tests.xml')}"], args.tests_timeout,
                      post=_post_tests(cuda), clean=["tests.xml"]))

    bench = cli + ["bench", "--no-progress"] + device + (["-k", args.bench_select] if args.bench_select else [])
    bench += ["--repeats", "2", "--min-seconds", "0.05"] if args.quick else size["bench_repeats"]
    full = ["--full"] if cuda and not args.quick else []
    if full and args.kernel_report and _have_module("ddfast.kernel_report"):
        full.append("--kernels")  # the sm_90 kernel report into the bench JSON (cached by info-kernels)
    steps.append(Step("bench", bench + full + ["--out", os.path.join(out_dir, "bench.json"),
                                               "--plot", os.path.join(out_dir, "plots")],
                      args.bench_timeout, post=_post_bench("bench.json"), clean=["bench.json"]))
    compiled = Step("bench-compiled", bench + ["--compile-reference", "--compile-backend", args.compile_backend,
                                               "--out", os.path.join(out_dir, "bench-compiled.json")],
                    args.bench_timeout, post=_post_bench("bench-compiled.json"), clean=["bench-compiled.json"])
    if not args.compile_reference:
        compiled.skip_reason = "--no-compile-reference"
    steps.append(compiled)

    sanitizer = find_compute_sanitizer()
    sanitize_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # so out-of-bounds accesses hit unallocated memory
    for tool, files, k, timeout in (("memcheck", _op_test_files(), args.sanitize_k, size["memcheck_s"]),
                                    ("racecheck", _op_test_files(shared_memory_only=True),
                                     f"({args.sanitize_k}) and compiled", size["racecheck_s"])):
        tool_cmd = [sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", "1"] + pytest + ["-x"]
        if cuda and sanitizer is None:
            cmd, parts = [py, "-c", "import sys; sys.exit('compute-sanitizer not found (PATH, CUDA_HOME, "
                                    "/usr/local/cuda)')"], []
        else:
            cmd, parts = [], [tool_cmd + [f, "-k", k] for f in files]
        steps.append(Step(tool, cmd, timeout, needs_cuda=True, env=sanitize_env, parts=parts))
    for step in steps:
        if step.name in getattr(args, "skip", ()) and not step.skip_reason:
            step.skip_reason = "--skip"
    return steps


# --- summary --------------------------------------------------------------------------------

def _environment(cuda: bool) -> Dict:
    import torch

    from .bench.runner import device_name, git_commit

    return {"device": device_name(torch.device("cuda" if cuda else "cpu")), "torch": torch.__version__,
            "cuda": torch.version.cuda, "commit": git_commit(), "python": sys.version.split()[0]}


def summarize(results: List[Dict], env: Dict, started: str, duration_s: float, command: str) -> Dict:
    failures = [f"{r['name']}: {r.get('reason', '')}" for r in results if r["status"] == FAIL]
    for r in results:
        for row in r.get("details", {}).get("failed_rows", []):
            failures.append(f"{r['name']}: {row}")
        for test in r.get("details", {}).get("failed_tests", [])[:20]:
            failures.append(f"{r['name']}: failed {test}")
        for test in r.get("details", {}).get("cuda_skipped_tests", [])[:20]:
            failures.append(f"{r['name']}: CUDA test skipped {test}")
    worst = {r["name"]: r["details"]["worst_speedup"] for r in results if r.get("details", {}).get("worst_speedup")}
    worst_vs = {f"{r['name']} vs {b}": v for r in results for b, v in r.get("details", {}).get("worst_speedup_vs", {}).items()}
    kernel_bw = {case: v for r in results for case, v in r.get("details", {}).get("kernel_bandwidth", {}).items()}
    targets = next((r["details"]["targets"] for r in results if r["name"] == "bench" and r.get("details", {}).get("targets")),
                   [])
    return {"kernel_bandwidth": kernel_bw, "targets": targets, "status": FAIL if any(r["status"] == FAIL for r in results) else PASS, "command": command,
            "started": started, "duration_s": round(duration_s, 1), **env, "steps": results,
            "worst_speedup": worst, "worst_speedup_vs": worst_vs, "failures": failures}


def markdown(summary: Dict) -> str:
    lines = [f"# ddfast validate: {summary['status']}", "",
             f"{summary['device']} · torch {summary['torch']} (CUDA {summary['cuda'] or 'none'}) · "
             f"commit {summary['commit']} · {summary['started']} · {summary['duration_s']:.0f} s", "",
             f"`{summary['command']}`", "", "| step | status | seconds | CPU s | detail |", "|---|---|---:|---:|---|"]
    for r in summary["steps"]:
        cpu = f"{r['cpu_s']:.1f}" if r.get("cpu_s") is not None else "–"
        lines.append(f"| {r['name']} | {r['status']} | {r.get('duration_s', 0):.1f} | {cpu} | {_detail_text(r)} |")
    lines += ["", "## Worst speed-up (fastest ddfast provider per case, slowest case)"]
    for step, w in summary["worst_speedup"].items():
        lines.append(f"- {step}: {w['speedup']:.2f}x over the reference ({w['case']}, {w['provider']})")
    for key, w in summary["worst_speedup_vs"].items():
        lines.append(f"- {key}: {w['speedup']:.2f}x ({w['case']}, {w['provider']})")
    if not summary["worst_speedup"] and not summary["worst_speedup_vs"]:
        lines.append("- none measured")
    if summary.get("kernel_bandwidth"):
        lines += ["", "## Kernel bandwidth (bytes ÷ device time of the kernels, share of the copy peak)"]
        for case, v in summary["kernel_bandwidth"].items():
            lines.append(f"- {case}: kernels {100 * v['kernel']:.0f} % ({v['provider']}); wall clock {100 * v['wall']:.0f} %")
    measured = [t for t in summary.get("targets", []) if t["status"] != "not measured"]
    if measured:
        lines += ["", "## Issue-13 targets (fastest exact ddfast provider; opt-in bf16 modes left out)",
                  "", "| target | case | measured | target | status |", "|---|---|---:|---:|---|"]
        for t in summary["targets"]:
            unit = {"kernel_bw": "of copy peak", "above_floor": "x vs reference, time above the floor row"}.get(
                t["measure"], f"x vs {t['measure']}")
            if t["measure"] == "kernel_bw":
                got = f"{100 * t['value']:.0f} % ({t['provider']})" if "value" in t else "–"
                want = f"≥ {100 * t['threshold']:.0f} %"
            else:
                got = f"{t['value']:.2f}x ({t['provider']})" if "value" in t else "–"
                want = f"≥ {t['threshold']:g}x"
            status = t["status"] + (f" (the floor allows at most {t['bound']:.2f}x)" if "bound" in t else "")
            lines.append(f"| {t['target']} | `{t['case']}` ({unit}) | {got} | {want} | {status} |")
    lines += ["", "## Failures"] + ([f"- {f}" for f in summary["failures"]] or ["- none"])
    lines += ["", "Logs: `<step>.log` in this folder; tests: `tests.xml`; bench: `bench.json`, `plots/`, "
              "`bench-compiled.json`; this summary: `summary.json`."]
    return "\n".join(lines) + "\n"


def _detail_text(r: Dict) -> str:
    d = r.get("details", {})
    parts = [r["reason"]] if r.get("reason") else []
    if "tests" in d:
        parts.append(f"{d['passed']} passed, {d['failed']} failed, {d['errors']} errors, {d['skipped']} skipped "
                     f"({d['cuda_tests']} CUDA tests, {d['cuda_skipped']} CUDA skipped)")
    if d.get("partial"):
        parts.append(f"partial results: {d['partial']}")
    if "worst_speedup" in d:
        w = d["worst_speedup"]
        parts.append(f"{d['cases']} cases; worst {w['speedup']:.2f}x ({w['case']})")
    if d.get("failed_rows"):
        parts.append(f"{len(d['failed_rows'])} failed row(s)")
    if r.get("log"):
        parts.append(f"log `{r['log']}`")
    return "; ".join(parts).replace("|", "/")


# --- entry points ---------------------------------------------------------------------------

STEP_NAMES = ("info", "info-kernels", "tests", "bench", "bench-compiled", "memcheck", "racecheck")


def _step_names(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEP_NAMES)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder for logs, results and SUMMARY.md")
    p.add_argument("--quick", action="store_true",
                   help="CI mode: a subset of the tests, no kernel report, the default bench with small repeats")
    p.add_argument("--tests", nargs="+", default=None, metavar="PATH", help="test paths (default: tests/, or a "
                   "quick subset with --quick)")
    p.add_argument("--tests-k", default=None, metavar="EXPR", help="pytest -k expression for the tests step")
    p.add_argument("--sanitize-k", default=None, metavar="EXPR",
                   help="pytest -k expression for the compute-sanitizer steps (racecheck adds 'and compiled'; "
                        "default 'cuda and compiled and not slow')")
    p.add_argument("--bench-select", default=None, metavar="REGEX", help="case selection for both bench steps")
    p.add_argument("--no-compile-reference", dest="compile_reference", action="store_false", default=None,
                   help="skip the bench with torch.compile of the reference")
    p.add_argument("--compile-reference", dest="compile_reference", action="store_true", default=None,
                   help="run the bench with torch.compile of the reference (default: on CPU only)")
    p.add_argument("--kernel-report", action="store_true",
                   help="run `ddfast info --kernels` on CUDA too (default: CPU only, it needs no GPU)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled reference")
    p.add_argument("--jobs", type=int, default=None, help="pytest-xdist workers for the tests step "
                   "(default: 12 on CUDA when xdist is installed, else 0)")
    p.add_argument("--tests-timeout", type=float, default=None, help="seconds for the tests step (600; 160 on CUDA)")
    p.add_argument("--bench-timeout", type=float, default=None, help="seconds for each bench step (360; 140 on CUDA)")
    p.add_argument("--skip", type=_step_names, default=(), metavar="STEP[,STEP]",
                   help=f"steps not to run, comma-separated ({', '.join(STEP_NAMES)}); e.g. racecheck on a lease "
                        "whose CUDA kernels a previous run already checked")
    p.add_argument("--budget-min", type=float, default=None,
                   help="minutes for the whole run (25; 9.5 on CUDA, to fit a 15-minute GPU lease)")


# on CUDA the bench runs the issue-13 cases but CIFAR-100's (those alone take about a minute)
CUDA_BENCH_SELECT = r"^(bn_stat|class_mean|dc_step|dm_step|dsa|gradient_match|norm_relu_pool|param_match)/(?!.*cifar100)"
# per device (key: CUDA?): option defaults (filled where the command line left them unset) and the
# fixed sizes of the steps; on CUDA the whole run fits a 15-minute GPU lease (apply_device_defaults)
OPTION_DEFAULTS = {
    True: {"jobs": 12, "tests_timeout": 160, "bench_timeout": 160, "budget_min": 9.5, "compile_reference": False,
           "bench_select": CUDA_BENCH_SELECT},
    False: {"jobs": 0, "tests_timeout": 600, "bench_timeout": 360, "budget_min": 25, "compile_reference": True},
}
# Measured on an H200 (validate, 2026-11-26): tests 84 s; bench --full reached 27 of its 49 cases in
# 180 s; one memcheck process over the 8 op files did not finish in 100 s, but one per file finished
# 4 files in 17-50 s of tests each (DSA's float64 gradchecks, thousands of launches each, did not
# finish in 280 s: deselected under the sanitizers). Third run: memcheck of all 8 files in parallel
# 41 s; racecheck finished 6 files in 110 s, mmd and supcon_nce took 101 and 81 s alone; tests 83 s,
# the 25 bench cases 64 s (before the kernel-time profile per bandwidth row). Fourth run (H100,
# d37bfa9): the tests, grown to 958 CUDA tests, were killed at 100 s (97 %); 112 s on an H200 alone.
STEP_SIZES = {  # seconds; bench_repeats: 5 of at least 0.1 s on CUDA
    True: {"info_s": 30, "memcheck_s": 80, "racecheck_s": 140, "bench_repeats": ["--repeats", "5", "--min-seconds", "0.1"]},
    False: {"info_s": 120, "memcheck_s": 300, "racecheck_s": 240, "bench_repeats": []},
}


def apply_device_defaults(args, cuda: bool) -> None:
    """Fill the options left unset. On CUDA the run is sized for a GPU lease (15 minutes of device
    time, at most 10 per command, machine start included): the CUDA tests only (CI runs the rest),
    no CPU-side compile report, no torch.compile baseline, sanitizers over the compiled kernels;
    measured on an H200 (2026-11-26): CUDA tests 100 s with 12 workers, the issue-13 bench cases 110 s."""
    for key, value in OPTION_DEFAULTS[cuda].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.sanitize_k is None:
        args.sanitize_k = "cuda and compiled and not slow and not gradcheck"
    if cuda and args.tests is None and args.tests_k is None and not args.quick:
        args.tests_k = "cuda"


def validate(args, extra_steps: Optional[List[Step]] = None, cuda: Optional[bool] = None,
             steps: Optional[List[Step]] = None) -> Dict:
    """Run every step into ``args.out``; returns the summary (also written as SUMMARY.md / summary.json).

    ``steps`` replaces the planned steps, ``extra_steps`` runs after them (tests inject failures so);
    ``cuda`` overrides the device detection (False: plan as on a CPU machine)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    apply_device_defaults(args, cuda)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    results = []
    for step in (plan(args, cuda, out_dir) if steps is None else list(steps)) + list(extra_steps or []):
        left = args.budget_min * 60 - (time.perf_counter() - t0)
        print(f"[validate] {step.name} ...", flush=True)
        result = run_step(step, out_dir, cuda, left)
        print(f"[validate] {step.name}: {result['status']} ({result.get('duration_s', 0):.1f} s)"
              + (f" {result['reason']}" if result.get("reason") else ""), flush=True)
        results.append(result)
    command = "ddfast validate " + " ".join(a for a in sys.argv[2:]) if sys.argv[1:2] == ["validate"] else "ddfast validate"
    summary = summarize(results, _environment(cuda), started, time.perf_counter() - t0, command)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "SUMMARY.md"), "w") as f:
        f.write(markdown(summary))
    return summary


def main(args) -> int:
    summary = validate(args)
    print(markdown(summary))
    return 0 if summary["status"] == PASS else 1
