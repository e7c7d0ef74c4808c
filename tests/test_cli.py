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


def test_gradient_matcher_sweep_runs():
    out = subprocess.run([sys.executable, "-m", "ddfast.bench.sweep_gradient_matcher", "--max-configs", "1",
                          "--repeats", "1", "--strategies", "loop,segmented"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "activations 0.66M" in out.stdout and "'segmented'" in out.stdout
