"""ddfast validate: a real quick run on CPU (tiny selections), and a failing step shows as FAIL."""
import argparse
import json
import sys
import xml.etree.ElementTree as ET

import pytest

from ddfast import validate as V


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    V.add_arguments(parser)
    return parser.parse_args(["--out", str(tmp_path), *extra])


def test_quick_run_on_cpu_reports_every_step_and_an_injected_failure(tmp_path):
    args = _args(tmp_path, "--quick", "--tests", "tests/test_param_match.py", "--tests-k", "bad_input",
                 "--bench-select", "^param_match/convnet3", "--compile-backend", "eager")
    failing = V.Step("injected-failure", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 60)
    summary = V.validate(args, extra_steps=[failing], cuda=False)
    status = {s["name"]: s for s in summary["steps"]}
    assert [s["name"] for s in summary["steps"]] == ["info", "info-kernels", "tests", "bench", "bench-compiled",
                                                     "memcheck", "racecheck", "injected-failure"]
    for name in ("info", "tests", "bench", "bench-compiled"):
        assert status[name]["status"] == V.PASS, (name, status[name], (tmp_path / f"{name}.log").read_text()[-3000:])
    assert status["memcheck"]["status"] == status["racecheck"]["status"] == V.SKIP
    assert status["tests"]["details"]["passed"] > 0 and status["tests"]["details"]["failed"] == 0
    bench = status["bench"]["details"]
    assert bench["cases"] == 1 and bench["worst_speedup"]["case"] == "param_match/convnet3-320k"
    compiled = json.loads((tmp_path / "bench-compiled.json").read_text())
    assert any(r["provider"] == "reference-compiled" and r.get("median_ms") for r in compiled["results"])
    assert (tmp_path / "plots" / "param_match.png").exists()
    assert "torch" in (tmp_path / "info.log").read_text()

    assert status["injected-failure"]["status"] == V.FAIL and status["injected-failure"]["returncode"] == 3
    assert "boom" in (tmp_path / "injected-failure.log").read_text()
    assert summary["status"] == V.FAIL
    assert any(f.startswith("injected-failure: exit status 3") for f in summary["failures"])
    md = (tmp_path / "SUMMARY.md").read_text()
    assert md.startswith("# ddfast validate: FAIL")
    assert "| injected-failure | FAIL |" in md and "| bench | PASS |" in md and "| memcheck | SKIP |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == V.FAIL


def test_timeout_and_spent_budget_fail_and_passing_steps_pass(tmp_path):
    args = _args(tmp_path, "--budget-min", "1")
    steps = [V.Step("ok", [sys.executable, "-c", "pass"], 30),
             V.Step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1),
             V.Step("gpu-only", [sys.executable, "-c", "pass"], 30, needs_cuda=True)]
    summary = V.validate(args, steps=steps, cuda=False)
    status = {s["name"]: s for s in summary["steps"]}
    assert status["ok"]["status"] == V.PASS
    assert status["slow"]["status"] == V.FAIL and "timed out" in status["slow"]["reason"]
    assert status["slow"]["duration_s"] < 15
    assert status["gpu-only"]["status"] == V.SKIP
    assert summary["status"] == V.FAIL

    args = _args(tmp_path, "--budget-min", "0")
    summary = V.validate(args, steps=[V.Step("late", [sys.executable, "-c", "pass"], 30)], cuda=False)
    assert summary["steps"][0]["status"] == V.FAIL and "budget" in summary["steps"][0]["reason"]


def test_parallel_parts_run_at_once_and_any_failing_part_fails_the_step(tmp_path, monkeypatch):
    args = _args(tmp_path, "--budget-min", "1")
    sleep = [sys.executable, "-c", "import time; time.sleep(2); print('sl' + 'ept')"]
    no_tests = [sys.executable, "-c", "import sys; sys.exit(5)"]  # pytest: no test selected
    steps = [V.Step("both-ok", [], 30, parts=[sleep, sleep, no_tests]),
             V.Step("one-fails", [], 30, parts=[sleep, [sys.executable, "-c", "import sys; sys.exit(3)"]]),
             V.Step("one-hangs", [], 3, parts=[sleep, [sys.executable, "-c", "import time; time.sleep(60)"]])]
    summary = V.validate(args, steps=steps, cuda=False)
    status = {s["name"]: s for s in summary["steps"]}
    assert status["both-ok"]["status"] == V.PASS and status["both-ok"]["duration_s"] < 3.9  # not 2 + 2 s
    log = (tmp_path / "both-ok.log").read_text()
    assert log.count("slept") == 2 and log.count("# exit status 0") == 2 and "# exit status 5" in log
    assert status["one-fails"]["status"] == V.FAIL and "exit status 3" in status["one-fails"]["reason"]
    assert status["one-hangs"]["status"] == V.FAIL and "timed out" in status["one-hangs"]["reason"]
    assert status["one-hangs"]["duration_s"] < 15
    assert "slept" in (tmp_path / "one-hangs.log").read_text()
    assert not list(tmp_path.glob("*.log.*"))  # the parts' logs are merged
    # a part that cannot start stops nothing else from being cleaned up: no process left running
    broken = V.Step("broken", [], 30, parts=[[sys.executable, "-c", "import time; time.sleep(60)"],
                                              ["/nonexistent/program"]])
    import pytest

    started, popen = [], V.subprocess.Popen
    monkeypatch.setattr(V.subprocess, "Popen", lambda *a, **k: started.append(popen(*a, **k)) or started[-1])
    with pytest.raises(FileNotFoundError):
        V._run_logged(broken, str(tmp_path / "broken.log"), 30)
    assert len(started) == 1 and started[0].poll() is not None


def _junit(path, cases):
    suite = ET.Element("testsuite")
    for name, outcome, message in cases:
        case = ET.SubElement(suite, "testcase", classname="tests.test_x", name=name)
        if outcome != "passed":
            ET.SubElement(case, outcome, message=message)
    ET.ElementTree(suite).write(path)


def test_a_skipped_cuda_test_fails_the_tests_step_on_cuda(tmp_path):
    _junit(tmp_path / "tests.xml", [("test_a[cpu-torch]", "passed", ""), ("test_a[cuda-compiled]", "passed", ""),
                                    ("test_b[cuda-triton]", "skipped", "backend unavailable"),
                                    ("test_c[cpu-triton]", "skipped", "interpreter only"),
                                    ("test_d[cuda-torch]", "skipped", "not applicable: the reference by design")])
    counts = V.parse_junit(str(tmp_path / "tests.xml"))
    assert (counts["tests"], counts["passed"], counts["skipped"]) == (5, 2, 3)
    assert (counts["cuda_tests"], counts["cuda_skipped"]) == (3, 1)  # a skip that does not apply is no failure
    for cuda, want in ((True, V.FAIL), (False, V.PASS)):
        result = {"status": V.PASS}
        V._post_tests(cuda)(result, str(tmp_path))
        assert result["status"] == want, result
    _junit(tmp_path / "tests.xml", [("test_a[cpu-torch]", "passed", "")])
    result = {"status": V.PASS}
    V._post_tests(True)(result, str(tmp_path))
    assert result["status"] == V.FAIL and "no CUDA test" in result["reason"]


def test_sanitizer_steps_cover_the_ops_with_kernels():
    files = V._op_test_files()
    assert "tests/test_gradient_match.py" in files and "tests/test_param_match.py" in files
    shared = V._op_test_files(shared_memory_only=True)
    assert shared and set(shared) <= set(files)


def test_cuda_plan_fits_a_gpu_lease(tmp_path, monkeypatch):
    """On a GPU the defaults fit a 15-minute lease (10 minutes per command, machine start included):
    the CUDA tests only, no CPU-side compile report or compiled-reference bench, all steps' timeouts
    within the 9.5-minute budget."""
    monkeypatch.setattr(V, "find_compute_sanitizer", lambda: "/usr/local/cuda/bin/compute-sanitizer")
    args = _args(tmp_path)
    V.apply_device_defaults(args, cuda=True)
    steps = {s.name: s for s in V.plan(args, True, str(tmp_path))}
    assert args.budget_min == 9.5 and args.tests_k == "cuda"
    assert steps["tests"].cmd[steps["tests"].cmd.index("-k") + 1] == "cuda"
    assert steps["info-kernels"].skip_reason and steps["bench-compiled"].skip_reason
    assert "--full" in steps["bench"].cmd and "--kernels" not in steps["bench"].cmd
    assert steps["bench"].cmd[steps["bench"].cmd.index("--min-seconds") + 1] == "0.1"
    assert "compiled" in args.sanitize_k and "not gradcheck" in args.sanitize_k
    select = steps["bench"].cmd[steps["bench"].cmd.index("-k") + 1]
    assert select == V.CUDA_BENCH_SELECT and "dc_step" in select
    for tool in ("memcheck", "racecheck"):  # one sanitizer process per op test file, at once
        assert len(steps[tool].parts) >= 2 and all(p.count("-k") == 1 and p[-3].startswith("tests/test_")
                                                   for p in steps[tool].parts)
    assert sum(s.timeout_s for s in steps.values() if not s.skip_reason) <= args.budget_min * 60
    assert tuple(steps) == V.STEP_NAMES  # --skip's list names every step the plan makes
    args = _args(tmp_path)
    V.apply_device_defaults(args, cuda=False)
    assert (args.budget_min, args.tests_k, args.compile_reference) == (25, None, True)


def test_summary_lists_the_kernel_bandwidth_of_each_bandwidth_case():
    rows = [{"case": "param_match/x", "provider": "reference", "role": "reference", "frac_peak_bw_kernel": 0.3},
            {"case": "param_match/x", "provider": "cuda", "role": "ddfast", "frac_peak_bw_kernel": 0.72,
             "frac_peak_bw": 0.3},
            {"case": "param_match/x", "provider": "triton", "role": "ddfast", "frac_peak_bw_kernel": 0.96,
             "frac_peak_bw": 0.18},
            {"case": "dc_step/y", "provider": "ddfast", "role": "ddfast"}]
    details = V.bench_details({"results": rows, "speedups": {}})
    assert details["kernel_bandwidth"] == {"param_match/x": {"provider": "triton", "kernel": 0.96, "wall": 0.18}}
    result = {"name": "bench", "status": V.PASS, "details": details}
    summary = V.summarize([result], {"device": "d", "torch": "t", "cuda": None, "commit": "c", "python": "3"},
                          "now", 1.0, "ddfast validate")
    assert "- param_match/x: kernels 96 % (triton); wall clock 18 %" in V.markdown(summary)


def test_gpu_lease_scripts_parse_and_name_existing_cases_and_providers():
    """bench/gpu/*.sh run unattended on a rare GPU lease: a renamed case or provider must fail here."""
    import re
    import subprocess
    from pathlib import Path

    import torch

    from ddfast.bench.cases import all_cases
    from ddfast.bench.runner import providers_for

    root = Path(__file__).resolve().parent.parent / "bench" / "gpu"
    for script in ("setup.sh", "validate.sh", "profile.sh", "lease.sh"):
        subprocess.run(["bash", "-n", str(root / script)], check=True)
    cases = {c.name: c for c in all_cases()}
    for script, count in (("profile.sh", 3), ("lease.sh", 5)):
        text = (root / script).read_text()
        specs = re.findall(r'"((?:bn_stat|dc_step|dm_step|norm_relu_pool)/[\w.-]+) (\w[\w-]*)"', text)
        assert len(specs) == count, script
        for name, provider in specs:
            assert name in cases and "cuda" in cases[name].devices, name
            assert provider in providers_for(cases[name], torch.device("cuda")), (name, provider)
        for test_file in re.findall(r"tests/\w+\.py", text):
            assert (root.parent.parent / test_file).exists(), test_file
    # lease.sh's validate options parse, and its skipped step exists
    for options in re.findall(r"ddfast\.cli validate (.*?) >", (root / "lease.sh").read_text()):
        args = _args(Path("/tmp"), *[o for o in options.split() if not o.startswith('"$V"') and o != "--out"])
        assert args.skip == ("racecheck",)


def test_skip_turns_named_steps_into_skips_and_rejects_unknown_names(tmp_path):
    args = _args(tmp_path, "--skip", "racecheck,bench-compiled")
    V.apply_device_defaults(args, cuda=True)
    steps = {s.name: s for s in V.plan(args, True, str(tmp_path))}
    assert steps["racecheck"].skip_reason == "--skip" and steps["bench-compiled"].skip_reason
    assert steps["memcheck"].skip_reason is None and steps["tests"].skip_reason is None
    with pytest.raises(SystemExit):
        _args(tmp_path, "--skip", "racechek")


def test_issue13_targets_are_judged_from_the_bench_rows():
    rows = [
        {"case": "dc_step/convnet3-cifar10-ipc10", "provider": "reference", "role": "reference", "speedup": 1.0},
        {"case": "dc_step/convnet3-cifar10-ipc10", "provider": "ddfast", "role": "ddfast", "check": "ok", "speedup": 3.7},
        {"case": "dc_step/convnet3-cifar10-ipc10", "provider": "graph", "role": "ddfast", "check": "ok", "speedup": 4.2},
        {"case": "dc_step/convnet3-cifar10-ipc50", "provider": "bf16-real", "role": "ddfast", "check": "ok",
         "speedup": 3.5},  # an opt-in lossy mode does not count
        {"case": "dc_step/convnet3-cifar10-ipc50", "provider": "ddfast", "role": "ddfast", "check": "ok", "speedup": 2.7},
        {"case": "gradient_match/convnet3-cifar10-c10", "provider": "cuda", "role": "ddfast", "check": "ok",
         "speedup": 2.5, "speedup_vs": {"dc-loop": 19.8}},
        {"case": "param_match/resnet18-11M", "provider": "triton", "role": "ddfast", "check": "ok",
         "frac_peak_bw_kernel": 0.96},
        {"case": "bn_stat/b32-c64-32x32", "provider": "cuda", "role": "ddfast", "check": "MISMATCH", "speedup": 9.0},
    ]
    assert len(V.target_verdicts(rows)) == len(V.TARGETS)
    got = {t["case"]: t for t in V.target_verdicts(rows)}
    assert got["dc_step/convnet3-cifar10-ipc10"]["status"] == "MET"
    assert got["dc_step/convnet3-cifar10-ipc10"]["provider"] == "graph"
    assert got["dc_step/convnet3-cifar10-ipc50"]["status"] == "MISSED"
    assert got["dc_step/convnet3-cifar10-ipc50"]["value"] == 2.7
    assert got["gradient_match/convnet3-cifar10-c10"]["status"] == "MISSED"  # 19.8 < 20 against the loop
    assert got["param_match/resnet18-11M"]["status"] == "MET"
    assert got["bn_stat/b32-c64-32x32"]["status"] == "not measured"  # a failed check proves nothing
    summary = V.summarize([{"name": "bench", "status": V.PASS, "details": {"targets": V.target_verdicts(rows)}}],
                          {"device": "d", "torch": "t", "cuda": None, "commit": "c", "python": "3"}, "now", 1.0, "cmd")
    text = V.markdown(summary)
    assert "## Issue-13 targets" in text
    assert "| DC step, ipc 50 | `dc_step/convnet3-cifar10-ipc50` (x vs reference) | 2.70x (ddfast) | ≥ 3x | MISSED |" in text
    assert "96 % (triton) | ≥ 70 % | MET" in text


def test_resnet18_bn_target_is_judged_above_the_teachers_floor_and_the_whole_step_shows_its_bound():
    from ddfast.bench.runner import _add_speedups

    case = "bn_stat/resnet18-224-b100"
    rows = [{"case": case, "provider": "reference", "role": "reference", "median_ms": 31.4},
            {"case": case, "provider": "floor", "role": "floor", "check": "n/a", "median_ms": 17.0},
            {"case": case, "provider": "cuda", "role": "ddfast", "check": "ok", "median_ms": 19.4}]
    _add_speedups(rows)
    got = {t["target"]: t for t in V.target_verdicts(rows) if t["case"] == case}
    part = got["BN statistics inside SRe2L's ResNet-18 step"]
    assert part["measure"] == "above_floor" and part["status"] == "MET"
    assert part["value"] == pytest.approx((31.4 - 17.0) / (19.4 - 17.0), rel=1e-3)
    whole = got["SRe2L's ResNet-18 step, whole"]
    assert whole["status"] == "MISSED" and whole["bound"] == pytest.approx(31.4 / 17.0, rel=1e-3)
    summary = V.summarize([{"name": "bench", "status": V.PASS, "details": {"targets": V.target_verdicts(rows)}}],
                          {"device": "d", "torch": "t", "cuda": None, "commit": "c", "python": "3"}, "now", 1.0, "cmd")
    text = V.markdown(summary)
    assert "x vs reference, time above the floor row) | 6.00x (cuda) | ≥ 2x | MET |" in text
    assert "| 1.62x (cuda) | ≥ 2x | MISSED (the floor allows at most 1.85x) |" in text


def test_issue13_targets_name_existing_cases_and_baselines():
    import torch

    from ddfast.bench.cases import all_cases
    from ddfast.bench.runner import providers_for

    cases = {c.name: c for c in all_cases()}
    for _label, case, measure, _threshold in V.TARGETS:
        assert case in cases and "cuda" in cases[case].devices, case
        assert measure in ("reference", "kernel_bw", "above_floor") or measure in cases[case].baselines, (case, measure)
        if measure == "above_floor":
            assert cases[case].floor is not None, case
        assert providers_for(cases[case], torch.device("cuda")), case
        if measure == "kernel_bw":
            assert cases[case].bytes_moved is not None, case
