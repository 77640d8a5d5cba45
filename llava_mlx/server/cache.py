"""The server's KV reuse across requests: an LRU of KV caches keyed by the merged sequence
(token ids and (image, index) positions), from which a request takes the KV of the longest
prefix it shares with anything cached. Image features are kept by features.py.

It lives in the engine thread (it holds MLX arrays). It is mlx-lm's `LRUPromptCache` (a trie
over positions, bounded in bytes); only the keys are ours.
"""

from typing import Optional, Tuple

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

# One model per server: the trie's model key.
MODEL_KEY = "llava"


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
