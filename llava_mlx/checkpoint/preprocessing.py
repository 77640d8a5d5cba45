"""What the processor reads from a checkpoint's directory: its tokenizer (with the original
code's SentencePiece rules where it has tokenizer.model), its image settings
(preprocessor_config.json, the tower's, or the defaults) and its video settings
(video_preprocessor_config.json) → a `Processor`, which itself reads no file."""

import warnings
from pathlib import Path
from typing import Optional

from ..anyres import CLIP_MEAN, CLIP_STD
from ..errors import LlavaError, warn
from ..model import ORIGINAL_TYPES, LlavaConfig
from ..processor import MISTRAL_DECODERS, Processor, byte_level
from ..tokenizer import SentencePieceTokenizer
from .files import read_json
from .validate import image_settings as checked_image_settings


def load_processor(path: Path, config: LlavaConfig, tower_dir: Optional[Path] = None) -> Processor:
    """The processor of the checkpoint at `path` (`tower_dir`: its separately named vision tower)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from transformers import PretrainedConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns about LLaVA's keys
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # A blank config: AutoTokenizer would otherwise build the whole LLaVA
            # config (seconds of imports) just to guess the tokenizer class.
            tokenizer = load_tokenizer(path, tokenizer_config_extra={"config": PretrainedConfig()})
    except (OSError, ValueError, TypeError) as e:
        raise LlavaError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    added = add_builder_tokens(tokenizer, config)
    vocab = tokenizer.get_vocab()
    for stop in ("<|im_end|>",):  # chatml ends a turn with its own token
        if stop in vocab:
            tokenizer.add_eos_token(stop)
    # The original ran Mistral's converted fast tokenizer (legacy rules), others slow.
    legacy = True if config.text_config["model_type"] in MISTRAL_DECODERS else None
    # Checkpoints released through transformers are tokenised its way (the whole prompt).
    if config.conventions == "transformers":
        sentencepiece = None
    else:
        sentencepiece = SentencePieceTokenizer.from_checkpoint(path, tokenizer._tokenizer, legacy)
        if sentencepiece is not None:  # transformers 4.37 counts what add_tokens adds as special among all_special
            sentencepiece.all_special |= set(added)
        if (
            sentencepiece is None
            and config.text_config["model_type"] in ("llama", "mistral")
            and not byte_level(tokenizer)
        ):
            warn(
                f"{path} has no tokenizer.model: tokenising with transformers' rules, which can "
                "differ from the original LLaVA's after special tokens and <image>"
            )
    images = image_settings(path, tower_dir, config)
    if not config.video_pool:
        videos = None
    elif config.llava_type in ORIGINAL_TYPES:  # the LLaVA-NeXT code runs frames through its image processor
        videos = {**images, "square": images["squash"]}
    else:
        videos = video_settings(path, images)
    processor = Processor(tokenizer, config, images, sentencepiece, videos)
    processor.apply_template("hi")  # a broken chat template fails here, not mid-conversation
    return processor


def add_builder_tokens(tokenizer, config: LlavaConfig) -> list:
    """What both codes' builders add to the tokenizer (`config.builder_tokens`: <im_patch>,
    <im_start>, <im_end>), added as they add them: special, each only where it is new. Their ids
    then count in `Processor.vocabulary`, as the builders resize the embeddings to them.
    Returns the tokens that were new."""
    if config.llava_type not in ORIGINAL_TYPES or not config.builder_tokens:
        return []
    hf = tokenizer._tokenizer
    new = [token for token in config.builder_tokens if token not in hf.get_vocab()]
    if new:
        hf.add_tokens(new, special_tokens=True)
        # mlx-lm's streaming detokenizer maps ids to pieces once, when it is made: make it again
        detokenizer = tokenizer._detokenizer
        options = {"trim_space": detokenizer.trim_space} if hasattr(detokenizer, "trim_space") else {}
        tokenizer._detokenizer = type(detokenizer)(hf, **options)
    return new


SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def image_settings(path: Path, tower_dir: Optional[Path], config: LlavaConfig) -> dict:
    """Resize / crop / normalisation settings: the checkpoint's preprocessor_config.json,
    else the vision tower's (original layout), else CLIP's defaults at the tower's size."""

    if config.image_processor == "siglip":  # the LLaVA-NeXT code's SigLIP processor reads no file
        side = config.vision.image_size
        return {"size": side, "crop": side, "mean": SIGLIP_MEAN, "std": SIGLIP_STD, "squash": True}
    raw, where = {}, "CLIP's defaults"
    for directory in (path, tower_dir):
        if directory is not None and (directory / "preprocessor_config.json").exists():
            where = str(directory / "preprocessor_config.json")
            raw = read_json(directory / "preprocessor_config.json")
            break
    side = config.vision.image_size

    def edge(value, key):
        if isinstance(value, dict):
            return int(value.get(key) or value.get("height") or side)
        return int(value) if value else side

    size = raw.get("size")
    if config.vision_model_type == "clip_s2":  # CLIPVisionTowerS2 sets both to its largest scale
        raw = {**raw, "size": config.vision.input_size, "crop_size": config.vision.input_size}
        size = raw["size"]
    try:
        settings = {
            "size": edge(size, "shortest_edge"),
            "crop": edge(raw.get("crop_size"), "height"),
            "mean": tuple(raw.get("image_mean", CLIP_MEAN)),
            "std": tuple(raw.get("image_std", CLIP_STD)),
            # {"height", "width"} and no centre crop: the image is resized to that square (SigLIP's)
            "squash": isinstance(size, dict) and "height" in size and not raw.get("do_center_crop", False),
        }
    except (TypeError, ValueError) as e:
        raise LlavaError(f"{where}: unreadable image sizes ({e})") from None
    return checked_image_settings(settings, where)


def video_settings(path: Path, image_settings: dict) -> dict:
    """Resize / crop / normalisation of video frames from `video_preprocessor_config.json`;
    from `preprocessor_config.json` (said in a warning) when the checkpoint has none (hub
    repos from before transformers' video processors), else the image settings."""
    file = path / "video_preprocessor_config.json"
    if not file.exists():
        file = path / "preprocessor_config.json"
        warn(f"{path} has no video_preprocessor_config.json: video frames are preprocessed like images")
    if not file.exists():
        return {**image_settings, "square": False}
    raw = read_json(file)
    size = raw.get("size") or {}
    if not isinstance(size, dict):
        size = {"shortest_edge": size}
    square = "height" in size and "shortest_edge" not in size
    side = int(size.get("shortest_edge") or size.get("height") or image_settings["size"])
    crop = raw.get("crop_size") if raw.get("do_center_crop") else None
    return {
        "size": side,
        "crop": int(crop.get("height") if isinstance(crop, dict) else crop) if crop else side,
        "square": square,
        "mean": tuple(raw.get("image_mean") or image_settings["mean"]),
        "std": tuple(raw.get("image_std") or image_settings["std"]),
    }
