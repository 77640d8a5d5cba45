"""The one feature cache (features.py): each key encoded once per stay, the least recently used
evicted past the byte bound, the newest entry always kept."""

import mlx.core as mx

from llava_mlx.features import FeatureCache


def encoder(log):
    def encode(keys):
        log.append(list(keys))
        return [mx.full((4, 8), float(len(k)), dtype=mx.float32) for k in keys]  # 128 bytes each

    return encode


def test_encodes_only_what_is_missing_once():
    log, cache = [], FeatureCache(max_bytes=10_000)
    first = cache.get(["a", "bb", "a"], encoder(log))
    assert log == [["a", "bb"]]  # one call, the repeated key once
    assert [f.shape for f in first] == [(4, 8)] * 3 and first[0] is first[2]
    cache.get(["bb", "ccc"], encoder(log))
    assert log == [["a", "bb"], ["ccc"]] and len(cache) == 3 and cache.nbytes == 3 * 128


def test_least_recently_used_go_past_the_byte_bound():
    log, cache = [], FeatureCache(max_bytes=2 * 128)
    cache.get(["a"], encoder(log))
    cache.get(["b"], encoder(log))
    cache.get(["a"], encoder(log))  # a is now the most recent
    cache.get(["c"], encoder(log))  # three entries: b, the least recent, goes
    assert "a" in cache and "c" in cache and "b" not in cache and cache.nbytes == 2 * 128
    cache.get(["b"], encoder(log))
    assert log[-1] == ["b"]  # evicted, so encoded again


def test_the_newest_entry_stays_even_over_the_bound():
    cache = FeatureCache(max_bytes=10)
    (features,) = cache.get(["big"], encoder([]))
    assert "big" in cache and len(cache) == 1 and features.shape == (4, 8)
