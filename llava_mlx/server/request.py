"""An OpenAI chat request, checked field by field.

Everything here runs in the HTTP threads, never touches MLX, and turns every bad input
into an `ApiError` (an OpenAI-shaped 4xx naming the field): JSON, fields and their types,
roles and their order, where the images and videos are (their URLs; prompt.py fetches and
decodes them). The messages become the prompt, in prompt.py, exactly as
`generate(..., history=...)` builds it.
"""

import json
import math
from dataclasses import dataclass, field
from typing import List, Optional

from ..constrain import schema_of
from ..errors import LlavaError
from ..logprobs import MAX_TOP_LOGPROBS
from ..processor import IMAGE_TOKEN
from ..video import DEFAULT_NUM_FRAMES, VIDEO_TOKEN

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4
MAX_CHOICES = 8  # n


class ApiError(Exception):
    """An error the client caused (or, with status 5xx, one it did not), OpenAI's shape."""

    TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens: int = 512  # the default answer length, and the most a request may ask for
    max_images: int = 4  # per request, all messages together
    max_image_pixels: int = 20_000_000  # width x height of one image, checked before decoding
    max_body_bytes: int = 20 << 20  # a request body; also the most an image URL may return
    image_url_timeout: float = 10.0  # s, for the whole download of one image URL
    private_image_urls: bool = False  # fetch image URLs on loopback, private and link-local addresses too
    max_videos: int = 1  # per request (video_url parts; models that take video)
    num_frames: int = DEFAULT_NUM_FRAMES  # sampled uniformly from each video


@dataclass
class Chat:
    """A checked request: the conversation and the generation options."""

    system: Optional[str]
    turns: List[tuple]  # [(question, answer)], the last answer None
    image_counts: List[int]  # images of each turn
    image_urls: List[tuple]  # [(where, url)] in order
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    raw: bool = False  # /v1/completions: the one turn is the prompt as written, no template
    n: int = 1  # choices, sharing one prefill
    logprobs: bool = False
    top_logprobs: int = 0
    schema: Optional[dict] = None  # the JSON schema the answer keeps to (response_format)
    api: str = "chat"  # which API's shape the answer takes: chat, completions, responses
    video_counts: List[int] = field(default_factory=list)  # videos of each turn (none: no videos)
    video_urls: List[tuple] = field(default_factory=list)

    def seed_of(self, index: int) -> Optional[int]:
        """Choice `index`'s seed: the request's for the first, the next ones after it."""
        return None if self.seed is None else (self.seed + index) % 2**64


def _number(body, name, low, high, default, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number", name)
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' is {value}: it must be in {bound}", name)
    return float(value)


def _integer(body, name, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", name)
    return value


def _boolean(body, name, default=False, param=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{param or name}' must be true or false", param or name)
    return value


def read_body(raw: bytes) -> dict:
    """The request body as a JSON object, or an ApiError."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:  # JSON may spell lone surrogates (\ud800), which no tokenizer can encode
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400, f"the request body holds text that is not valid Unicode (a lone surrogate at {e.start})"
        ) from None
    return body


def parse_chat(raw: bytes, limits: Limits) -> Chat:
    """The request body → a Chat, or an ApiError saying which field is wrong and why."""
    body = read_body(raw)
    options = generation_options(body, limits, limits.max_tokens)
    system, turns, counts, urls, video_counts, video_urls = parse_messages(body.get("messages"), limits)
    logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0)
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' is {top}: it must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
    if top and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return Chat(
        system=system,
        turns=turns,
        image_counts=counts,
        image_urls=urls,
        video_counts=video_counts if video_urls else [],
        video_urls=video_urls,
        logprobs=logprobs,
        top_logprobs=top,
        schema=response_schema(body.get("response_format"), "response_format"),
        **options,
    )


def response_schema(response_format, param: str) -> Optional[dict]:
    """The JSON schema of a response_format (constrain.py), or a 400 saying what is wrong."""
    try:
        return schema_of(response_format, name=param)
    except LlavaError as e:
        raise ApiError(400, str(e), param) from None


def parse_completion(raw: bytes, limits: Limits) -> Chat:
    """A /v1/completions body → a Chat of one raw turn (no template, no images)."""
    body = read_body(raw)
    for name in ("echo", "suffix"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported", name)
    if body.get("logprobs") is not None:
        raise ApiError(400, "'logprobs' is served by /v1/chat/completions ('logprobs': true), not here", "logprobs")
    if body.get("response_format") is not None:
        raise ApiError(
            400, "'response_format' is not part of /v1/completions: use /v1/chat/completions", "response_format"
        )
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "'best_of' other than 1 is not supported", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (one prompt per request)", "prompt")
    if IMAGE_TOKEN in prompt:
        raise ApiError(400, "images are not part of /v1/completions: send them to /v1/chat/completions", "prompt")
    # OpenAI's default answer length for completions is 16 tokens
    options = generation_options(body, limits, min(16, limits.max_tokens))
    return Chat(
        system=None, turns=[(prompt, None)], image_counts=[0], image_urls=[], raw=True, api="completions", **options
    )


def generation_options(body: dict, limits: Limits, default_max_tokens: int) -> dict:
    """The fields chat completions and completions share, checked."""
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", "model")
    n = _integer(body, "n", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"'n' is {n}: it must be between 1 and {MAX_CHOICES}", "n")
    if body.get("tools"):
        raise ApiError(400, "'tools' are not supported: LLaVA was not trained to call tools", "tools")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, default_max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(
            400, f"'{name}' is {max_tokens}: it must be between 1 and {limits.max_tokens} (--max-tokens)", name
        )
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**64:
        raise ApiError(400, f"'seed' is {seed}: it must be between 0 and 2**64 - 1", "seed")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return dict(
        n=n,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 0.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0, low_open=True),
        seed=seed,
        stop=stop,
        stream=_boolean(body, "stream"),
        include_usage=_boolean(options or {}, "include_usage", param="stream_options.include_usage"),
    )


def _parts(content, where: str, media_allowed: bool):
    """(text, [(where, image url)], [(where, video url)]) of a message's content: a string or a
    list of parts."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise ApiError(400, f"{where} must be a string or a non-empty list of content parts", "messages")
    texts, media = [], {"image_url": [], "video_url": []}
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{at}.text must be a string", "messages")
            for token in (IMAGE_TOKEN, VIDEO_TOKEN):
                if token in part["text"]:
                    raise ApiError(
                        400, f"{at}.text contains '{token}': send media as image_url / video_url parts", "messages"
                    )
            texts.append(part["text"])
        elif kind in media and media_allowed:
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{at}.{kind}.url must be a non-empty string", "messages")
            media[kind].append((at, url))
        elif kind in media:
            raise ApiError(400, f"{at}: only user messages may hold images and videos", "messages")
        else:
            raise ApiError(
                400,
                f"{at}: unsupported content part type {kind!r} (use 'text', 'image_url' or 'video_url')",
                "messages",
            )
    return "\n".join(texts), media["image_url"], media["video_url"]


def parse_messages(messages, limits: Limits):
    """(system, turns, image counts per turn, image urls, video counts per turn, video urls)
    from OpenAI messages.

    The order LLaVA's templates know: an optional system message, then user and
    assistant alternating, ending with the user's question.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    system, turns, counts, urls, video_counts, video_urls = None, [], [], [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role is {role!r}: it must be one of {', '.join(ROLES)}", "messages")
        text, images, videos = _parts(message.get("content"), f"{where}.content", role == "user")
        if role in ("system", "developer"):
            if i != 0:
                raise ApiError(400, f"{where}: a {role} message may only come first", "messages")
            system = text
        elif role == "user":
            if turns and turns[-1][1] is None:
                raise ApiError(
                    400, f"{where}: two user messages in a row (merge them, or add the assistant's answer)", "messages"
                )
            turns.append((text, None))
            counts.append(len(images))
            urls.extend(images)
            video_counts.append(len(videos))
            video_urls.extend(videos)
        else:
            if not turns or turns[-1][1] is not None:
                raise ApiError(400, f"{where}: an assistant message must answer a user message", "messages")
            turns[-1] = (turns[-1][0], text)
    if not turns or turns[-1][1] is not None:
        raise ApiError(400, "the last message must be the user's", "messages")
    if len(urls) > limits.max_images:
        raise ApiError(400, f"{len(urls)} images: at most {limits.max_images} per request (--max-images)", "messages")
    if len(video_urls) > limits.max_videos:
        raise ApiError(
            400, f"{len(video_urls)} videos: at most {limits.max_videos} per request (--max-videos)", "messages"
        )
    return system, turns, counts, urls, video_counts, video_urls
