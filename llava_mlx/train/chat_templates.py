"""The LLaVA-NeXT code's chat-template conversations: `preprocess_qwen` (--version qwen_1_5,
qwen_2, qwen_2_5) and `preprocess_llama3` (llava_llama_3).

Each message is rendered by a chat template on its own (Qwen: the code's own one-message
ChatML template; Llama-3: the tokenizer's) and tokenized by the checkpoint's fast tokenizer with
`<image>` an added special token (the picture's place). A system message opens every record;
it and the user's messages are IGNORE, the assistant's messages trained whole, and wherever
they stand a few structural tokens are trained too, as that code unmasks them: Qwen's "\\n" (id
198, hard-coded there), <|im_start|> and <|im_end|> (the tokenizer's two additional special
tokens); Llama-3's <|begin_of_text|>, header tokens and <|eot_id|>. So a newline in a question
is a label, as in that code. Nothing is cut here: the collator cuts at model_max_length.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple

from ..errors import LlavaError
from ..model import IMAGE_PLACEHOLDER
from ..tokenizer import chunked_ids
from .templates import IGNORE, IMAGE, Template, Tokenizer

# preprocess_qwen resets the tokenizer's template to this one (no system message added per call)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_NEWLINE = 198  # preprocess_qwen's unmask list names "\n" by Qwen2's id
LLAMA_3_UNMASKED = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n")


@dataclass
class ChatTokenizer:
    render: Callable[[List[dict]], str]  # messages → the chat template's text
    encode: Callable[[str], List[int]]  # no special tokens added; <image> → IMAGE_PLACEHOLDER
    unmask: set  # ids trained wherever they stand
    drop_first: int  # tokens dropped from each message's ids (Llama-3: the BOS its template opens with)


def additional_special_tokens(path: Path) -> list:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if file.exists():
            tokens = json.loads(file.read_text(encoding="utf-8")).get("additional_special_tokens")
            if tokens:
                return [t["content"] if isinstance(t, dict) else t for t in tokens]
    return []


def chat_tokenizer(template: Template, hf, path: Path) -> ChatTokenizer:
    """The tokenizer side of preprocess_qwen or preprocess_llama3 for the checkpoint at `path`."""
    vocab = hf.get_vocab()

    def token_id(token: str):  # convert_tokens_to_ids: the unknown token's id for a missing one
        return vocab.get(token, hf.unk_token_id)

    def encode(text: str) -> List[int]:
        return chunked_ids(text, lambda s: hf(s, add_special_tokens=False).input_ids, None, {IMAGE: IMAGE_PLACEHOLDER})

    if template.version == "qwen":
        extra = additional_special_tokens(path)
        if len(extra) != 2:
            raise LlavaError(
                f"{path}'s tokenizer has {len(extra)} additional special tokens: --version {template.version} "
                "unmasks its two (<|im_start|>, <|im_end|>), as the LLaVA-NeXT code's preprocess_qwen"
            )
        return ChatTokenizer(
            render=lambda messages: hf.apply_chat_template(messages, chat_template=QWEN_CHAT_TEMPLATE, tokenize=False),
            encode=encode,
            unmask={QWEN_NEWLINE, *map(token_id, extra)} - {None},
            drop_first=0,
        )
    if not getattr(hf, "chat_template", None):
        raise LlavaError(f"{path}'s tokenizer has no chat template: llava_llama_3 renders with Llama-3's")
    return ChatTokenizer(
        render=lambda messages: hf.apply_chat_template(messages, tokenize=False),
        encode=encode,
        unmask={token_id(t) for t in LLAMA_3_UNMASKED} - {None},
        drop_first=1,
    )


def chat_labels(t: Template, messages: List[Tuple[str, str]], tok: Tokenizer):
    """(ids, labels, mismatch) of one record's messages [(speaker, text)], as preprocess_qwen
    and preprocess_llama3 make them (no mismatch rule there)."""
    chat = tok.chat
    if messages and messages[0][0] != "human":
        messages = messages[1:]  # a record opening with an answer loses it
    ids = chat.encode(chat.render([{"role": "system", "content": t.system}]))
    labels = [IGNORE] * len(ids)
    for who, text in messages:
        if who == "gpt" and IMAGE in text:
            raise LlavaError("an answer holds <image>: pictures go in the user's turns")
        role = t.roles[0] if who == "human" else t.roles[1]
        encoded = chat.encode(chat.render([{"role": role, "content": text}]))[chat.drop_first :]
        ids += encoded
        labels += encoded if who == "gpt" else [IGNORE] * len(encoded)
    labels = [i if i in chat.unmask else label for i, label in zip(ids, labels)]
    return ids, labels, False
