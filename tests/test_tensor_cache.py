"""ddfast._tensor_cache: a value computed once per (tensor identity, version)."""
import gc

import torch

from ddfast._tensor_cache import TensorCache, host_copy

SIZE = 16


def _counting(t, calls):
    def make():
        calls.append(1)
        return t.clone()
    return make


def test_same_tensor_is_read_once_until_written():
    cache, t, calls = TensorCache(SIZE), torch.tensor([0, 1, 2]), []
    first = cache.get(t, _counting(t, calls))
    assert cache.get(t, _counting(t, calls)) is first and len(calls) == 1
    t.add_(1)  # an in-place write bumps the version: read again
    again = cache.get(t, _counting(t, calls))
    assert len(calls) == 2 and torch.equal(again, torch.tensor([1, 2, 3]))
    t[0] = 7  # a write through indexing too
    assert cache.get(t, _counting(t, calls))[0] == 7 and len(calls) == 3


def test_equal_values_in_another_tensor_are_read_again():
    cache, a, b, calls = TensorCache(SIZE), torch.tensor([4, 5]), torch.tensor([4, 5]), []
    cache.get(a, _counting(a, calls))
    cache.get(b, _counting(b, calls))
    assert len(calls) == 2


def test_entry_leaves_with_its_tensor_and_the_cache_is_bounded():
    cache, t = TensorCache(SIZE), torch.tensor([1])
    cache.get(t, lambda: t.clone())
    key = id(t)
    assert key in cache.entries
    del t
    gc.collect()
    assert key not in cache.entries
    keep = [torch.tensor([i]) for i in range(SIZE + 5)]
    for k in keep:
        cache.get(k, lambda k=k: k.clone())
    assert len(cache.entries) <= SIZE
    assert id(keep[-1]) in cache.entries and id(keep[0]) not in cache.entries


def test_inference_tensors_are_not_cached():
    with torch.inference_mode():
        t = torch.tensor([1, 2])
    cache, calls = TensorCache(SIZE), []
    cache.get(t, _counting(t, calls))
    cache.get(t, _counting(t, calls))
    assert len(calls) == 2


def test_host_copy_of_a_cpu_tensor_is_the_tensor():
    t = torch.tensor([3, 1])
    assert host_copy(t) is t


def test_a_tensor_in_use_stays_cached_while_others_pass_through():
    """Least recently used first: a tensor looked up every step survives a stream of others."""
    cache, hot, calls = TensorCache(SIZE), torch.tensor([9]), []
    cache.get(hot, _counting(hot, calls))
    passing = [torch.tensor([i]) for i in range(3 * SIZE)]
    for k in passing:
        cache.get(k, lambda k=k: k.clone())
        cache.get(hot, _counting(hot, calls))
    assert len(calls) == 1
