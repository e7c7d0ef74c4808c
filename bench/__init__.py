"""Benchmarks (installed as ``ddfast.bench``): the ``ddfast bench`` runner and its cases.

Each module in ``bench/cases/`` holds the cases of one op (``Case`` objects named
``op/setting``); the runner checks every ddfast provider against the reference, then times
forward+backward of each. ``bench/test_bench_*.py`` expose the same cases to pytest-benchmark.
"""
