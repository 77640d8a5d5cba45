"""Log-probabilities as OpenAI reports them: the sampled token and the `top` likeliest,
each with its text and UTF-8 bytes.

They are those of the distribution the answer is drawn from, before temperature: the
decoder's, over the ids the sampler may pick (the tokenizer's vocabulary and the end of
turn, not the rows llava-hf pads the embeddings with) and, for a structured answer, over
the tokens its schema allows. Greedy answers are the same whether logprobs are asked for.
"""

from typing import Optional

import mlx.core as mx

MAX_TOP_LOGPROBS = 20  # OpenAI's bound


def vocabulary_mask(vocabulary: int, rows: int, eos_ids=()) -> Optional[mx.array]:
    """True for the ids a sampler may pick: below the tokenizer's base vocabulary, and the
    end-of-turn ids even past it (chatml's `<|im_end|>` is an added token in some
    tokenizers); None when every row is one."""
    if rows <= vocabulary:
        return None
    allowed = mx.arange(rows) < vocabulary
    extra = [i for i in eos_ids if vocabulary <= i < rows]
    if extra:
        allowed = allowed | (mx.arange(rows)[:, None] == mx.array(extra)[None]).any(axis=1)
    return allowed


class LogprobReporter:
    """Turns a step's log-probabilities (over every row) into OpenAI's logprobs entry."""

    def __init__(self, tokenizer, vocabulary: int, token_bytes: list, rows: int):
        self.tokenizer = tokenizer  # mlx-lm's TokenizerWrapper
        self.token_bytes = token_bytes  # each id's bytes (token_bytes.TokenTable.tokens)
        self.allowed = vocabulary_mask(vocabulary, rows, tokenizer.eos_token_ids)

    def entry(self, logprobs: mx.array, token: int, top: int, first: bool = False) -> dict:
        """The entry of `token`, sampled from `logprobs` (this step's, as the generator gives
        them), with the `top` likeliest tokens (0..20), likeliest first."""
        if self.allowed is not None:
            logprobs = mx.where(self.allowed, logprobs, -mx.inf)
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        ids = mx.argpartition(-logprobs, top - 1)[:top] if top else mx.array([], dtype=mx.uint32)
        values = logprobs[mx.concatenate([mx.array([token], dtype=ids.dtype), ids])].tolist()
        ranked = sorted(zip(ids.tolist(), values[1:]), key=lambda pair: -pair[1])
        return {
            **self._token(token, values[0], first),
            "top_logprobs": [self._token(i, v, first) for i, v in ranked],
        }

    def _token(self, token: int, logprob: float, first: bool) -> dict:
        data = self.token_bytes[token] if token < len(self.token_bytes) else b""
        if first and data.startswith(b" ") and not self.tokenizer.decode([token]).startswith(" "):
            data = data[1:]  # SentencePiece's word-start space, which the answer's text drops
        if token in self.tokenizer.eos_token_ids:
            data = b""  # the end of turn is no text
        return {
            "token": data.decode("utf-8", errors="replace"),
            "logprob": max(logprob, -9999.0),  # -inf is not JSON
            "bytes": list(data),
        }
