"""The bytes each token stands for, read from the tokenizer itself.

Logprobs report them and the grammar engine (llguidance) matches schemas against them. They
follow the tokenizer's own decoder, step by step, as `tokenizers` decodes one token:
byte-level BPE (GPT-2's byte alphabet: Llama-3, Qwen), SentencePiece pieces ('▁' for a space,
by a `Metaspace` decoder or a `Replace`), byte-fallback pieces (`<0x0A>` is the byte 0x0A when
the decoder has `ByteFallback`, the text '<0x0A>' when it has not), and added tokens (their
content). Effects at the start of a sequence only (Metaspace's prepend scheme, a `Strip`
after `Fuse`) are not a token's: the logprob reporter drops the first word-start space itself.
A decoder this module cannot read (WordPiece, CTC, a BPE suffix) is one clear `LlavaError`.
"""

import functools
import json
import re
import weakref
from dataclasses import dataclass
from typing import List

from .errors import LlavaError

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
PER_TOKEN_STEPS = ("ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip")


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict:
    """GPT-2's byte-level alphabet, character → byte: printable bytes stand for themselves,
    the others (0-32, 127-160, 173) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


def decoder_steps(decoder) -> List[dict]:
    """The decoder's steps in order (a `Sequence` flattened); [] for no decoder."""
    if decoder is None:
        return []
    if decoder.get("type") == "Sequence":
        return [step for inner in decoder.get("decoders", []) for step in decoder_steps(inner)]
    return [decoder]


def readable(steps: List[dict]):
    """Raise a LlavaError naming the first step whose per-token effect is unknown."""
    for step in steps:
        if step.get("type") not in PER_TOKEN_STEPS:
            raise LlavaError(
                f"this tokenizer's decoder ({step.get('type')}) is not one whose token bytes llava-mlx can read, "
                "so it cannot report logprobs or hold answers to a JSON schema"
            )


def piece_bytes(piece: str, steps: List[dict]) -> bytes:
    """The bytes of one vocabulary piece, through the decoder's steps."""
    fused = False
    for step in steps:
        kind = step["type"]
        if kind == "ByteLevel":
            alphabet = byte_alphabet()
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
        elif kind == "Metaspace":
            piece = piece.replace(step.get("replacement", "▁"), " ")
        elif kind == "Replace":
            pattern, content = step["pattern"], step.get("content", "")
            if "String" in pattern:
                piece = piece.replace(pattern["String"], content)
            else:
                piece = re.sub(pattern["Regex"], content, piece)
        elif kind == "ByteFallback":
            match = BYTE_PIECE.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
        elif kind == "Fuse":
            fused = True  # later steps see the whole text, not a token
        elif kind == "Strip" and not fused:
            start, stop, content = step.get("start", 0), step.get("stop", 0), step.get("content", " ")
            while start and piece.startswith(content):
                piece, start = piece[len(content) :], start - 1
            while stop and piece.endswith(content):
                piece, stop = piece[: -len(content)], stop - 1
    return piece.encode("utf-8")


@dataclass
class TokenTable:
    """Every id's bytes and the special ids, with the tokenizer's own encoding: what
    llguidance's `TokenizerWrapper` takes."""

    tokens: List[bytes]
    special_token_ids: List[int]
    eos_token_id: int
    bos_token_id: object
    encoder: object  # text -> ids, no special tokens added

    def __call__(self, text) -> List[int]:
        """The tokenizer's ids for `text`, when their bytes spell it; else a greedy longest match
        (a tokenizer that puts a word-start space before any text spells something else); else,
        when no token spells some byte of it, the tokenizer's ids all the same."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self.encoder(data.decode("utf-8", errors="replace"))
        if b"".join(self.tokens[i] for i in ids) == data:
            return ids
        return self.greedy(data) or ids

    @functools.cached_property
    def _by_bytes(self) -> dict:
        special = set(self.special_token_ids)
        found = {}
        for i, data in enumerate(self.tokens):
            if data and i not in special:
                found.setdefault(data, i)
        return found

    def greedy(self, data: bytes) -> List[int]:
        """The longest token at each position; [] if some byte is spelled by no token."""
        by_bytes, longest, ids, i = self._by_bytes, max(map(len, self._by_bytes)), [], 0
        while i < len(data):
            n = next((n for n in range(min(longest, len(data) - i), 0, -1) if data[i : i + n] in by_bytes), 0)
            if not n:
                return []
            ids.append(by_bytes[data[i : i + n]])
            i += n
        return ids


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_table(hf) -> TokenTable:
    """The `TokenTable` of a transformers tokenizer, made once."""
    table = _TABLES.get(hf)
    if table is None:
        table = _TABLES[hf] = _read_table(hf)
    return table


def _read_table(hf) -> TokenTable:
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise LlavaError(
            "this tokenizer has no tokenizers (tokenizer.json) backend, whose vocabulary llava-mlx reads for "
            "logprobs and JSON schemas"
        )
    steps = decoder_steps(json.loads(backend.to_str()).get("decoder"))
    readable(steps)
    added = hf.added_tokens_decoder
    size = max(len(hf), max(added, default=-1) + 1)
    pieces = hf.convert_ids_to_tokens(list(range(size)))
    tokens = [
        added[i].content.encode("utf-8") if i in added else piece_bytes(piece or "", steps)
        for i, piece in enumerate(pieces)
    ]
    eos = hf.eos_token_id if hf.eos_token_id is not None else 0
    return TokenTable(
        tokens=tokens,
        special_token_ids=sorted(i for i, token in added.items() if token.special),
        eos_token_id=eos,
        bos_token_id=hf.bos_token_id,
        encoder=lambda text: hf.encode(text, add_special_tokens=False),
    )
