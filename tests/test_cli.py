"""The ddfast command: info, bench (check + timing + JSON + plots), and the bench runner's checking."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ddfast.bench import runner
from ddfast.bench.case import Case
from ddfast.bench.cases import all_cases


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ddfast.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_info_command():
    res = _cli("info", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    for key in ("torch", "triton", "device", "param_match", "auto ->"):
        assert key in res.stdout


def test_bench_list_names_follow_op_setting():
    cases = all_cases()
    assert cases, "no benchmark cases found"
    assert any(c.default for c in cases)
    for c in cases:
        op, _, setting = c.name.partition("/")
        assert op and setting, c.name


def test_bench_runs_checks_and_writes_json_and_plot(tmp_path):
    out = tmp_path / "r.json"
    res = _cli("bench", "--device", "cpu", "-k", "^param_match/convnet3", "--out", str(out), "--plot", str(tmp_path),
               "--repeats", "2", "--min-seconds", "0", "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    assert {"device", "torch", "commit", "results", "speedups", "peaks"} <= set(report)
    providers = {r["provider"] for r in report["results"]}
    assert "reference" in providers
    for row in report["results"]:
        assert row["case"] == "param_match/convnet3-320k"
        assert row["median_ms"] > 0
        if row["provider"] != "reference":
            assert row["check"] == "ok"
    assert os.path.exists(tmp_path / "param_match.png")
    assert "median ms" in res.stdout
    table = _cli("report", str(out))
    assert table.returncode == 0, table.stderr
    assert "| param_match/convnet3-320k | reference | reference |" in table.stdout
    assert report["commit"] in table.stdout


def test_bench_fails_on_a_wrong_kernel(tmp_path):
    """The check is real: a provider that disagrees with the reference fails the run."""
    def make(device):
        return {"x": torch.randn(100, device=device, requires_grad=True)}

    bad = Case(name="fake/wrong", make_inputs=make, reference=lambda x: (x * x).sum(),
               fused=lambda backend, x: (x * x).sum() * 1.01, backends=("auto",), grad_inputs=("x",))
    rows = runner.run_case(bad, torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0)
    assert rows[1]["check"] == "MISMATCH" and rows[1]["max_rel_err"] > 5e-3
    good = Case(name="fake/right", make_inputs=make, reference=lambda x: (x * x).sum(),
                fused=lambda backend, x: (x ** 2).sum(), backends=("auto",), grad_inputs=("x",))
    rows = runner.run_case(good, torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0)
    assert rows[1]["check"] == "ok" and rows[1]["speedup"] > 0


def test_bench_unknown_selection_is_an_error():
    res = _cli("bench", "--device", "cpu", "-k", "no-such-case", "--no-progress")
    assert res.returncode == 2 and "no benchmark cases selected" in res.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_cuda_reports_peak_memory(tmp_path):
    out = tmp_path / "r.json"
    res = _cli("bench", "--device", "cuda", "-k", "^param_match/convnet3", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["results"]
    assert all(r["peak_mem_mb"] is not None for r in rows)
    assert all(r.get("kernel_gbs", 0) > 0 for r in rows), [r.get("device_us_error") for r in rows]


def test_gradient_matcher_sweep_runs():
    out = subprocess.run([sys.executable, "-m", "ddfast.bench.sweep_gradient_matcher", "--max-configs", "1",
                          "--repeats", "1", "--strategies", "loop,segmented"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "activations 0.66M" in out.stdout and "'segmented'" in out.stdout


# --- bench columns: dispatched ops, host syncs, host µs, work model, baselines, compiled reference ---

def _square_case(**kw):
    def make(device):
        return {"x": torch.randn(64, device=device, requires_grad=True)}

    def loop(x):  # the same sum, one element at a time: many more dispatched ops and host work
        return sum(x[i] * x[i] for i in range(x.shape[0]))

    work = {"reference": 128.0, "loop": 192.0, "ddfast": 64.0}
    fields = dict(name="fake/square", make_inputs=make, reference=lambda x: (x * x).sum(),
                  fused=lambda backend, x: (x ** 2).sum(), backends=("auto",), grad_inputs=("x",),
                  baselines={"loop": loop}, work_flops=lambda inputs, provider: work.get(provider))
    fields.update(kw)
    return Case(**fields)


def test_bench_rows_count_ops_syncs_host_time_and_compare_against_every_baseline():
    rows = runner.run_case(_square_case(), torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0,
                           compile_reference=True, compile_backend="eager")
    by = {r["provider"]: r for r in rows}
    assert list(by) == ["reference", "loop", "reference-compiled", "ddfast"]
    assert [by[p]["role"] for p in by] == ["reference", "baseline", "baseline", "ddfast"]
    assert all("error" not in r and r["check"] in ("ok", "reference") for r in rows), rows
    assert 0 < by["reference"]["ops"] < 20 < 64 * 2 < by["loop"]["ops"]
    assert by["reference-compiled"]["ops"] is None and by["reference-compiled"]["compile_s"] > 0
    assert all(r["syncs"] == 0 for r in rows)
    assert by["loop"]["host_us"] > max(500.0, 3 * by["reference"]["host_us"])  # ~400 ops of Python + autograd
    assert (by["loop"]["work"], by["ddfast"]["work"], by["reference"]["work"]) == (1.5, 0.5, 1.0)
    vs = by["ddfast"]["speedup_vs"]
    assert set(vs) == {"loop", "reference-compiled"}
    assert vs["loop"] == pytest.approx(by["loop"]["median_ms"] / by["ddfast"]["median_ms"])
    best = runner.best_speedups([_square_case()], rows)["fake/square"]
    assert best["provider"] == "ddfast" and set(best["vs"]) == {"loop", "reference-compiled"}
    table = runner.format_table(rows)
    for title in ("ops", "syncs", "host us", "vs base", "vs compiled", "work"):
        assert title in table.splitlines()[0]
    report = {"device": "cpu", "torch": torch.__version__, "commit": "x", "date": "2026-01-01", "results": rows}
    from ddfast.bench.report import markdown
    md = markdown(report)
    assert "| ops | syncs | host µs | work |" in md and "| fake/square | loop | ok |" in md


def test_bench_floor_row_measures_the_time_the_providers_differ_in():
    def shared(x):  # the work every provider does alike (a teacher's forward and backward)
        y = x
        for _ in range(200):
            y = y * 1.0001
        return y.sum()

    case = _square_case(reference=lambda x: shared(x) + sum(x[i] * x[i] for i in range(x.shape[0])),
                        fused=lambda backend, x: shared(x) + (x * x).sum(), floor=shared, baselines={},
                        work_flops=None)
    rows = runner.run_case(case, torch.device("cpu"), {"copy_gbs": 1.0}, 3, 0.0)
    by = {r["provider"]: r for r in rows}
    assert list(by) == ["reference", "floor", "ddfast"] and by["floor"]["role"] == "floor"
    assert by["floor"]["check"] == "n/a" and runner.failed_rows(rows) == []
    floor, ref, mine = (by[p]["median_ms"] for p in ("floor", "reference", "ddfast"))
    assert by["floor"]["speedup"] == pytest.approx(ref / floor)  # the most any provider can reach
    assert by["ddfast"]["above_floor_ms"] == pytest.approx(mine - floor)
    if mine > floor:
        assert by["ddfast"]["speedup_above_floor"] == pytest.approx((ref - floor) / (mine - floor))
    assert "speedup_above_floor" not in by["floor"] and "speedup_vs" not in by["ddfast"]
    table = runner.format_table(rows)
    assert "above floor" in table.splitlines()[0] and runner.FLOOR_LEGEND in table
    from ddfast.bench.report import markdown
    md = markdown({"device": "cpu", "torch": "t", "commit": "x", "date": "2026-01-01", "results": rows})
    assert "| above floor |" in md and runner.FLOOR_LEGEND in md


def test_bench_compares_every_output_of_a_multi_output_op():
    """An op returning (y, loss), as bn_eval_stat: both outputs get gradient ones, both are compared."""
    def make(device):
        return {"x": torch.randn(8, device=device, requires_grad=True)}

    def case(fused):
        return Case(name="fake/two-outputs", make_inputs=make, reference=lambda x: (x * 2, (x * x).sum()),
                    fused=fused, backends=("auto",), grad_inputs=("x",))

    good = runner.run_case(case(lambda backend, x: (x + x, (x ** 2).sum())), torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0)
    assert {r["provider"]: r["check"] for r in good} == {"reference": "reference", "ddfast": "ok"}
    wrong_loss = case(lambda backend, x: (x + x, (x ** 2).sum() * 1.01))
    wrong_grad = case(lambda backend, x: (x + x, (x.detach() * x).sum()))  # half the loss's gradient
    for bad in (wrong_loss, wrong_grad):
        rows = runner.run_case(bad, torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0)
        assert [r["provider"] for r in runner.failed_rows(rows)] == ["ddfast"]


def test_bench_counts_host_syncs_of_a_provider():
    def reads_a_value(backend, x):
        scale = float(x.detach().abs().max())  # a host read: a sync on a GPU
        return (x * x).sum() * (scale / scale)

    rows = runner.run_case(_square_case(fused=reads_a_value, baselines={}, work_flops=None), torch.device("cpu"),
                           {"copy_gbs": 1.0}, 1, 0.0)
    by = {r["provider"]: r for r in rows}
    assert by["reference"]["syncs"] == 0 and by["ddfast"]["syncs"] >= 1
    assert "work" not in by["ddfast"]


def test_bench_compile_failure_is_an_error_row_not_a_crash(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = runner.run_case(_square_case(baselines={}), torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0,
                           compile_reference=True)
    by = {r["provider"]: r for r in rows}
    assert "no C++ compiler" in by["reference-compiled"]["error"]
    assert by["ddfast"]["check"] == "ok" and by["ddfast"]["speedup"] > 0
    assert runner.failed_rows(rows) == []  # reported, not fatal
    assert "error: RuntimeError: no C++ compiler" in runner.format_table(rows)


def test_gradient_match_dc_loop_baseline_equals_the_grouped_reference():
    case = next(c for c in all_cases() if c.name == "gradient_match/convnet3-cifar10-c10")
    inputs = case.make_inputs(torch.device("cpu"))
    inputs = dict(syn=[t.detach().double().requires_grad_(True) for t in inputs["syn"]],
                  real=[t.double() for t in inputs["real"]])
    losses, grads = [], []
    for fn in (case.reference, case.baselines["dc-loop"]):
        loss = fn(**inputs)
        losses.append(loss.detach())
        got = torch.autograd.grad(loss, inputs["syn"], allow_unused=True)  # rank-1 tensors: no gradient
        grads.append(torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                                for g, t in zip(got, inputs["syn"])]))
    # DC accumulates into torch.tensor(0.0): a float32 sum of float64 distances, as in DC
    assert losses[1].dtype == torch.float32
    torch.testing.assert_close(losses[1].double(), losses[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-14)


def test_bench_grad_input_may_be_a_list_of_leaves():
    """A model's per-tensor gradients as one grad input: no flat leaf viewed as the tensors, whose
    backward would concatenate the gradients (a copy timed with the op); compared flattened."""
    case = next(c for c in all_cases() if c.name == "gradient_match/convnet3-cifar10-c10")
    inputs = case.make_inputs(torch.device("cpu"))
    assert isinstance(inputs["syn"], list) and all(t.is_leaf and t.requires_grad for t in inputs["syn"])
    out, grads = runner._run_step(lambda: case.reference(**inputs), inputs, case.grad_inputs)
    assert grads["syn"].shape == (sum(t.numel() for t in inputs["syn"]),)
    want = torch.autograd.grad(case.reference(**inputs), inputs["syn"], allow_unused=True)
    assert any(g is None for g in want)  # the rank-1 tensors: zeros in the collected gradient
    torch.testing.assert_close(grads["syn"], torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                                                        for g, t in zip(want, inputs["syn"])]))
    rows = runner.run_case(case, torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0)
    assert runner.failed_rows(rows) == [] and {r["check"] for r in rows} <= {"reference", "ok"}


def _cancellation_case(fused):
    """A reference that loses everything to fp32 cancellation: ((a + b) - a) with |a| >> |b|."""
    def make(device):
        a = torch.full((4,), 3.0e7, device=device)
        b = torch.tensor([1.3, -2.7, 0.45, 5.1], device=device).requires_grad_(True)
        return {"a": a, "b": b}

    return Case(name="square/cancellation", make_inputs=make, reference=lambda a, b: ((a + b) - a) * b,
                fused=lambda backend, a, b: fused(a, b), backends=("auto",), grad_inputs=("b",), tol=1e-4)


def test_bench_judges_a_mismatch_against_float64_next_to_the_fp32_references_own_error():
    """cuDNN's TF32 convolutions put the fp32 DC/DM references 5e-2 from float64 (H200): a provider
    off the fp32 reference is ok when it is as close to float64 as that reference, else MISMATCH."""
    exact = lambda a, b: (b.double() * b.double()).to(b.dtype)  # noqa: E731 - the exact value, in fp32
    wrong = lambda a, b: 1.5 * b * b  # noqa: E731
    rows = {r["provider"]: r for r in runner.run_case(_cancellation_case(exact), torch.device("cpu"),
                                                      {"copy_gbs": 1.0}, 1, 0.0)}
    good = rows["ddfast"]
    assert good["check"] == "ok" and good["max_rel_err"] > 1e-4 and good["check_basis"] == "float64"
    assert good["err_vs_fp64"] < 1e-6 < good["ref_err_vs_fp64"]
    rows = {r["provider"]: r for r in runner.run_case(_cancellation_case(wrong), torch.device("cpu"),
                                                      {"copy_gbs": 1.0}, 1, 0.0)}
    assert rows["ddfast"]["check"] == "MISMATCH" and rows["ddfast"]["err_vs_fp64"] > 0.3


def test_bench_keeps_one_persistent_object_and_drops_it_after_each_case():
    """A case's CUDA-graph matcher is kept across its timed calls only (an H200 run OOMed from
    graphs kept since earlier cases)."""
    from ddfast.bench import case as case_mod

    built = []

    def fused(backend, x):
        obj = case_mod.persistent(x, lambda: built.append(object()) or built[-1])
        assert obj is built[-1]
        return (x * x).sum()

    rows = runner.run_case(_square_case(fused=fused, baselines={}, work_flops=None), torch.device("cpu"),
                           {"copy_gbs": 1.0}, 2, 0.0)
    assert rows[-1]["check"] == "ok"
    assert len(built) == 1  # one object for every call of the case (same owner)
    assert case_mod._PERSISTENT == {}  # released at the end of the case
    a, b = torch.zeros(1), torch.zeros(1)
    first = case_mod.persistent(a, object)
    assert case_mod.persistent(a, object) is first and case_mod.persistent(b, object) is not first


def test_dm_step_device_rng_case_checks_against_its_per_class_loop_and_times_dms_loop():
    case = next(c for c in all_cases() if c.name == "dm_step/convnet2-tiny-c3-ipc2-device-rng")
    rows = runner.run_case(case, torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0)
    by = {r["provider"]: r for r in rows}
    assert by["ddfast"]["check"] == "ok", by["ddfast"]  # the grouped device draws equal the per-class calls
    assert by["dm-loop"]["check"] == "n/a" and by["dm-loop"]["median_ms"] > 0
    assert "dm-loop" in by["ddfast"]["speedup_vs"] and runner.failed_rows(rows) == []
    assert by["ddfast"]["syncs"] == 0  # device-drawn DSA: no host sync after warm-up


def test_bench_reports_an_approximate_variants_miss_without_failing():
    """An opt-in lossy mode (the real side in bf16) is checked and its error shown, not fatal."""
    case = _square_case(fused=lambda backend, x: (x * x).sum() * (1.01 if backend == "lossy" else 1.0),
                        variants=("lossy", "exact"), approximate=("lossy",), baselines={}, work_flops=None)
    rows = runner.run_case(case, torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0)
    by = {r["provider"]: r for r in rows}
    assert by["lossy"]["check"] == "approx" and 5e-3 < by["lossy"]["max_rel_err"] < 2e-2
    assert by["exact"]["check"] == "ok" and runner.failed_rows(rows) == []
    wrong = _square_case(fused=lambda backend, x: (x * x).sum() * 1.01, variants=("lossy",), baselines={},
                         work_flops=None)  # the same miss in a provider not marked approximate fails
    assert [r["provider"] for r in runner.failed_rows(runner.run_case(
        wrong, torch.device("cpu"), {"copy_gbs": 1.0}, 1, 0.0))] == ["ddfast", "lossy"]


def test_dc_and_dm_bf16_real_variants_run_and_stay_close():
    cases = {c.name: c for c in all_cases()}
    for name in ("dc_step/convnet3-w32-c10-ipc1-r8-16px", "dm_step/convnet2-tiny-c3-ipc2"):
        case = cases[name]
        assert "bf16-real" in case.cuda_variants and case.approximate == ("bf16-real",)
        inputs = case.make_inputs(torch.device("cpu"))
        ref = float(case.reference(**inputs).detach())
        lossy = float(case.fused("bf16-real", **inputs).detach())
        assert lossy != ref and abs(lossy / ref - 1) < 2e-2, (name, lossy, ref)


def test_device_time_counter_reads_profiler_events_and_fills_kernel_bandwidth(monkeypatch):
    """device_us parses torch.profiler's events (CPU activity here: the same parsing as CUDA's
    kernels); the runner turns it into kernel GB/s against the copy peak, and a profiler failure
    costs that column only."""
    from ddfast.bench import counters

    x = torch.randn(256, 256)
    us = counters.device_us(lambda: (x @ x).sum(), calls=3, activity="cpu")
    assert us is not None and us > 0
    row = {}
    monkeypatch.setattr(counters, "device_us", lambda step: 250.0)
    runner._measure_device_time(row, lambda: None, nbytes=10**6, peaks={"copy_gbs": 8.0})
    assert row["device_us"] == 250.0 and row["kernel_gbs"] == pytest.approx(4.0)
    assert row["frac_peak_bw_kernel"] == pytest.approx(0.5)

    def broken(step):
        raise RuntimeError("no CUPTI")
    monkeypatch.setattr(counters, "device_us", broken)
    row = {}
    runner._measure_device_time(row, lambda: None, nbytes=1, peaks={"copy_gbs": 1.0})
    assert "kernel_gbs" not in row and "no CUPTI" in row["device_us_error"]


def test_profile_case_lists_the_top_ops_of_a_provider():
    from ddfast.bench.profile_case import profile_table, provider_step

    cpu = torch.device("cpu")
    table = profile_table(provider_step("param_match/convnet3-320k", "reference", cpu), cpu, calls=1, top=5)
    assert "aten::" in table
    with pytest.raises(ValueError, match="provider"):
        provider_step("param_match/convnet3-320k", "nonexistent", cpu)
    with pytest.raises(ValueError, match="case_name"):
        provider_step("param_match/none", "reference", cpu)
