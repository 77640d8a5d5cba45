"""The one cache of encoded media: projected image and video features by content key, the least
recently used evicted once they hold more than `max_bytes` (the newest entry always stays).

Encoding a picture is the costly part of a LLaVA prompt; the Python API's `SessionCache` and
the server's engine both keep what they encoded here, so a follow-up turn or another request
about the same picture skips the tower.
"""

from collections import OrderedDict
from typing import Callable, List

import mlx.core as mx

DEFAULT_FEATURE_BYTES = 256 << 20


class FeatureCache:
    def __init__(self, max_bytes: int = DEFAULT_FEATURE_BYTES):
        self.max_bytes = max_bytes
        self.entries: "OrderedDict[str, mx.array]" = OrderedDict()
        self.nbytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, keys: List[str], encode: Callable[[List[str]], List[mx.array]]) -> List[mx.array]:
        """The features of `keys` in order. Those not cached are encoded by one call of
        `encode(missing keys)` (each key once) and evaluated before they are kept."""
        missing = list(OrderedDict.fromkeys(k for k in keys if k not in self.entries))
        encoded = dict(zip(missing, encode(missing))) if missing else {}
        mx.eval(list(encoded.values()))
        for key, features in encoded.items():
            self._add(key, features)
        for key in keys:
            self.entries.move_to_end(key)
        result = [self.entries[k] if k in self.entries else encoded[k] for k in keys]
        self._evict()
        return result

    def put(self, key: str, features: mx.array):
        """Keep the (evaluated) features of `key`, encoded elsewhere (the server encodes a
        picture a few crops at a time)."""
        if key not in self.entries:
            self._add(key, features)
        self.entries.move_to_end(key)
        self._evict()

    def _add(self, key: str, features: mx.array):
        self.entries[key] = features
        self.nbytes += features.nbytes

    def _evict(self):
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes
