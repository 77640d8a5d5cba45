"""Prompt and image preparation: images → crops, prompt → token ids, chat templates.

The prompt is tokenised the original way (`tokenizer_image_token`): split at each
`<image>`, tokenise every chunk with its BOS, keep only the first chunk's BOS, and put an
IMAGE_PLACEHOLDER between chunks. transformers tokenises the whole prompt instead, and the
text right after `<image>` can come out differently.
"""

import io
import re
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image, UnidentifiedImageError

from . import validate
from .anyres import preprocess_image
from .errors import LlavaError
from .fetch import fetch
from .model import IMAGE_PLACEHOLDER, ORIGINAL_TYPES, VIDEO_PLACEHOLDER, LlavaConfig
from .tokenizer import chunked_ids
from .video import VIDEO_TOKEN, as_video_list, load_video, preprocess_frames

IMAGE_TOKEN = "<image>"
# mm_use_im_start_end checkpoints (LLaVA v0, Lightning, Med v0) see every image between these.
WRAPPED_IMAGE = f"<im_start>{IMAGE_TOKEN}<im_end>"
UNWRAPPED_IMAGE = re.compile(r"(?<!<im_start>)<image>(?!<im_end>)")
# Larger images are refused before decoding them (a decompression bomb guard).
MAX_PIXELS = 50_000_000
# An image URL is read within this many seconds in total, and at most this many bytes.
URL_TIMEOUT = 60
URL_MAX_BYTES = 100 * 2**20

# The original conversation templates (llava/conversation.py) by family.
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "Answer the questions."
QWEN_SYSTEM = "You are a helpful assistant."  # conversation.py's qwen_1_5 (the LLaVA-NeXT code)
LLAMA_3_SYSTEM = (  # the LLaVA-NeXT code's llava_llama_3
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
# Decoders prompted and tokenised as Mistral's releases: [INST] turns, its fast tokenizer's rules.
MISTRAL_DECODERS = ("mistral", "mixtral")


def family_prompt(family: str, turns: Sequence, system: Optional[str] = None) -> str:
    """A conversation in the original template of `family`, ready for the next answer.

    `turns` is [(question, answer), ..., (question, None)], as conversation.py renders them.
    """
    if family == "mistral_instruct":
        head = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        parts = [
            f"[INST] {head if i == 0 else ''}{q} [/INST]" + (f" {a} </s>" if a is not None else "")
            for i, (q, a) in enumerate(turns)
        ]
        return "".join(parts)
    if family == "qwen_1_5":  # the LLaVA-NeXT code's CHATML style: newlines after each part
        system = QWEN_SYSTEM if system is None else system
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        for q, a in turns:
            text += f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
            text += f"{a}<|im_end|>\n" if a is not None else ""
        return text
    if family == "llava_llama_3":  # Meta-Llama-3-Instruct's chat template, as conversation.py renders it
        system = LLAMA_3_SYSTEM if system is None else system
        text = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system.strip()}<|eot_id|>"
        for q, a in turns:
            for role, message in (("user", q), ("assistant", a)):
                if message:
                    text += f"<|start_header_id|>{role}<|end_header_id|>\n\n{message.strip()}<|eot_id|>"
        return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if family == "chatml_direct":
        system = CHATML_SYSTEM if system is None else system
        text = f"<|im_start|>system\n{system}<|im_end|>"
        for q, a in turns:
            text += f"<|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n"
            text += f"{a}<|im_end|>" if a is not None else ""
        return text
    if family == "llava_v0":  # SeparatorStyle.SINGLE: "###" after the system prompt and every message
        text = (LLAVA_V1_SYSTEM if system is None else system) + "###"
        for q, a in turns:
            text += f"Human: {q}###Assistant:" + (f" {a}###" if a is not None else "")
        return text
    system = LLAVA_V1_SYSTEM if system is None else system
    text = f"{system} "
    for q, a in turns:
        text += f"USER: {q} ASSISTANT:" + (f" {a}</s>" if a is not None else "")
    return text


def placed(text: str, token: str, count: int, what: str) -> int:
    """How many of a turn's `count` images (or videos) the template puts before its text: all
    of them when `text` holds no `token`, none when it holds one per item (they stay where the
    user put them); any other number of placeholders is an error."""
    typed = text.count(token)
    if typed == 0:
        return count
    if typed != count:
        raise LlavaError(
            f"the question holds {typed} {token} placeholder(s) but {count} {what}(s) were given with it: "
            f"type one {token} per {what} where it goes, or none to put them first"
        )
    return 0


def byte_level(tokenizer) -> bool:
    """Whether the tokenizer is a byte-level BPE (Llama-3's, Qwen's): it never had a
    tokenizer.model, so there is no SentencePiece rule to follow and nothing to warn about."""
    backend = getattr(tokenizer._tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def template_family(config: LlavaConfig, tokenizer) -> str:
    if config.conversation:
        return config.conversation
    if config.llava_type == "llava_qwen":
        return "qwen_1_5"  # the LLaVA-NeXT code's demos, for its Qwen2 checkpoints
    if config.llava_type in ORIGINAL_TYPES and "<|start_header_id|>" in tokenizer.get_vocab():
        return "llava_llama_3"  # its demos, for its Llama-3 checkpoints (lmms-lab/llama3-llava-next-8b)
    if config.text_config["model_type"] in MISTRAL_DECODERS:
        return "mistral_instruct"
    if "<|im_start|>" in tokenizer.get_vocab():
        return "chatml_direct"  # LLaVA-1.6-34B (Nous-Hermes-2-Yi)
    return "llava_v1"


def load_image(source) -> Image.Image:
    """An RGB PIL image from a path, an http(s) URL, a PIL image, a NumPy array of uint8
    pixels or an image file's bytes; one clear error otherwise."""
    if isinstance(source, np.ndarray):
        source = validate.image_array(source)
    if isinstance(source, Image.Image):
        image = source
        name = "image"
    else:
        name, data = image_file(source)
        try:
            with warnings.catch_warnings():  # we apply our own pixel limit below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(data)
        except Image.DecompressionBombError:
            raise LlavaError(f"image {name} has more than {MAX_PIXELS:,} pixels") from None
        except (UnidentifiedImageError, OSError) as e:
            raise LlavaError(f"cannot read image {name}: not an image or corrupt ({type(e).__name__})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise LlavaError(f"image {name} is {width}x{height}: more than {MAX_PIXELS:,} pixels")
    if width < 1 or height < 1:
        raise LlavaError(f"image {name} is empty ({width}x{height})")
    try:
        image.load()
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as e:
        raise LlavaError(f"cannot read image {name}: truncated or corrupt ({e})") from None


def image_file(source):
    """(name, what Image.open reads) for an image given by path, URL or encoded bytes."""
    if isinstance(source, (bytes, bytearray)):
        return "(bytes)", io.BytesIO(source)
    validate.image_list([source])  # anything else: a TypeError saying what is accepted
    name = validate.text(str(source), "the image name")
    if not name.strip():
        raise LlavaError("an image name is empty")
    if name.startswith(("http://", "https://")):
        return name, io.BytesIO(fetch(name, "image", URL_TIMEOUT, URL_MAX_BYTES))
    if not validate.usable_path(name, "image").is_file():
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", name):
            raise LlavaError(f"cannot read image {name}: only http(s) URLs are downloaded")
        raise LlavaError(f"image not found: {name}" + (" (a directory)" if Path(name).is_dir() else ""))
    return name, name


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode. 16-bit and float images are scaled to 8 bits rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        if image.mode == "F" and pixels.max() <= 1.0:
            top = 1.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


class Processor:
    """Callable as `processor(prompt, images)` → dict of input_ids, pixel_values, image_sizes."""

    def __init__(self, tokenizer, config: LlavaConfig, image_config: dict, sentencepiece=None, video_config=None):
        self.tokenizer = tokenizer  # mlx-lm TokenizerWrapper (streaming detokenizer, EOS ids)
        self.sentencepiece = sentencepiece  # the original's tokenisation, when tokenizer.model exists
        self.config = config
        self.image_config = image_config
        self.video_config = video_config  # None: the checkpoint takes no video
        self.family = template_family(config, tokenizer)

    @property
    def vocabulary(self) -> int:
        """The ids the model may produce: every id of the tokenizer for the checkpoints of the
        original and LLaVA-NeXT code, whose loaders cut the embeddings to `len(tokenizer)`; the
        tokenizer's base vocabulary for the others (llava-hf's padding and added `<image>` come
        after it)."""
        if self.config.llava_type in ORIGINAL_TYPES:
            return len(self.tokenizer._tokenizer)
        return self.tokenizer.vocab_size

    # -- prompts ----------------------------------------------------------------------
    def apply_template(
        self,
        question: str,
        num_images: int = 1,
        system: Optional[str] = None,
        history: Sequence = (),
        num_videos: int = 0,
    ) -> str:
        """The conversation so far plus `question`, images (then videos) in the first user
        turn: in the checkpoint's own chat template when it has one, else the family's
        template from the original code. `history` holds earlier (question, answer) turns.
        `num_images` and `num_videos` may also be lists: the images (videos) of each turn (the
        server's messages).

        Placement: the images of a turn go before its text, unless the text holds `<image>`
        placeholders, one per image of that turn: then each image goes where its placeholder
        is (as transformers' processors and the original CLI do); likewise `<video>`."""
        turns = [tuple(t) for t in history] + [(question, None)]
        counts = list(num_images) if isinstance(num_images, (list, tuple)) else [num_images] + [0] * len(history)
        if len(counts) != len(turns):
            raise ValueError(f"{len(counts)} image counts for {len(turns)} turns")
        videos = list(num_videos) if isinstance(num_videos, (list, tuple)) else [num_videos] + [0] * len(history)
        if len(videos) != len(turns):
            raise ValueError(f"{len(videos)} video counts for {len(turns)} turns")
        # (images, videos) the template places before each turn's text; the others are in the text
        before = [
            (placed(q, IMAGE_TOKEN, n, "image"), placed(q, VIDEO_TOKEN, v, "video"))
            for (q, _), n, v in zip(turns, counts, videos)
        ]
        hf = self.tokenizer._tokenizer
        # The original and LLaVA-NeXT code's demos use their conversation.py templates, whatever
        # chat template the (text-only) Qwen or Llama-3 tokenizer carries.
        if not hf.chat_template or self.config.llava_type in ORIGINAL_TYPES:
            turns = [(f"{IMAGE_TOKEN}\n" * n + f"{VIDEO_TOKEN}\n" * v + q, a) for (n, v), (q, a) in zip(before, turns)]
            if self.config.image_start_end:  # as run_llava.py, cli.py and training's preprocess_multimodal
                turns = [(UNWRAPPED_IMAGE.sub(WRAPPED_IMAGE, q), a) for q, a in turns]
            return family_prompt(self.family, turns, system)
        messages = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
        for (q, a), (n, v) in zip(turns, before):
            images = [{"type": "image"}] * n + [{"type": "video"}] * v
            messages.append({"role": "user", "content": images + [{"type": "text", "text": q}]})
            if a is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
        try:
            prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template is the checkpoint's own Jinja code: any error is its
            raise LlavaError(f"the checkpoint's chat template fails: {type(e).__name__}: {str(e)[:200]}") from None
        bos = hf.bos_token
        return prompt[len(bos) :] if bos and prompt.startswith(bos) else prompt

    def tokenize(self, prompt: str) -> List[int]:
        """Token ids with IMAGE_PLACEHOLDER for each `<image>` (original chunked tokenisation;
        transformers' whole-prompt one for the checkpoints released through it, with
        VIDEO_PLACEHOLDER for each `<video>`)."""
        hf = self.tokenizer._tokenizer
        if self.config.conventions == "transformers":
            vocab = hf.get_vocab()
            marks = {vocab.get(IMAGE_TOKEN): IMAGE_PLACEHOLDER, vocab.get(VIDEO_TOKEN): VIDEO_PLACEHOLDER}
            marks.pop(None, None)
            return [marks.get(t, t) for t in hf(prompt).input_ids]
        encode = self.sentencepiece.encode if self.sentencepiece else (lambda text: hf(text).input_ids)
        marks = {IMAGE_TOKEN: IMAGE_PLACEHOLDER, VIDEO_TOKEN: VIDEO_PLACEHOLDER}
        return chunked_ids(prompt, encode, hf.bos_token_id, marks)

    # -- images -----------------------------------------------------------------------
    def preprocess(self, images: Sequence, several: bool = False) -> tuple:
        """(pixel_values (n_crops, H, W, 3) float32, image_sizes (n, 2) as (width, height)).

        `several`: the prompt holds several images (OneVision then pads each to a square).
        """
        images = [load_image(im) for im in images]
        c = self.image_config
        config = self.config
        aspect = "anyres" if config.uses_anyres else config.image_aspect_ratio
        if several and config.several_images_flat:
            aspect = "pad"
        crops = [
            preprocess_image(
                im,
                aspect,
                config.pinpoints,
                c["size"],
                c["crop"],
                c["mean"],
                c["std"],
                c["squash"],
            )
            for im in images
        ]
        return np.concatenate(crops), np.array([im.size for im in images], dtype=np.int32)

    def encode_prompt(self, prompt: str, num_images: int, num_videos: int = 0) -> List[int]:
        """`tokenize`, after checking there is one `<image>` per image and one `<video>` per video."""
        count = prompt.count(IMAGE_TOKEN)
        if count != num_images:
            raise LlavaError(
                f"the prompt has {count} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s) were given"
            )
        videos = prompt.count(VIDEO_TOKEN)
        if (videos or num_videos) and self.video_config is None:
            raise LlavaError(
                f"this checkpoint ({self.config.llava_type}) takes no video; "
                "use a LLaVA-OneVision or LLaVA-NeXT-Video model"
            )
        if videos != num_videos:
            raise LlavaError(
                f"the prompt has {videos} {VIDEO_TOKEN} placeholder(s) but {num_videos} video(s) were given"
            )
        return self.tokenize(prompt)

    def preprocess_video(self, frames) -> np.ndarray:
        """float32 (T, H, W, 3) of one video's uint8 frames (T, H, W, 3)."""
        return preprocess_frames(frames, self.video_config)

    def __call__(
        self, prompt: str, images: Sequence = (), videos: Sequence = (), num_frames: Optional[int] = None
    ) -> dict:
        """Inputs for `model(**inputs)`: the raw prompt, one `<image>` per image and one
        `<video>` per video, no template. A video is a file path, a uint8 array (T, H, W, 3)
        or a list of PIL images: a file gives `num_frames` frames sampled uniformly, frames
        given are used as given unless `num_frames` is passed (video.load_video)."""
        prompt, images = validate.prompt(prompt), validate.image_list(images)
        videos = as_video_list(videos)
        ids = self.encode_prompt(prompt, len(images), len(videos))
        inputs = {"input_ids": mx.array([ids], dtype=mx.int32), "pixel_values": None, "image_sizes": None}
        if images:
            pixels, sizes = self.preprocess(images, several=len(images) > 1)
            inputs["pixel_values"] = mx.array(pixels)
            inputs["image_sizes"] = mx.array(sizes)
        if videos:
            inputs["pixel_values_videos"] = [mx.array(self.preprocess_video(load_video(v, num_frames))) for v in videos]
        return inputs
