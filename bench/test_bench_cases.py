"""The ``ddfast bench`` cases under pytest-benchmark (forward+backward per case and provider).

    python -m pytest bench/test_bench_cases.py --benchmark-only            # the default cases
    DDFAST_BENCH_FULL=1 python -m pytest bench/test_bench_cases.py --benchmark-only --benchmark-json out.json

Providers: the reference, each of the case's baselines (e.g. DC's per-class loop) and the first
available ddfast provider; each is checked against the reference before it is timed, as in ``ddfast bench``
(except the baselines in ``Case.unchecked``, which draw their own random numbers, and a case's floor).
Not part of the test suite (``testpaths = tests``).
"""
import os

import pytest
import torch

from ddfast.bench.cases import select_cases
from ddfast.bench.runner import ExactReference, _run_step, _sync, check, providers_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("DDFAST_BENCH_FULL") == "1"
CASES = select_cases(DEVICE.type, FULL)


PAIRS = [(case, provider) for case in CASES
         for provider in ["reference", *case.baselines, *(["floor"] if case.floor else []), "ddfast"]]


@pytest.mark.parametrize("case,provider", PAIRS, ids=[f"{c.name}-{p}" for c, p in PAIRS])
def test_case(benchmark, case, provider):
    inputs = case.make_inputs(DEVICE)
    ref_fn = lambda: case.reference(**inputs)  # noqa: E731
    if provider == "reference":
        fn = ref_fn
    elif provider == "floor":  # the work every provider shares (Case.floor): timed only
        fn = lambda: case.floor(**inputs)  # noqa: E731
    elif provider in case.unchecked:  # its own random draws: timed only
        fn = lambda: case.baselines[provider](**inputs)  # noqa: E731
    elif provider in case.baselines:
        fn = lambda: case.baselines[provider](**inputs)  # noqa: E731
        ok, err, _ = check(case, inputs, _run_step(ref_fn, inputs, case.grad_inputs), fn, ExactReference(case, DEVICE, inputs))
        assert ok, f"{case.name}[{provider}] differs from the reference (max rel err {err:.2e})"
    else:
        provs = providers_for(case, DEVICE)
        if not provs:
            pytest.skip(f"no ddfast provider for {case.name} on {DEVICE.type}")
        name, prov = next(iter(provs.items()))  # the first available, in case.backends order
        fn = lambda: prov(inputs)  # noqa: E731
        ok, err, _ = check(case, inputs, _run_step(ref_fn, inputs, case.grad_inputs), fn, ExactReference(case, DEVICE, inputs))
        assert ok, f"{case.name}[{name}] differs from the reference (max rel err {err:.2e})"
        benchmark.extra_info["provider"] = name

    def step():
        _run_step(fn, inputs, case.grad_inputs, collect=False)
        _sync(DEVICE)

    benchmark(step)
