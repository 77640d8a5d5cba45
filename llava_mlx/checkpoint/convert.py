"""Conversion: any LLaVA checkpoint → one MLX layout, optionally 4-/8-bit quantized.

    python convert.py --model llava-hf/llava-v1.6-mistral-7b-hf --out llava-v1.6-mistral-4bit -q
    from llava_mlx import convert; convert("llava-hf/llava-v1.6-mistral-7b-hf", "out", quantize=True)

Reading goes through the loader (`load_model`: every layout, names sanitised, shapes
checked), so whatever loads converts; PyTorch `.bin` weights are first re-saved as
safetensors in a scratch directory. The output is one layout: safetensors shards of at
most 5 GB with an index, `config.json` = the normalised `LlavaConfig` (model_type
"llava_mlx", vision tower config included), the tokenizer and chat-template files,
`preprocessor_config.json` with the effective image settings, and a `quantization` block
when quantized. It is written into a temporary directory beside `out` and renamed into
place at the end: an error leaves nothing behind and a previous `out` untouched.
"""

import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import MAX_FILE_SIZE_GB, make_shards

from .. import validate as arguments
from ..errors import LlavaError, LlavaValueError
from ..model import LlavaConfig
from ..signals import signals_held
from . import validate
from .adapters import checkpoint_kind, read_checkpoint, tokenizer_dir
from .files import has_safetensors, read_json, save_shard, write_json
from .hub import HUB_PATTERNS, resolve
from .layouts import MLX_FORMAT, detect_layout, ships_tower, tower_location
from .load import load, load_model
from .preprocessing import image_settings
from .quantize import DEFAULT_GROUP_SIZE, RECIPES, bits_summary, cast, existing_quantization, quantize_model
from .torch_bin import iter_bin

QUANT_BITS = (4, 8)

GROUP_SIZES = (32, 64, 128)

DEFAULT_BITS = 4

DTYPES = ("float16", "bfloat16", "float32")

# Copied as they are when the checkpoint has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "processor_config.json",
    "generation_config.json",
    "video_preprocessor_config.json",
)

TOKENIZER_REQUIRED = ("tokenizer.json", "tokenizer.model", "vocab.json")

PREPROCESSOR = "preprocessor_config.json"

INDEX = "model.safetensors.index.json"


def stage_bin(src: Path, scratch: Path, chunk_bytes: int = 1 << 30) -> Path:
    """A copy of checkpoint `src` whose PyTorch `.bin` weights are re-saved as safetensors
    (the loader reads only those) in files of about `chunk_bytes`; other files are linked.
    The `.bin` files are read without torch and memory-mapped (torch_bin.py), so memory holds
    about one chunk at a time."""
    scratch.mkdir(parents=True)
    for item in src.iterdir():
        if item.suffix != ".bin" and item.name != "pytorch_model.bin.index.json":
            os.symlink(item.resolve(), scratch / item.name)
    for file in sorted(src.glob("*.bin")):
        chunk, size, part = {}, 0, 0
        for key, tensor in iter_bin(file):
            chunk[key] = tensor
            size += tensor.nbytes
            if size >= chunk_bytes:
                save_shard(scratch / f"{file.stem}-{part:04d}.safetensors", chunk)
                chunk, size, part = {}, 0, part + 1
        if chunk:
            save_shard(scratch / f"{file.stem}-{part:04d}.safetensors", chunk)
    return scratch


def local_checkpoint(path_or_repo: str, what: str, scratch: Path) -> Path:
    """A directory with safetensors weights: the checkpoint itself, or its `.bin` re-saved.
    LoRA and projector-only checkpoints are left as they are: adapters.py reads their files."""
    path = resolve(path_or_repo, what)
    if checkpoint_kind(path) != "full":
        return path
    if not has_safetensors(path) and not (path / INDEX).exists():
        if not glob.glob(str(path / "*.bin")) and not Path(path_or_repo).expanduser().is_dir():
            path = resolve(path_or_repo, what, HUB_PATTERNS + ["*.bin"])  # a hub repo with .bin only
        if glob.glob(str(path / "*.bin")):
            return stage_bin(path, scratch)
    return path


def read_source(
    model: str, vision_tower: Optional[str], scratch: Path, model_base: Optional[str] = None, delta: bool = False
):
    """(model, config, tokenizer dir, tower dir) through the loader; LoRA, projector-only and
    delta checkpoints merged with `model_base`."""
    path = local_checkpoint(model, "delta weights" if delta else "model", scratch / "model")
    base = local_checkpoint(model_base, "model base", scratch / "base") if model_base else None
    raw, weights, _ = read_checkpoint(path, base, delta)
    if vision_tower is None and detect_layout(raw) == "original":
        # The original layout names its CLIP tower; stage it too if it ships .bin only and
        # the checkpoint has no tower weights of its own (LLaVA-1.5).
        location = tower_location(raw, None)
        if location and "mm_vision_tower" in raw and not ships_tower(weights):
            vision_tower = str(local_checkpoint(location, "vision tower", scratch / "tower"))
    elif vision_tower is not None:
        vision_tower = str(local_checkpoint(vision_tower, "vision tower", scratch / "tower"))
    loaded, config, tower_dir = load_model(path, vision_tower, lazy=True, model_base=base, delta=delta)
    tokenizer = tokenizer_dir(path, base, delta)
    validate.checkpoint_files(tokenizer)
    return loaded, config, tokenizer, tower_dir


def write_weights(model: nn.Module, directory: Path, progress: bool = True, shard_gb: int = MAX_FILE_SIZE_GB) -> int:
    """Safetensors shards of at most `shard_gb` GB plus the index; returns the bytes written.

    Each tensor is computed (read, cast, quantized) just before its shard is saved, and the
    model's references are dropped first so memory holds one shard at a time.
    """
    from tqdm import tqdm

    weights = dict(tree_flatten(model.parameters()))
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))
    total = sum(v.nbytes for v in weights.values())
    count = len(weights)
    free = shutil.disk_usage(directory).free
    if free < total:
        raise LlavaError(
            f"not enough disk space in {directory.parent}: {total / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free"
        )
    shards = make_shards(weights, shard_gb)
    del weights
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    with tqdm(total=count, unit="tensor", desc="Writing", disable=True if not progress else None) as bar:
        for i, name in enumerate(names):
            shard, shards[i] = shards[i], None
            for value in shard.values():
                mx.eval(value)
                bar.update(1)
            save_shard(directory / name, shard)
            weight_map.update(dict.fromkeys(shard, name))
            del shard
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(directory / INDEX, index)
    return total


def copy_files(path: Path, tower_dir: Optional[Path], config: LlavaConfig, out: Path):
    """Tokenizer and chat-template files, and preprocessor_config.json with the effective
    image settings: the checkpoint's, else the tower's, else CLIP's at the tower's size."""
    if not any((path / name).exists() for name in TOKENIZER_REQUIRED):
        raise LlavaError(f"no tokenizer in {path} (tokenizer.json or tokenizer.model)")
    names = set(TOKENIZER_FILES) | {Path(p).name for p in glob.glob(str(path / "chat_template*"))}
    for name in sorted(names):
        if (path / name).is_file():
            shutil.copyfile(path / name, out / name)
    for directory in (path, tower_dir):
        if directory is not None and (directory / PREPROCESSOR).is_file():
            shutil.copyfile(directory / PREPROCESSOR, out / PREPROCESSOR)
            return
    s = image_settings(path, tower_dir, config)
    write_json(
        out / PREPROCESSOR,
        {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": s["size"]},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": s["crop"], "width": s["crop"]},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(s["mean"]),
            "image_std": list(s["std"]),
            "do_convert_rgb": True,
        },
    )


def replace_dir(new: Path, out: Path):
    """Move the finished `new` to `out`; a previous `out` is removed only once `new` is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(new, out)
    except OSError as e:
        if old is not None:
            os.rename(old / out.name, out)
        raise LlavaError(f"cannot move the converted model to {out}: {e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_out(out: Path, force: bool):
    if out.exists() and not out.is_dir():
        raise LlavaError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LlavaError(f"--out {out} already exists and is not empty; pass --force to replace it")


def check_recipe(recipe: str, q_bits: Optional[int], quantize_vision: bool):
    if recipe not in RECIPES:
        raise LlavaError(f"--quant-predicate {recipe} is not a recipe (choose {', '.join(RECIPES)})")
    if q_bits is not None:
        raise LlavaError(f"--q-bits does not apply with --quant-predicate: {recipe} sets the bits of each layer")
    if quantize_vision:
        raise LlavaError("--quantize-vision does not apply with --quant-predicate: the recipes are for the decoder")


def convert(
    model: str,
    out: str,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    dtype: Optional[str] = None,
    quantize_vision: bool = False,
    vision_tower: Optional[str] = None,
    force: bool = False,
    progress: bool = True,
    shard_gb: int = MAX_FILE_SIZE_GB,
    model_base: Optional[str] = None,
    delta: bool = False,
    quant_predicate: Optional[str] = None,
) -> Path:
    """Convert the LLaVA checkpoint `model` (local directory or Hugging Face repo id) to
    this project's MLX layout in `out`; returns `out`.

    `quantize`: the decoder's linear layers, lm_head and embeddings to `q_bits` (4 or 8,
    default 4) with groups of `q_group_size` (32, 64 or 128, default 64); the vision tower
    and projector too with `quantize_vision`. `quant_predicate` (mixed_2_6, mixed_3_4,
    mixed_3_6, mixed_4_6, mixed_4_8; implies `quantize`): mlx-lm's mixed-precision recipe for
    the decoder, each layer's bits recorded per module in the `quantization` block. `dtype`:
    float16, bfloat16 or float32 for the float parameters (default: as stored).
    `vision_tower`: the CLIP tower of an original LLaVA-1.5 checkpoint. `force`: replace a
    non-empty `out` (only once the new one is complete). `model_base`: the base model of a
    LoRA or projector-only checkpoint (merged into it), or with `delta=True`, the base that
    `model`'s delta weights are added to.
    """
    model = arguments.path_argument(model, "--model")
    vision_tower = None if vision_tower is None else arguments.path_argument(vision_tower, "--vision-tower")
    model_base = None if model_base is None else arguments.path_argument(model_base, "--model-base")
    if shard_gb is not None and not (isinstance(shard_gb, (int, float)) and shard_gb >= 0):
        raise LlavaValueError(f"shard_gb must be a number >= 0, not {shard_gb!r}")
    if quant_predicate is not None:
        check_recipe(quant_predicate, q_bits, quantize_vision)
        quantize = True
    if not quantize and (q_bits is not None or q_group_size is not None or quantize_vision):
        raise LlavaError("--q-bits, --q-group-size and --quantize-vision apply only with -q/--quantize")
    bits = DEFAULT_BITS if q_bits is None else arguments.integer(q_bits, "--q-bits")
    group_size = DEFAULT_GROUP_SIZE if q_group_size is None else arguments.integer(q_group_size, "--q-group-size")
    if bits not in QUANT_BITS:
        raise LlavaError(f"--q-bits {bits} is not supported (choose {' or '.join(map(str, QUANT_BITS))})")
    if group_size not in GROUP_SIZES:
        raise LlavaError(f"--q-group-size {group_size} is not supported (choose {', '.join(map(str, GROUP_SIZES))})")
    if delta and model_base is None:
        raise LlavaError("--delta needs --model-base: the model the delta weights were made from")
    if quant_predicate is not None:
        bits = RECIPES[quant_predicate][0]  # the default; the recipe raises some layers
    if dtype is not None and dtype not in DTYPES:
        raise LlavaError(f"--dtype {dtype} is not supported (choose {', '.join(DTYPES)})")
    local = Path(model).expanduser()
    base = Path(model_base).expanduser() if model_base is not None else None
    out = validate.output_dir(out, [local if local.is_dir() else None, base if base and base.is_dir() else None])
    check_out(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    except OSError as e:
        raise LlavaError(f"cannot create the output directory beside {out}: {e}") from None
    try:
        scratch = tmp / ".scratch"  # .bin weights re-saved as safetensors, removed at the end
        result = tmp / "model"
        result.mkdir()
        loaded, config, path, tower_dir = read_source(model, vision_tower, scratch, model_base, delta)
        validate.output_dir(out, [path, tower_dir])
        if quantize and config.quantization:
            q = config.quantization
            raise LlavaError(
                f"{model} is already quantized ({q['bits']}-bit, group size {q['group_size']}); "
                "convert it without -q, or quantize the float checkpoint"
            )
        if dtype:
            cast(loaded, getattr(mx, dtype))
        if quantize:
            block = quantize_model(loaded, bits, group_size, quantize_vision, quant_predicate)
        elif config.quantization:
            block = existing_quantization(loaded, config)
        else:
            block = None
        copy_files(path, tower_dir, config, result)
        normalised = LlavaConfig.from_dict({**config.to_dict(), "quantization": block})
        write_json(result / "config.json", {"model_type": MLX_FORMAT, **normalised.to_dict()})
        write_weights(loaded, result, progress, shard_gb)
        del loaded
        load(str(result))  # everything a user loads: config, weights and shapes, tokenizer
        with signals_held() as received:  # the move into place is all or nothing
            if received:  # Ctrl-C / SIGTERM before the move: nothing is put in place
                raise KeyboardInterrupt()
            shutil.rmtree(scratch, ignore_errors=True)
            replace_dir(result, out)
    except BaseException:
        with signals_held():  # a second Ctrl-C does not leave half the temporary directory
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def summary(out: Path) -> str:
    params = read_json(out / "config.json")
    index = read_json(out / INDEX)
    shards = len(set(index["weight_map"].values()))
    total = index["metadata"]["total_size"]
    size = f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.2f} MB"
    size += f" in {shards} shard{'s' if shards > 1 else ''}"
    q = params.get("quantization")
    if not q:
        return f"Wrote {out}: {size}"
    return (
        f"Wrote {out}: {size}; {bits_summary(q)}, group size {q['group_size']}: "
        f"{len(q['modules'])} layers quantized, {len(q['skipped'])} left unquantized"
    )
