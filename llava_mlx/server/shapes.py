"""The answers' shapes: how the engine's events become OpenAI's JSON, whole or streamed.

A request's engine events (engine.Job) are the same for every API: text with its logprob
entries, then a finish reason and usage, per choice. Each API shapes them its own way:
`ChatShape` (chat.completion and its chunks), `CompletionShape` (text_completion), and
`ResponseShape` (responses.py). http.py drives any of them: `whole()` once the answer is
complete, or `start()`, `text()`, `done()` and `end()` as server-sent events.
"""

import time
import uuid
from typing import Dict, List, Optional

from .request import Chat


def combined_usage(usages: Dict[int, dict]) -> dict:
    """One request's usage over its n choices: the prompt once, every choice's answer."""
    first = usages[min(usages)]
    completion = sum(u["completion_tokens"] for u in usages.values())
    return {
        "prompt_tokens": first["prompt_tokens"],
        "completion_tokens": completion,
        "total_tokens": first["prompt_tokens"] + completion,
        "prompt_tokens_details": first["prompt_tokens_details"],
    }


class Shape:
    """What every shape shares: the request, the model's name, one id and timestamp."""

    named_events = False  # SSE `event:` lines (the Responses API names its events)
    done_marker = True  # chat and completions end a stream with `data: [DONE]`

    def __init__(self, chat: Chat, model_id: str):
        self.chat, self.model_id = chat, model_id
        self.created = int(time.time())

    def error(self, error) -> List[dict]:
        return [error.body()]


class ChatShape(Shape):
    kind, prefix = "chat.completion", "chatcmpl"

    def __init__(self, chat: Chat, model_id: str):
        super().__init__(chat, model_id)
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"

    def envelope(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def logprobs(self, entries: list) -> Optional[dict]:
        return {"content": entries, "refusal": None} if self.chat.logprobs else None

    def choice(self, index: int, text: str, entries: list, finish: Optional[str]) -> dict:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": index, "message": message, "logprobs": self.logprobs(entries), "finish_reason": finish}

    def whole(self, texts: Dict[int, str], entries: Dict[int, list], finishes: Dict[int, str], usages) -> dict:
        choices = [self.choice(i, texts.get(i, ""), entries.get(i, []), finishes[i]) for i in sorted(finishes)]
        return {**self.envelope(self.kind), "choices": choices, "usage": combined_usage(usages)}

    # -- streamed --------------------------------------------------------------------
    def chunk(self, index: int, delta: dict, entries=None, finish=None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": self.logprobs(entries) if entries else None}
        choice["finish_reason"] = finish
        return self._with_usage({**self.envelope(self.kind + ".chunk"), "choices": [choice]})

    def _with_usage(self, chunk: dict, usage=None) -> dict:
        if self.chat.include_usage:
            chunk["usage"] = usage
        return chunk

    def start(self) -> List[dict]:
        return [self.chunk(i, {"role": "assistant", "content": ""}) for i in range(self.chat.n)]

    def text(self, index: int, text: str, entries: list) -> List[dict]:
        return [self.chunk(index, {"content": text}, entries)]

    def done(self, index: int, finish: str) -> List[dict]:
        return [self.chunk(index, {}, finish=finish)]

    def end(self, usages) -> List[dict]:
        if not self.chat.include_usage:
            return []
        return [self._with_usage({**self.envelope(self.kind + ".chunk"), "choices": []}, combined_usage(usages))]


class CompletionShape(ChatShape):
    """/v1/completions: `text` instead of a message or a delta."""

    kind, prefix = "text_completion", "cmpl"

    def choice(self, index: int, text: str, entries: list, finish: Optional[str]) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def chunk(self, index: int, delta: dict, entries=None, finish=None) -> dict:
        choice = {"index": index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        return self._with_usage({**self.envelope(self.kind), "choices": [choice]})

    def start(self) -> List[dict]:
        return []
