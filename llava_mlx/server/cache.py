"""The server's reuse across requests: image features by image content, and an LRU of KV
caches keyed by the merged sequence (token ids and (image, index) positions), from which a
request takes the KV of the longest prefix it shares with anything cached.

Both live in the engine thread (they hold MLX arrays). The prompt cache is mlx-lm's
`LRUPromptCache` (a trie over positions, bounded in bytes); only the keys are ours.
"""

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

# One model per server: the trie's model key.
MODEL_KEY = "llava"
DEFAULT_FEATURE_BYTES = 256 << 20


class FeatureCache:
    """Projected image features by image key, least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_FEATURE_BYTES):
        self.max_bytes = max_bytes
        self.entries: "OrderedDict[str, mx.array]" = OrderedDict()
        self.nbytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, model, keys: List[str], pixels: Dict[str, tuple], preprocess: Callable) -> List[mx.array]:
        """Features of each key, encoding those not cached in one batch. `pixels` holds
        (pixel_values, size) of the keys that were not cached when the request was
        prepared; `preprocess(key)` gives them for any evicted since."""
        missing = list(OrderedDict.fromkeys(k for k in keys if k not in self.entries))
        if missing:
            inputs = [pixels[k] if k in pixels else preprocess(k) for k in missing]
            values = mx.array(np.concatenate([p for p, _ in inputs]))
            sizes = [size for _, size in inputs]
            encoded = model.image_features(values, sizes)
            mx.eval(encoded)
            for k, feats in zip(missing, encoded):
                self.entries[k] = feats
                self.nbytes += feats.nbytes
        result = [self.entries[k] for k in keys]
        for k in keys:
            self.entries.move_to_end(k)
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes
        return result


class PromptCache:
    """KV caches of finished requests, LRU, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int):
        self.lru = LRUPromptCache(max_size=1 << 30, max_bytes=max_bytes)
        self.hits = 0

    @property
    def nbytes(self) -> int:
        return self.lru.nbytes

    def __len__(self):
        return len(self.lru)

    def fetch(self, keys: list) -> Tuple[Optional[list], int]:
        """(a copy of the KV of the longest cached prefix of `keys`, its length).

        At least the last position is left to run: its logits give the first token.
        """
        if self.lru.max_bytes <= 0:
            return None, 0
        cache, rest = self.lru.fetch_nearest_cache(MODEL_KEY, keys)
        if cache is None:
            return None, 0
        reused = len(keys) - len(rest)
        if reused == len(keys):
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            reused -= 1
        if reused > 0:
            self.hits += 1
        return cache, reused

    def insert(self, keys: list, cache: list):
        """Keep `cache`, which holds exactly the positions `keys`."""
        if self.lru.max_bytes <= 0 or not keys:
            return
        held = cache[0].offset
        if held != len(keys):
            raise ValueError(f"a KV cache of {held} positions recorded under {len(keys)} keys")
        self.lru.insert_cache(MODEL_KEY, list(keys), cache)
