"""The original train.py's conversations: each `--version` a row of conversation.py's templates,
its prompt as `Conversation.get_prompt` writes it, and its labels as `preprocess_plain`,
`_v1`, `_llama_2`, `_mpt` or the generic `preprocess` mask them: every human turn, the system
prompt and the picture's position are IGNORE; each answer (and the separator closing it) is
trained. The masks are computed the way the original computes them, from the token counts of
its own pieces, quirks included (the "- 2" of each instruction, the legacy-tokenizer
correction of rounds after the first, the "+ 2" of the generic path's speaker signal), and a
record whose counts disagree with its tokens is masked whole, as the original does with its
"tokenization mismatch" warning.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from ..errors import LlavaError

IGNORE = -100
IMAGE = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user with "
    "a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
VICUNA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Template:
    """A row of conversation.py: how turns are written (`style`) and which preprocess masks them."""

    style: str  # SINGLE, TWO, MPT, PLAIN, LLAMA_2
    system: str
    roles: Tuple[str, str]
    sep: str
    sep2: Optional[str]
    version: str

    @property
    def mmtag(self) -> bool:
        return "mmtag" in self.version


TWO = dict(style="TWO", roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>")
MPT = dict(style="MPT", roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>", sep2=None)
LLAMA_2 = dict(style="LLAMA_2", roles=("USER", "ASSISTANT"), sep="<s>", sep2="</s>")
SINGLE = dict(style="SINGLE", roles=("Human", "Assistant"), sep="###", sep2=None)
VICUNA_V1 = Template(**TWO, system=VICUNA_SYSTEM, version="v1")
PLAIN = Template(style="PLAIN", system="", roles=("", ""), sep="\n", sep2=None, version="Unknown")
CHATML = Template(**MPT, system="<|im_start|>system\nAnswer the questions.", version="mpt")
MPT_SYSTEM = "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
MPT_SYSTEM += "The assistant gives helpful and honest answers."

# --version → the template, as train() picks it (conv_templates; v0 and v0.5 keep the module's
# default, vicuna_v1). An unknown version is refused (train() would fall back to vicuna_v1).
TEMPLATES = {
    "v0": VICUNA_V1,
    "v0.5": VICUNA_V1,
    "default": Template(**SINGLE, system=VICUNA_V0_SYSTEM, version="Unknown"),
    "v1": VICUNA_V1,
    "vicuna_v1": VICUNA_V1,
    "llama_2": Template(**LLAMA_2, system=LLAMA_2_SYSTEM, version="llama_v2"),
    "mistral_instruct": Template(**{**LLAMA_2, "sep": ""}, system="", version="llama_v2"),
    "chatml_direct": CHATML,
    "mistral_direct": CHATML,
    "plain": PLAIN,
    "v0_plain": PLAIN,
    "llava_v0": Template(**SINGLE, system=VICUNA_V0_SYSTEM, version="Unknown"),
    "v0_mmtag": Template(**SINGLE, system=MMTAG_SYSTEM, version="v0_mmtag"),
    "llava_v1": Template(**TWO, system=LLAVA_SYSTEM, version="v1"),
    "v1_mmtag": Template(**TWO, system=MMTAG_SYSTEM, version="v1_mmtag"),
    "llava_llama_2": Template(**LLAMA_2, system=LLAVA_LLAMA_2_SYSTEM, version="llama_v2"),
    "mpt": Template(**MPT, system=MPT_SYSTEM, version="mpt"),
}

# The LLaVA-NeXT code's conversation.py: the same rows where it has the same names, its own
# defaults (v0 and v0.5 keep its module's default, vicuna_v0), and its chat-template versions
# (chat_templates.py: preprocess_qwen for every qwen version, with its own system prompt).
QWEN = Template(style="CHAT", system="You are a helpful assistant.", roles=("user", "assistant"), sep="", sep2=None,
                version="qwen")  # fmt: skip
LLAMA_3 = Template(
    style="CHAT",
    system="You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language.",
    roles=("user", "assistant"),
    sep="",
    sep2=None,
    version="llama_v3",
)
NEXT_SHARED = ("v1", "vicuna_v1", "llama_2", "mistral_instruct", "mistral_direct", "plain", "v0_plain",
               "chatml_direct", "llava_v0", "llava_v1", "llava_llama_2", "mpt")  # fmt: skip
NEXT_TEMPLATES = {
    **{name: TEMPLATES[name] for name in NEXT_SHARED},
    "default": TEMPLATES["default"],
    "v0": TEMPLATES["default"],
    "v0.5": TEMPLATES["default"],
    "llava_v0_mmtag": TEMPLATES["v0_mmtag"],
    "llava_v1_mmtag": TEMPLATES["v1_mmtag"],
    "llava_mistral_instruct": TEMPLATES["mistral_instruct"],
    "qwen_1_5": QWEN,
    "qwen_2": QWEN,
    "qwen_2_5": QWEN,
    "llava_llama_3": LLAMA_3,
}
CODES = {"original": ("the original code", TEMPLATES), "next": ("the LLaVA-NeXT code", NEXT_TEMPLATES)}


def template(version: str, code: str = "original") -> Template:
    name, table = CODES[code]
    if version not in table:
        raise LlavaError(f"--version {version!r} is not a conversation template of {name}: one of {', '.join(table)}")
    return table[version]


def prompt(t: Template, turns: List[str]) -> str:
    """`Conversation.get_prompt` of alternating human / gpt messages."""
    if t.style == "SINGLE":
        return t.system + t.sep + "".join(f"{t.roles[i % 2]}: {m}{t.sep}" for i, m in enumerate(turns))
    if t.style == "TWO":
        seps = (t.sep, t.sep2)
        return t.system + seps[0] + "".join(f"{t.roles[i % 2]}: {m}{seps[i % 2]}" for i, m in enumerate(turns))
    if t.style == "MPT":
        return t.system + t.sep + "".join(f"{t.roles[i % 2]}{m}{t.sep}" for i, m in enumerate(turns))
    if t.style == "LLAMA_2":
        text = ""
        for i, message in enumerate(turns):
            if i == 0 and t.system:
                message = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n{message}"
            text += f"{t.sep}[INST] {message} [/INST]" if i % 2 == 0 else f" {message} {t.sep2}"
        return text.lstrip(t.sep)  # as str.lstrip does it: the characters of sep
    raise LlavaError(f"no prompt for the {t.style} style")


@dataclass
class Tokenizer:
    """What the masks need of the tokenizer: `encode(text)` (the slow tokenizer's ids, BOS
    first), `with_images(text)` (tokenizer_image_token), its pad id, whether it is `legacy`,
    and model_max_length (text-only records are truncated there when tokenized)."""

    encode: Callable[[str], List[int]]
    with_images: Callable[[str], List[int]]
    pad_id: int
    legacy: bool
    max_length: int
    chat: Optional[object] = None  # chat_templates.ChatTokenizer, for the LLaVA-NeXT code's chat versions


def labels_of(t: Template, messages: List[Tuple[str, str]], tok: Tokenizer, has_image: bool):
    """(ids, labels, mismatch) of one record's messages [(speaker, text)], speakers "human" and
    "gpt", picked as the original's `preprocess` picks: PLAIN, LLAMA_2, a "v1" version, "mpt",
    else the generic path. `mismatch`: the original's count of its tokens disagrees, and every
    label is then IGNORE."""
    if t.style == "PLAIN":
        return plain(t, [m for _, m in messages], tok)
    if not (t.style == "LLAMA_2" or t.version.startswith("v1") or t.version == "mpt"):
        return speaker_signals(t, messages, tok, has_image)
    if messages and messages[0][0] != "human":
        messages = messages[1:]  # as the original: a record opening with an answer loses it
    text = prompt(t, [m for _, m in messages])
    ids = tok.with_images(text) if has_image else tok.encode(text)[: tok.max_length]
    count = tok.with_images if has_image else tok.encode
    labels = list(ids)
    total = sum(1 for i in ids if i != tok.pad_id)
    if t.style == "LLAMA_2":
        cur = rounds(text, t.sep2, "[/INST] ", count, labels, first=1, cut=2, later=0)
    elif t.version == "mpt":
        cur = mpt_rounds(t, text, count, labels, tok.legacy)
    else:  # the non-legacy slow tokenizer counts each round after the first one short (tokenizers >= 0.14)
        cur = rounds(
            text, t.sep2, t.sep + t.roles[1] + ": ", count, labels, first=1, cut=2, later=0 if tok.legacy else -1
        )
    labels[cur:] = [IGNORE] * max(0, len(labels) - cur)
    mismatch = cur < tok.max_length and cur != total
    if mismatch:
        labels = [IGNORE] * len(labels)
    return ids, labels, mismatch


def mask(labels: List[int], start: int, n: int):
    labels[start : start + n] = [IGNORE] * len(labels[start : start + n])


def rounds(text: str, split: str, sep: str, count, labels: List[int], first: int, cut: int, later: int) -> int:
    """preprocess_v1 and preprocess_llama_2: the text split into rounds at `split`, each round's
    instruction (up to `sep`, less `cut` tokens) masked; `later` corrects the count of every
    round after the first; the first `first` tokens (BOS) masked. Returns where the rounds end."""
    cur = first
    mask(labels, 0, first)
    for i, part in enumerate(text.split(split)):
        if part == "":
            break
        pieces = part.split(sep)
        if len(pieces) != 2:
            break
        round_len, instruction_len = len(count(part)), len(count(pieces[0] + sep)) - cut
        if i != 0:
            round_len, instruction_len = round_len + later, instruction_len + later
        mask(labels, cur, instruction_len)
        cur += round_len
    return cur


def mpt_rounds(t: Template, text: str, count, labels: List[int], legacy: bool) -> int:
    """preprocess_mpt: the system, first question and answer make the first round; then pairs."""
    sep = t.sep + t.roles[1]
    parts = text.split(t.sep)
    rounds = [t.sep.join(parts[:3])] + [t.sep.join(parts[i : i + 2]) for i in range(3, len(parts), 2)]
    cur = 0
    for i, part in enumerate(rounds):
        if part == "":
            break
        pieces = part.split(sep)
        if len(pieces) != 2:
            break
        round_len, instruction_len = len(count(part)), len(count(pieces[0] + sep)) - 1
        if i != 0 and legacy:
            round_len, instruction_len = round_len + 1, instruction_len + 1
        mask(labels, cur, instruction_len)
        cur += round_len
    return cur


def plain(t: Template, turns: List[str], tok: Tokenizer):
    """preprocess_plain (pretraining): the picture alone, then the caption and "\\n"."""
    if len(turns) != 2 or IMAGE not in turns[0]:
        raise LlavaError(
            "--version plain takes records of one picture and one caption (two turns, <image> in the first)"
        )
    ids = tok.with_images(IMAGE + turns[1] + t.sep)
    masked = len(tok.with_images(IMAGE))
    return ids, [IGNORE] * masked + ids[masked:], False


def speaker_signals(t: Template, messages: List[Tuple[str, str]], tok: Tokenizer, has_image: bool):
    """The generic `preprocess` (SINGLE templates): "### Role: message\n" per message, each
    human message masked from its third token on, as `_mask_targets` does."""
    header = f"{t.system}\n\n"
    signed = [f"### {t.roles[0] if who == 'human' else t.roles[1]}: {m}\n" for who, m in messages]
    text = header + "".join(signed) + "### "
    if has_image:
        ids, lens = tok.with_images(text), [len(tok.with_images(s)) for s in [header, *signed]]
    else:
        ids = tok.encode(text)[: tok.max_length]
        lens = [sum(1 for i in tok.encode(s)[: tok.max_length] if i != tok.pad_id) for s in [header, *signed]]
    labels, cur = list(ids), lens[0]
    mask(labels, 0, cur)
    for (who, _), n in zip(messages, lens[1:]):
        if who == "human":
            mask(labels, cur + 2, n - 2)
        cur += n
    return ids, labels, False


def place_image(turns: List[str], t: Template, start_end: bool) -> List[str]:
    """preprocess_multimodal: in every message holding <image>, the placeholder moved to its
    front on a line of its own (<Image>…</Image> for mmtag templates); with
    mm_use_im_start_end, wrapped in <im_start> / <im_end>."""
    out = []
    for message in turns:
        if IMAGE in message:
            message = (IMAGE + "\n" + message.replace(IMAGE, "").strip()).strip()
            if t.mmtag:
                message = message.replace(IMAGE, "<Image>" + IMAGE + "</Image>")
        if start_end:
            message = message.replace(IMAGE, "<im_start>" + IMAGE + "<im_end>")
        out.append(message)
    return out
