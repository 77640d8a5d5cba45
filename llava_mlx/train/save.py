"""What training leaves, written as the original's savers write it, so that its builder
(llava/model/builder.py) loads it unchanged, and so does `load(..., model_base=)`:

- LoRA: adapter_config.json and adapter_model.safetensors as peft writes them (names
  `base_model.model.model.layers.N...lora_A.weight`, A as (r, in), B as (out, r)),
  non_lora_trainables.bin (the projector and whatever else trained in full), config.json;
- projector only (--tune_mm_mlp_adapter): mm_projector.bin and config.json;
- full: the language model and the projector under the original layout's names (safetensors,
  5 GB shards), the tower too where the checkpoint trained from had it inside (the LLaVA-NeXT
  code's: its tensors as they were, the trained ones replaced), config.json
  (LlavaLlamaForCausalLM under the original's rules) and the tokenizer's files.

Every file is written beside its final name first and moved into place once whole; a
checkpoint directory is written whole under another name and then renamed.
"""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Dict

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from ..checkpoint.files import load_weights
from ..checkpoint.layouts import rename
from ..checkpoint.torch_bin import write_bin
from ..errors import LlavaError
from ..signals import signals_held

SHARD_BYTES = 5 << 30  # transformers' save_pretrained default
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
OUTPUT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "non_lora_trainables.bin",
    "mm_projector.bin",
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
)


def original_name(name: str) -> str:
    """Our parameter name → the original layout's (LlavaLlamaForCausalLM)."""
    if name.startswith("language_model.model."):
        return "model." + name[len("language_model.model.") :]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model.") :]
    if name.startswith("multi_modal_projector.linear_"):
        index, rest = name[len("multi_modal_projector.linear_") :].split(".", 1)
        return f"model.mm_projector.{2 * (int(index) - 1)}.{rest}"
    if name == "image_newline":
        return "model.image_newline"
    if name.startswith("vision_tower."):  # inside the checkpoint, as the LLaVA-NeXT code saves it
        return "model.vision_tower.vision_tower.vision_model." + name[len("vision_tower.") :]
    raise LlavaError(f"no original name for {name}")


def torch_layout(name: str, value: mx.array) -> mx.array:
    """The tower's patch embedding back to torch's (out, in, kh, kw)."""
    return value.transpose(0, 3, 1, 2) if name.endswith("embeddings.patch_embedding.weight") else value


def lora_layers(model) -> Dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_tensors(model) -> Dict[str, mx.array]:
    out = {}
    for name, layer in lora_layers(model).items():
        base = "base_model.model." + original_name(f"{name}.weight")[: -len(".weight")]
        out[f"{base}.lora_A.weight"] = layer.lora_a.T
        out[f"{base}.lora_B.weight"] = layer.lora_b.T
    return out


def adapter_config(lora: dict, base: str) -> dict:
    """adapter_config.json as peft 0.11 writes it."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": lora["r"],
        "rank_pattern": {},
        "revision": None,
        "target_modules": lora["targets"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def trained_tensors(model, lora: bool) -> Dict[str, mx.array]:
    """What trained in full (not LoRA's pairs), under the original names."""
    out = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        if lora and name.endswith((".lora_a", ".lora_b")):
            continue
        out[original_name(name)] = torch_layout(name, value)
    return out


def full_tensors(trainable) -> Dict[str, mx.array]:
    """The language model and the projector under the original names; the tower's tensors where
    the checkpoint trained from has it inside (else it is the named one), trained ones replaced."""
    params = dict(tree_flatten(trainable.model.parameters()))
    out = {original_name(n): v for n, v in params.items() if not n.startswith("vision_tower.")}
    source = load_weights(trainable.source)
    for name, value in source.items():
        if "vision_tower." in name:
            ours = rename(name)
            trained = "tower" in trainable.parts and ours in params
            out[name] = torch_layout(ours, params[ours]) if trained else value
    return out


def write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_safetensors(directory: Path, tensors: Dict[str, mx.array]):
    """model.safetensors, or shards of SHARD_BYTES and their index, as save_pretrained names them."""
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        if current and size + value.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += value.nbytes
    shards.append(current)
    if len(shards) == 1:
        mx.save_safetensors(str(directory / "model.safetensors"), shards[0], metadata={"format": "pt"})
        return
    index = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "pt"})
        index.update({k: name for k in shard})
    total = sum(v.nbytes for v in tensors.values())
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": index})


def write_result(directory: Path, trainable, kind: str, base: str):
    """The files of `kind` (lora, projector, full) into `directory`, which must be empty."""
    model, raw = trainable.model, dict(trainable.raw)
    mx.eval(model.parameters())
    if kind == "lora":
        write_json(directory / "adapter_config.json", adapter_config(trainable.lora, base))
        mx.save_safetensors(
            str(directory / "adapter_model.safetensors"), adapter_tensors(model), metadata={"format": "pt"}
        )
        write_bin(
            directory / "non_lora_trainables.bin",
            {"base_model.model." + k: v for k, v in trained_tensors(model, True).items()},
        )
    elif kind == "projector":
        write_bin(directory / "mm_projector.bin", trained_tensors(model, False))
    else:
        if trainable.code == "original":
            raw["architectures"] = ["LlavaLlamaForCausalLM"]
        write_safetensors(directory, full_tensors(trainable))
        for name in TOKENIZER_FILES:
            if (trainable.source / name).exists():
                shutil.copyfile(trainable.source / name, directory / name)
    write_json(directory / "config.json", raw)


@contextmanager
def scratch(parent: Path, name: str):
    """A directory `parent/.name.partial-PID` to write into, removed at the end whatever happens."""
    partial = parent / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    finally:
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def whole_directory(final: Path):
    """Yield a directory to write into; it becomes `final` only once the block ends without error."""
    with scratch(final.parent, final.name) as partial:
        yield partial
        with signals_held():
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)


def move_into(source: Path, directory: Path):
    """The finished result's files into the output directory, each moved whole."""
    with signals_held():
        for file in sorted(source.iterdir()):
            os.replace(file, directory / file.name)


def result_kind(parts: set) -> str:
    """lora, projector (--tune_mm_mlp_adapter: the projector alone) or full."""
    if "lora" in parts:
        return "lora"
    return "projector" if parts == {"projector"} else "full"


def trained_weights_of(trainable, directory: Path) -> Dict[str, mx.array]:
    """The trained weights a result or checkpoint directory holds, under our names."""
    from ..checkpoint.files import read_tensors
    from ..checkpoint.layouts import sanitize

    kind = result_kind(trainable.parts)
    if kind == "full":
        return sanitize(load_weights(directory), trainable.model.config)
    if kind == "projector":
        return {rename(k): v for k, v in read_tensors(directory, "mm_projector").items()}
    adapter = mx.load(str(directory / "adapter_model.safetensors"))
    weights = {}
    for name in lora_layers(trainable.model):
        base = "base_model.model." + original_name(f"{name}.weight")[: -len(".weight")]
        weights[f"{name}.lora_a"] = adapter[f"{base}.lora_A.weight"].T
        weights[f"{name}.lora_b"] = adapter[f"{base}.lora_B.weight"].T
    trained = {k[len("base_model.model.") :]: v for k, v in read_tensors(directory, "non_lora_trainables").items()}
    return {**weights, **sanitize(trained, trainable.model.config)}
