"""Device-independent figures of one forward+backward call: dispatched ops, host syncs, host µs.

They judge GPU behaviour without a GPU (and between GPU sessions):

* ``ops``: every op that reaches the dispatcher below autograd (aten ops and ddfast's custom ops,
  one each: a custom op's own kernels are not seen), counted by a ``TorchDispatchMode``. A proxy
  for kernel launches (view ops that launch nothing are counted too).
* ``syncs``: ``ddfast._sync.count_syncs`` (data-dependent ops, device<->host copies, tensors from
  Python data, Python reads of tensor values; on CUDA also torch's own sync reports). On CUDA a
  read of a CPU tensor (a CPU draw's ``.item()``) is not a sync and is not counted; on CPU every
  read counts, standing for the GPU run where the tensor may be on the device.
* ``host_us``: the host's share of the call. CUDA: wall time of the call from a synchronised start
  to its return, launches not synchronised (includes any wait a host sync forces). CPU (where
  kernels run on the host): CPU time of the calling thread during the call minus its CPU time
  inside the dispatched ops, each timed by a ``TorchDispatchMode``, minus that mode's own per-op
  cost, calibrated on a 1-element op so that such an op's host time equals its plain time. Thread
  CPU time, not wall time: a shared machine's descheduling would otherwise dominate. (On CPU the
  autograd engine runs the backward on the calling thread, so the backward's host work counts.)
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEFINITIONS = {
    "ops": "ops dispatched below autograd in one fwd+bwd call (TorchDispatchMode; aten and ddfast custom ops, "
           "one each; views included): a kernel-launch proxy. None for torch.compile'd code, whose kernels "
           "bypass the dispatcher",
    "syncs": "host syncs in one fwd+bwd call after warm-up, by ddfast._sync.count_syncs (target = the case's "
             "device: on CUDA reads of CPU tensors are not counted; on CPU every read counts)",
    "host_us": "CUDA: wall time of one fwd+bwd call from a synchronised start to its return, launches not "
               "synchronised (median). CPU: the calling thread's CPU time during the call minus its CPU time "
               "inside the dispatched ops (timed per op by a TorchDispatchMode) minus the mode's own per-op "
               "cost, calibrated on a 1-element op (median of 3). None for torch.compile'd code on CPU",
    "work": "flops the provider's algorithm executes / flops the reference executes (Case.work_flops model)",
    "device_us": "CUDA, cases with a bytes model: the summed device time of the kernels, copies and memsets "
                 "one fwd+bwd call runs (torch.profiler, mean of 5 calls); kern GB/s = bytes / device_us. "
                 "It shows what the kernels reach where host overhead decides the wall time",
}


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while active; with ``timed`` also the seconds spent inside them."""

    def __init__(self, timed: bool = False):
        super().__init__()
        self.ops = 0
        self.timed = timed
        self.inside_s = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if not self.timed:
            return func(*args, **(kwargs or {}))
        t0 = time.thread_time()
        out = func(*args, **(kwargs or {}))
        self.inside_s += time.thread_time() - t0
        return out


def count_ops(step: Callable[[], None]) -> int:
    with OpCounter() as counter:
        step()
    return counter.ops


def count_syncs(step: Callable[[], None], device_type: str = "cpu") -> Optional[int]:
    """Host syncs of one call, or None when ddfast._sync is not available. On a GPU
    (``device_type`` "cuda") reads of CPU tensors are not counted: they do not wait for the device."""
    try:
        from ddfast._sync import count_syncs as _count
    except ImportError:
        return None
    with _count(target=device_type) as syncs:
        step()
    return syncs.count


_MODE_COST_S: Dict[str, float] = {}


def mode_cost_per_op() -> float:
    """CPU seconds a timed OpCounter adds per op (beyond its in-op time), on a 1-element CPU add."""
    if "cpu" not in _MODE_COST_S:
        x = torch.ones(1)
        n = 2000

        def loop():
            for _ in range(n):
                torch.add(x, x)

        loop()
        with OpCounter(timed=True):  # the first use of a dispatch mode pays one-time setup
            loop()
        plain = min(_thread_cpu(loop) for _ in range(3))
        costs = []
        for _ in range(3):
            with OpCounter(timed=True) as counter:
                spent = _thread_cpu(loop)
            costs.append((spent - counter.inside_s - plain) / n)
        _MODE_COST_S["cpu"] = max(0.0, statistics.median(costs))
    return _MODE_COST_S["cpu"]


def _thread_cpu(fn: Callable[[], None]) -> float:
    """CPU time of the calling thread while fn runs."""
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def host_us_cpu(step: Callable[[], None], repeats: int = 3) -> float:
    """Host µs of one CPU call: thread CPU time outside the dispatched ops (see the module doc)."""
    cost = mode_cost_per_op()
    estimates = []
    for _ in range(repeats):
        with OpCounter(timed=True) as counter:
            spent = _thread_cpu(step)
        estimates.append(spent - counter.inside_s - counter.ops * cost)
    return statistics.median(estimates) * 1e6


def device_us(step: Callable[[], None], calls: int = 5, activity: str = "cuda") -> Optional[float]:
    """Summed duration (µs) of the device activity one call of ``step`` runs, by torch.profiler:
    the mean over ``calls`` calls. ``activity`` "cpu" reads the CPU ops instead (the tests use it
    to exercise the parsing without a GPU). None when the profiler gives no such events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    kind = {"cuda": (ProfilerActivity.CUDA, DeviceType.CUDA), "cpu": (ProfilerActivity.CPU, DeviceType.CPU)}
    act, dev = kind[activity]
    if activity == "cuda":
        torch.cuda.synchronize()
    with profile(activities=[act]) as prof:
        for _ in range(calls):
            step()
        if activity == "cuda":
            torch.cuda.synchronize()
    spans = [e.time_range.elapsed_us() for e in prof.events()
             if e.device_type == dev and (activity == "cuda" or e.cpu_parent is None)]
    total = sum(spans)
    return total / calls if spans and total > 0 else None
