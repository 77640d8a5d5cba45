"""The decoder sharded over the ranks: tensor parallel (mlx-lm's `Model.shard`) or pipeline
parallel (mlx-lm's `PipelineMixin`), a table entry per decoder that can shard; each rank reads
only its slices of the stored weights. The vision tower and projector stay on rank 0."""

from dataclasses import dataclass
from typing import Callable, Dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.pipeline import PipelineMixin

from ..errors import LlavaError
from .share import shared_features

VISION_PARTS = ("vision_tower", "multi_modal_projector", "image_newline")


class PipelinedLlamaModel(PipelineMixin, llama.LlamaModel):
    """mlx-lm's llama decoder as one pipeline stage.

    mlx-lm 0.32's llama has no `pipeline`; this is its qwen2 stage loop on llama's
    layers: receive from the next rank (which runs the earlier layers), run ours, send to
    the previous one, then all ranks take rank 0's output (the last layers') so every
    rank computes the same logits. LLaVA decoders have no sliding-window layers.
    """

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        layers, rank, size = self.pipeline_layers, self.pipeline_rank, self.pipeline_size
        cache = cache if cache is not None else [None] * len(layers)
        mask = create_attention_mask(h, cache[0])
        if rank < size - 1:
            h = mx.distributed.recv_like(h, rank + 1)
        for layer, c in zip(layers, cache):
            h = layer(h, mask, cache=c)
        if rank != 0:
            h = mx.distributed.send(h, rank - 1)
            if cache[-1] is not None:  # keep the send in the graph of the next step
                cache[-1].keys = mx.depends(cache[-1].keys, h)
        h = mx.distributed.all_gather(h)[: h.shape[0]]
        return self.norm(h)


class PipelinedLlama(llama.Model):
    @property
    def layers(self):
        return self.model.pipeline_layers


def pipeline_llama(lm: nn.Module, group):
    # The same modules and weights, run as a stage (no copy, no new parameters).
    lm.__class__, lm.model.__class__ = PipelinedLlama, PipelinedLlamaModel
    lm.model.pipeline(group)


@dataclass(frozen=True)
class Sharding:
    group: mx.distributed.Group
    mode: str  # 'tensor' or 'pipeline'


@dataclass(frozen=True)
class Decoder:
    tensor: Callable  # (language_model, group): split heads and MLP in place
    pipeline: Callable  # (language_model, group): keep this rank's layers


# Text model type (as `language.normalize_text_config` names it) → mlx-lm's sharding.
LLAMA = Decoder(tensor=lambda lm, g: lm.shard(g), pipeline=pipeline_llama)  # Vicuna, Mistral, Yi

DECODERS: Dict[str, Decoder] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": Decoder(tensor=lambda lm, g: lm.shard(g), pipeline=lambda lm, g: lm.model.pipeline(g)),
}


def check_shardable(text: dict, size: int, pipeline: bool):
    """One clear line for what cannot be split over `size` ranks."""
    kind = text.get("model_type")
    if kind not in DECODERS:
        raise LlavaError(f"a '{kind}' decoder cannot be sharded (sharding supports: {', '.join(DECODERS)})")
    if pipeline:
        if text["num_hidden_layers"] < size:
            raise LlavaError(f"cannot pipeline {text['num_hidden_layers']} decoder layers over {size} ranks")
        return
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    if heads % size or kv % size:
        raise LlavaError(
            f"cannot split {heads} attention heads ({kv} KV heads) over {size} ranks: "
            f"use a world size that divides both, or --pipeline"
        )
    if text["intermediate_size"] % size:
        raise LlavaError(f"cannot split the MLP width {text['intermediate_size']} over {size} ranks")


def share_media(model: nn.Module):
    """`model(**inputs)` with pixel values works on every rank: rank 0 (the only one with the
    tower) encodes the images and videos, and every rank gets the features (share.py)."""
    encode = model.media_features

    def media_features(*args):
        return shared_features(model, lambda: ([], encode(*args)))[1]

    model.media_features = media_features


def shard(model: nn.Module, weights: dict, group, pipeline: bool, read_part: Callable) -> dict:
    """Shard `model` (built, not yet loaded) for this rank and return the weights it keeps.

    `weights` are the model's (lazy) weights by parameter name; `read_part(value, axis, rank,
    parts)` reads a split weight's slice from its file (checkpoint.files.file_slices), or gives
    None for a weight computed at load, which is split in memory.
    """
    check_shardable(model.config.text_config, group.size(), pipeline)
    mode = "pipeline" if pipeline else "tensor"
    try:
        getattr(DECODERS[model.config.text_config["model_type"]], mode)(model.language_model, group)
    except ValueError as e:  # e.g. a quantization group a split would cut
        raise LlavaError(f"cannot shard this checkpoint over {group.size()} ranks: {e}") from None
    if group.rank() != 0:
        for name in VISION_PARTS:
            model.pop(name, None)
    model.sharding = Sharding(group, mode)
    share_media(model)
    kept = {}
    for key, param in tree_flatten(model.parameters()):
        value = weights[key]
        if value.shape == param.shape:
            kept[key] = value  # whole: stays lazy, read when evaluated
            continue
        axis = next(a for a, (n, p) in enumerate(zip(value.shape, param.shape)) if n != p)
        parts, rank = value.shape[axis] // param.shape[axis], group.rank()
        part = read_part(value, axis, rank, parts)
        if part is None:  # computed at load time (not a file tensor as stored): split in memory
            part = mx.contiguous(mx.split(value, parts, axis=axis)[rank])
        kept[key] = part
    return kept
