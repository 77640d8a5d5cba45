"""POST /v1/responses: OpenAI's Responses API (`client.responses.create`), the one the newest
SDKs and agent frameworks call, on the same engine as chat completions.

A request becomes the same `Chat` as a chat completion: `instructions` is the system
message, `input` a string or a list of messages whose parts are `input_text`,
`input_image` (a URL or a data: URI) and, in the assistant's earlier answers,
`output_text`; `max_output_tokens`, `temperature`, `top_p`; `text.format` a JSON schema
(the same grammar engine as `response_format`). What needs state or tools is refused
with the reason: nothing is stored (`store: true`, `previous_response_id`, `conversation`,
`background`), and LLaVA was not trained to call tools.
"""

import time
import uuid
from typing import Dict, List

from .request import ApiError, Chat, Limits, _integer, generation_options, parse_messages, read_body, response_schema
from .shapes import Shape, combined_usage

PARTS = {"input_text": "text", "output_text": "text", "input_image": "image_url"}
STATEFUL = {
    "previous_response_id": "responses are not stored: send the whole conversation in 'input'",
    "conversation": "conversations are not stored: send the whole conversation in 'input'",
    "background": "background responses are not supported: the answer comes in this request",
    "prompt": "stored prompt templates are not supported",
}


def _message(item, i: int) -> dict:
    """A Responses input item as a chat message."""
    where = f"input[{i}]"
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        kind = item.get("type") if isinstance(item, dict) else type(item).__name__
        raise ApiError(400, f"{where}: only message items are supported, not {kind!r}", "input")
    content = item.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PARTS:
                raise ApiError(
                    400, f"{where}.content[{j}]: unsupported part type {kind!r} (input_text, input_image)", "input"
                )
            if kind == "input_image":
                url = part.get("image_url")
                if part.get("file_id") is not None or not isinstance(url, str):
                    raise ApiError(400, f"{where}.content[{j}]: input_image needs image_url (no file ids)", "input")
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append({"type": "text", "text": part.get("text")})
        content = parts
    return {"role": item.get("role"), "content": content}


def parse_response_request(raw: bytes, limits: Limits) -> Chat:
    """A /v1/responses body → a Chat, or an ApiError naming the field."""
    body = read_body(raw)
    for name, reason in STATEFUL.items():
        if body.get(name):
            raise ApiError(400, f"'{name}': {reason}", name)
    if body.get("store"):
        raise ApiError(400, "'store': responses are not stored here (send store: false, or leave it out)", "store")
    if body.get("tools"):
        raise ApiError(400, "'tools' are not supported: LLaVA was not trained to call tools", "tools")
    text_options = body.get("text")
    if text_options is not None and not isinstance(text_options, dict):
        raise ApiError(400, "'text' must be an object", "text")
    fmt = (text_options or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # flat here, nested in chat completions
        fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    schema = response_schema(fmt, "text.format")
    max_tokens = _integer(body, "max_output_tokens", limits.max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(
            400,
            f"'max_output_tokens' is {max_tokens}: it must be between 1 and {limits.max_tokens} (--max-tokens)",
            "max_output_tokens",
        )
    chat_fields = {k: body.get(k) for k in ("model", "temperature", "top_p", "stream")}
    options = generation_options({**chat_fields, "max_tokens": max_tokens}, limits, limits.max_tokens)
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'input' must be a string or a non-empty list of messages", "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, "'instructions' must be a string", "instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + [
        _message(item, i) for i, item in enumerate(items)
    ]
    try:
        system, turns, counts, urls, _, videos = parse_messages(messages, limits)
    except ApiError as e:
        raise ApiError(e.status, e.message.replace("messages[", "input["), "input") from None
    if videos:  # Responses has no video part; a chat-style video_url part is not one of its types
        raise ApiError(400, "videos are sent to /v1/chat/completions (video_url parts)", "input")
    return Chat(
        system=system, turns=turns, image_counts=counts, image_urls=urls, schema=schema, api="responses", **options
    )


def response_usage(usages: Dict[int, dict]) -> dict:
    usage = combined_usage(usages)
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


class ResponseShape(Shape):
    """The response object, and its stream of named events (response.created, ...
    response.output_text.delta ..., response.completed)."""

    named_events, done_marker = True, False

    def __init__(self, chat: Chat, model_id: str):
        super().__init__(chat, model_id)
        self.id, self.item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.sequence = 0
        self.parts: List[str] = []

    def _format(self) -> dict:
        if self.chat.schema is None:
            return {"type": "text"}
        return {"type": "json_schema", "name": "answer", "schema": self.chat.schema, "strict": True}

    def response(self, status: str, text=None, finish=None, usages=None) -> dict:
        output = []
        if text is not None:
            output = [self.item("completed", text)]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model_id,
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": self.chat.system,
            "max_output_tokens": self.chat.max_tokens,
            "temperature": self.chat.temperature,
            "top_p": self.chat.top_p,
            "text": {"format": self._format()},
            "tools": [],
            "tool_choice": "none",
            "parallel_tool_calls": False,
            "store": False,
            "metadata": {},
            "usage": response_usage(usages) if usages else None,
        }

    def part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, status: str, text=None) -> dict:
        content = [] if text is None else [self.part(text)]
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def whole(self, texts, entries, finishes, usages) -> dict:
        finish = finishes[0]
        return self.response("incomplete" if finish == "length" else "completed", texts.get(0, ""), finish, usages)

    # -- streamed --------------------------------------------------------------------
    def event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def _at(self) -> dict:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def start(self) -> List[dict]:
        self.created = int(time.time())
        return [
            self.event("response.created", response=self.response("in_progress")),
            self.event("response.in_progress", response=self.response("in_progress")),
            self.event("response.output_item.added", output_index=0, item=self.item("in_progress")),
            self.event("response.content_part.added", **self._at(), part=self.part("")),
        ]

    def text(self, index: int, text: str, entries: list) -> List[dict]:
        if not text:
            return []
        self.parts.append(text)
        return [self.event("response.output_text.delta", **self._at(), delta=text, logprobs=[])]

    def done(self, index: int, finish: str) -> List[dict]:
        self.finish = finish
        text = "".join(self.parts)
        return [
            self.event("response.output_text.done", **self._at(), text=text, logprobs=[]),
            self.event("response.content_part.done", **self._at(), part=self.part(text)),
            self.event("response.output_item.done", output_index=0, item=self.item("completed", text)),
        ]

    def end(self, usages) -> List[dict]:
        status = "incomplete" if self.finish == "length" else "completed"
        whole = self.response(status, "".join(self.parts), self.finish, usages)
        return [self.event(f"response.{status}", response=whole)]

    def error(self, error) -> List[dict]:
        body = error.body()["error"]
        return [self.event("error", code=body["code"], message=body["message"], param=body["param"])]
