"""Training data as the original's LazySupervisedDataset reads it, checked whole before the first step.

Records are LLaVA's own JSON (a list of {id, image: a path under --image_folder,
conversations: [{from: human | gpt, value}]}, `image` absent for text-only records, a list of
paths for several pictures under the LLaVA-NeXT code's rules) or a JSONL
of OpenAI-style {"messages": [...]} (what mlx-lm and mlx-vlm users have): user and assistant
turns, a picture as an `image_url` part (a path under --image_folder, a file:// URL or a data:
URI) where it stands in the user's content. Every record is checked and tokenized before
training starts (`prepare`): a missing or corrupt picture, turns that do not alternate, more
`<image>` than pictures, a record with nothing to train on within model_max_length are each one
line naming the record and the file, and nothing is trained.
"""

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..anyres import preprocess_image
from ..errors import LlavaError
from ..model import IMAGE_PLACEHOLDER, LlavaConfig
from ..processor import load_image
from .chat_templates import chat_labels
from .templates import IGNORE, IMAGE, Template, Tokenizer, labels_of, place_image

SPEAKERS = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass
class Example:
    """One record, tokenized and masked."""

    id: str
    images: list  # each picture as a path or the bytes of a data: URI, in the order of their placeholders
    sizes: List[Tuple[int, int]]  # each picture's (width, height)
    ids: List[int]  # with IMAGE_PLACEHOLDER where each picture goes
    labels: List[int]
    mismatch: bool  # the original's tokenization-mismatch rule masked it whole
    words: int  # the original's `modality_lengths`: words, negative for text-only records

    @property
    def has_image(self) -> bool:
        return bool(self.images)


def read_records(path: Path) -> List[dict]:
    """The records of a LLaVA JSON list, or of a JSONL of OpenAI messages (turned into LLaVA's form)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlavaError(f"cannot read the data {path}: {e}") from None
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [
                messages_record(json.loads(line), f"line {n + 1}")
                for n, line in enumerate(text.splitlines())
                if line.strip()
            ]
    except json.JSONDecodeError as e:
        raise LlavaError(f"{path} is neither a JSON list of records nor JSON lines: {e}") from None
    if not records:
        raise LlavaError(f"{path} holds no records")
    return records


def messages_record(row, where: str) -> dict:
    """An OpenAI-style {"messages": [...]} as a LLaVA record: the picture's <image> where its part stands."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise LlavaError(f"{where}: a JSONL record is an object with a 'messages' list")
    record, turns, pictures = {"id": row.get("id", where)}, [], []
    for message in row["messages"]:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise LlavaError(
                f"{where}: role {role!r}: LLaVA's templates take user and assistant turns "
                "(the system prompt is the template's own)"
            )
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise LlavaError(f"{where}: a message's content is a string or a list of parts")
        texts = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(part.get("text", ""))
            elif kind in ("image_url", "image"):
                value = part.get(kind)
                pictures.append(value.get("url") if isinstance(value, dict) else value)
                texts.append(IMAGE)
            else:
                raise LlavaError(f"{where}: content part {kind!r} (text and image_url are taken)")
        turns.append({"from": SPEAKERS[role], "value": "\n".join(texts)})
    record["conversations"] = turns
    if pictures:
        record["image"] = pictures[0] if len(pictures) == 1 else pictures
    return record


def picture_source(image, folder: Optional[Path]):
    """A path under --image_folder, a file:// URL, or a data: URI's bytes."""
    if not isinstance(image, str) or not image:
        raise LlavaError(f"its image is {image!r}, not a file name")
    if image.startswith("data:"):
        header, _, data = image.partition(",")
        if not header.endswith(";base64"):
            raise LlavaError("its data: URI is not base64")
        return base64.b64decode(data)
    if image.startswith("file://"):
        return image[len("file://") :]
    if folder is None:
        raise LlavaError(f"its image {image!r} needs --image_folder")
    return str(Path(folder) / image)


def check_picture(source) -> Tuple[int, int]:
    """Open and decode the picture (JPEGs at an eighth of their size: a truncated one still
    fails); its (width, height)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            size = image.size
            image.draft("RGB", (64, 64))
            image.load()
            return size
    except FileNotFoundError:
        raise LlavaError(f"its picture {source} does not exist") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise LlavaError(
            f"its picture {source if isinstance(source, str) else '(data URI)'} is not a readable image ({e})"
        ) from None


def turns_of(record: dict, template: Template, start_end: bool, code: str, pictures: int) -> List[Tuple[str, str]]:
    """[(speaker, text)] after preprocess_multimodal, checked: speakers, alternation, one
    <image> per picture."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise LlavaError("it has no 'conversations' list")
    turns = []
    for turn in conversations:
        speaker = SPEAKERS.get(turn.get("from")) if isinstance(turn, dict) else None
        if speaker is None or not isinstance(turn.get("value"), str):
            raise LlavaError(f"a turn {turn!r} is not {{'from': 'human' | 'gpt', 'value': text}}")
        turns.append((speaker, turn["value"]))
    opening = 1 if turns[0][0] == "gpt" else 0  # the original drops an opening answer
    for i, (speaker, _) in enumerate(turns[opening:]):
        if speaker != ("human", "gpt")[i % 2]:
            raise LlavaError(f"its turns do not alternate human, gpt (turn {i + opening + 1} is {speaker}'s)")
    texts = [t for _, t in turns]
    if pictures:
        texts = place_image(texts, template, start_end) if code == "original" else next_place_image(texts, template)
        holders = sum(t.count(IMAGE) for t in texts)
        if holders != pictures:
            moved = " (one per message that names it, moved to the message's front)" if code == "original" else ""
            counted = "one picture" if pictures == 1 else f"{pictures} pictures"
            raise LlavaError(
                f"it has {counted} and {holders} <image> placeholders in its turns{moved if holders > pictures else ''}"
            )
    elif any(IMAGE in t for t in texts):
        raise LlavaError("it has <image> in its turns but no picture")
    return [(s, t) for (s, _), t in zip(turns, texts)]


def next_place_image(turns: List[str], t: Template) -> List[str]:
    """The LLaVA-NeXT code's preprocess_multimodal: a message holding one <image> not at its
    front has it moved there on a line of its own (<Image>…</Image> for mmtag templates);
    messages with several are left as they are; "QA_GT_caption_based_noisy" is removed."""
    out = []
    for message in turns:
        if message.count(IMAGE) == 1 and not message.startswith(IMAGE):
            message = (IMAGE + "\n" + message.replace(IMAGE, "").strip()).strip()
            if t.mmtag:
                message = message.replace(IMAGE, "<Image>" + IMAGE + "</Image>")
        out.append(message.replace("QA_GT_caption_based_noisy", ""))
    return out


def pictures_of(record: dict, folder: Optional[Path], code: str) -> list:
    """The record's pictures' sources: one, or under the LLaVA-NeXT code's rules a list."""
    if "video" in record:
        raise LlavaError("it is a video record: training on videos is not built here (pictures and text are)")
    if "image" not in record:
        return []
    image = record["image"]
    if isinstance(image, list):
        if code == "original":
            raise LlavaError("its image is a list: the original train.py takes one picture per record")
        if not image:
            raise LlavaError("its image list is empty")
        return [picture_source(i, folder) for i in image]
    return [picture_source(image, folder)]


def prepare(
    path: Path,
    folder: Optional[Path],
    template: Template,
    tokenizer: Tokenizer,
    image_positions: Callable[[Tuple[int, int], bool], int],
    code: str = "original",
    start_end: bool = False,
) -> Tuple[List[Example], int]:
    """Every record checked, tokenized and masked; (examples, records the mismatch rule masked).
    `image_positions(size, several)`: the positions a picture takes (LlavaConfig.image_token_count).
    The first bad record is one LlavaError naming it and the file (and how many more there are)."""
    examples, problems = [], []
    for index, record in enumerate(read_records(path)):
        name = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
        try:
            if not isinstance(record, dict):
                raise LlavaError("it is not an object")
            images = pictures_of(record, folder, code)
            turns = turns_of(record, template, start_end, code, len(images))
            sizes = [check_picture(image) for image in images]
            if template.style == "CHAT":
                ids, labels, mismatch = chat_labels(template, turns, tokenizer)
            else:
                ids, labels, mismatch = labels_of(template, turns, tokenizer, bool(images))
            positions = [image_positions(size, len(images) > 1) for size in sizes]
            if not mismatch and not trainable_within(ids, labels, tokenizer, positions):
                raise LlavaError(
                    f"nothing of its answers lies within model_max_length ({tokenizer.max_length} positions, "
                    f"its pictures' {sum(positions)} included)"
                )
        except LlavaError as e:
            problems.append(f"{path}: record {name!r}: {e}")
            continue
        words = sum(len(v.split()) for _, v in turns)
        examples.append(Example(str(name), images, sizes, ids, labels, mismatch, words if images else -words))
    if problems:
        more = f" ({len(problems) - 1} more records have problems)" if len(problems) > 1 else ""
        raise LlavaError(problems[0] + more)
    return examples, sum(e.mismatch for e in examples)


def trainable_within(ids: List[int], labels: List[int], tokenizer: Tokenizer, image_positions: List[int]) -> bool:
    """Whether any label survives the collator's cut, the pad-token drop and the merged
    sequence's cut (`image_positions`: each picture's, in order)."""
    ids, labels = merged(ids[: tokenizer.max_length], labels[: tokenizer.max_length], tokenizer.pad_id)
    positions, pictures = 0, iter(image_positions)
    for i, label in zip(ids, labels):
        positions += next(pictures) if i == IMAGE_PLACEHOLDER else 1
        if positions > tokenizer.max_length:
            return False
        if label != IGNORE:
            return True
    return False


def merged(ids: List[int], labels: List[int], pad_id: int) -> Tuple[List[int], List[int]]:
    """The collator's attention mask applied as the model applies it: positions whose id is the
    pad id (the unk token, for v1) are dropped from the sequence."""
    kept = [k for k, i in enumerate(ids) if i != pad_id]
    return [ids[k] for k in kept], [labels[k] for k in kept]


def pixels(source, settings: dict, config: LlavaConfig, several: bool) -> np.ndarray:
    """(crops, crop, crop, 3) of one picture, as LazySupervisedDataset makes it: padded to a
    square of the mean colour ('pad', and each of several pictures under the LLaVA-NeXT code's
    rules), or not ('square'), or cut into anyres tiles after its base crop; then the tower's
    preprocessing."""
    aspect = "anyres" if config.uses_anyres else config.image_aspect_ratio
    s = settings
    return preprocess_image(
        load_image(source),
        "pad" if several else aspect,
        config.pinpoints,
        s["size"],
        s["crop"],
        s["mean"],
        s["std"],
        s["squash"],
    )


def order(
    examples: List[Example], epoch: int, seed: int, shuffle: bool, group: bool, batch: int, world: int
) -> List[int]:
    """The records' order for one epoch: as in the file (--shuffle False), a seeded permutation,
    or, with --group_by_modality_length, the original's LengthGroupedSampler order (`batch`
    records per device, `world` = ranks x gradient_accumulation_steps, as LLaVATrainer sets it),
    from numpy's random stream rather than torch's."""
    n = len(examples)
    if not shuffle and not group:
        return list(range(n))
    rng = np.random.default_rng([seed, epoch])
    if not group:
        return rng.permutation(n).tolist()
    return modality_grouped([e.words or 1 for e in examples], batch, world, rng)


def even_chunks(indices: List[int], lengths: List[int], n: int) -> List[List[int]]:
    """split_to_even_chunks: `n` chunks of about the same total length."""
    if len(indices) % n:
        return [indices[i::n] for i in range(n)]
    size, chunks, totals = len(indices) // n, [[] for _ in range(n)], [0.0] * n
    for i in indices:
        k = totals.index(min(totals))
        chunks[k].append(i)
        totals[k] += lengths[i]
        if len(chunks[k]) == size:
            totals[k] = float("inf")
    return chunks


def length_grouped(lengths: List[int], batch: int, world: int, rng) -> List[int]:
    """get_length_grouped_indices: shuffled, cut into megabatches of batch x world, each sorted
    longest first and split into `world` chunks of even length."""
    indices = rng.permutation(len(lengths)).tolist()
    size = batch * world
    megabatches = [
        sorted(indices[i : i + size], key=lambda i: lengths[i], reverse=True) for i in range(0, len(indices), size)
    ]
    return [i for m in megabatches for chunk in even_chunks(m, lengths, world) for i in chunk]


def modality_grouped(lengths: List[int], batch: int, world: int, rng) -> List[int]:
    """get_modality_length_grouped_indices: picture records and text-only ones grouped apart in
    megabatches, the megabatches shuffled, the last two (mixed, sorted) at the end."""
    if all(x > 0 for x in lengths) or all(x < 0 for x in lengths):
        return length_grouped([abs(x) for x in lengths], batch, world, rng)
    pictures = [(i, x) for i, x in enumerate(lengths) if x > 0]
    texts = [(i, -x) for i, x in enumerate(lengths) if x < 0]
    size, groups = batch * world, []
    for members in (pictures, texts):
        ordered = [members[j][0] for j in length_grouped([x for _, x in members], batch, world, rng)]
        groups.append([ordered[i : i + size] for i in range(0, len(ordered), size)])
    last = groups[0][-1] + groups[1][-1]
    megabatches = groups[0][:-1] + groups[1][:-1]
    megabatches = [megabatches[i] for i in rng.permutation(len(megabatches))]
    if last:
        megabatches.append(sorted(last))
    return [i for m in megabatches for i in m]
