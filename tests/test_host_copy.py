"""ddfast.ops._host_copy: a device tensor read on the host once per (identity, version)."""
import gc

import torch

from ddfast.ops import _host_copy as hc


def _counting(t, calls):
    def make():
        calls.append(1)
        return t.clone()
    return make


def test_same_tensor_is_read_once_until_written():
    t, calls = torch.tensor([0, 1, 2]), []
    first = hc.cached_by_identity(t, _counting(t, calls))
    assert hc.cached_by_identity(t, _counting(t, calls)) is first and len(calls) == 1
    t.add_(1)  # an in-place write bumps the version: read again
    again = hc.cached_by_identity(t, _counting(t, calls))
    assert len(calls) == 2 and torch.equal(again, torch.tensor([1, 2, 3]))
    t[0] = 7  # a write through indexing too
    assert hc.cached_by_identity(t, _counting(t, calls))[0] == 7 and len(calls) == 3


def test_equal_values_in_another_tensor_are_read_again():
    a, b, calls = torch.tensor([4, 5]), torch.tensor([4, 5]), []
    hc.cached_by_identity(a, _counting(a, calls))
    hc.cached_by_identity(b, _counting(b, calls))
    assert len(calls) == 2


def test_entry_leaves_with_its_tensor_and_the_cache_is_bounded():
    t = torch.tensor([1])
    hc.cached_by_identity(t, lambda: t.clone())
    key = id(t)
    assert key in hc._copies
    del t
    gc.collect()
    assert key not in hc._copies
    keep = [torch.tensor([i]) for i in range(hc.CACHE_SIZE + 5)]
    for k in keep:
        hc.cached_by_identity(k, lambda k=k: k.clone())
    assert len(hc._copies) <= hc.CACHE_SIZE
    assert id(keep[-1]) in hc._copies and id(keep[0]) not in hc._copies


def test_inference_tensors_are_not_cached():
    with torch.inference_mode():
        t = torch.tensor([1, 2])
    calls = []
    hc.cached_by_identity(t, _counting(t, calls))
    hc.cached_by_identity(t, _counting(t, calls))
    assert len(calls) == 2


def test_host_copy_of_a_cpu_tensor_is_the_tensor():
    t = torch.tensor([3, 1])
    assert hc.host_copy(t) is t


def test_a_tensor_in_use_stays_cached_while_others_pass_through():
    """Least recently used first: a tensor looked up every step survives a stream of others."""
    hot, calls = torch.tensor([9]), []
    hc.cached_by_identity(hot, _counting(hot, calls))
    passing = [torch.tensor([i]) for i in range(3 * hc.CACHE_SIZE)]
    for k in passing:
        hc.cached_by_identity(k, lambda k=k: k.clone())
        hc.cached_by_identity(hot, _counting(hot, calls))
    assert len(calls) == 1
