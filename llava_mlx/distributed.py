"""One LLaVA over several Macs: the decoder sharded across the ranks of `mlx.launch`.

    mlx.launch --hostfile hosts.json --backend ring -- python generate.py --model M --image a.jpg

`load()` calls `world()`; with more than one rank it shards the decoder with mlx-lm's own
sharding: tensor parallel (`Model.shard`: attention heads and MLP columns split, one
all-reduce after each block half) or, with `pipeline=True`, pipeline parallel (mlx-lm's
`PipelineMixin` split: each rank runs a run of consecutive layers, the last rank the first
layers). The decoders that can shard are the entries of `DECODERS`.

Rank 0 alone holds the vision tower and projector: it loads and encodes the images and
shares the merged image features (`shared_features`), so the images need only be on the
machine the command is typed on, and the other ranks spend no memory on the tower.

Each rank reads only what it keeps: a pipeline stage never touches the other stages'
tensors (they stay lazy), and a tensor-parallel rank reads its slice of each split weight
straight from the safetensors file (`read_slice`), not the whole tensor.
"""

import os
import pickle
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.pipeline import PipelineMixin

from .checkpoint.files import read_slice, tensor_index
from .errors import LlavaError

# Seconds a rank waits for the others to join before giving up (one line, exit non-zero).
JOIN_TIMEOUT = float(os.environ.get("LLAVA_MLX_JOIN_TIMEOUT", "60"))
VISION_PARTS = ("vision_tower", "multi_modal_projector", "image_newline")


# -- joining ------------------------------------------------------------------------------
def launched() -> bool:
    """Whether this process was started by mlx.launch (or mpirun) as one of several ranks."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile):  # `mlx.launch -n 1` writes an empty one
        with open(hostfile) as f:
            return f.read().strip() != ""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))


def world(timeout: float = JOIN_TIMEOUT) -> Optional[mx.distributed.Group]:
    """The group of all ranks when launched with more than one, else None.

    The ring backend's listening side waits for its peers forever, holding the interpreter,
    so a watchdog process ends this one with a one-line error after `timeout` seconds.
    """
    if not launched():
        return None
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (
        f"error: rank {rank}: the other ranks did not join within {timeout:g} s "
        "(check the hostfile's addresses and ports, that every host runs the command, and the firewall)"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(timeout), message], stdin=subprocess.DEVNULL
    )
    try:
        group = mx.distributed.init()
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))  # everyone is here
    except RuntimeError as e:
        raise LlavaError(f"rank {rank} could not join the other ranks: {str(e).splitlines()[0]}") from None
    finally:
        watchdog.kill()
        watchdog.wait()
    return group if group.size() > 1 else None


WATCHDOG = """
import os, signal, sys, time
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(timeout)
print(message, file=sys.stderr, flush=True)
os.kill(pid, signal.SIGKILL)  # the stuck call holds the interpreter: no handler could run
"""


# -- what can shard, and how --------------------------------------------------------------
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


# -- sharding the loaded model ------------------------------------------------------------
def shard(model: nn.Module, weights: dict, group, pipeline: bool, stored: dict, files: List) -> dict:
    """Shard `model` (built, not yet loaded) for this rank and return the weights it keeps.

    `weights` are the model's (lazy) weights by parameter name, `stored` the checkpoint's
    tensors as read (lazy) and `files` its safetensors files, to read split weights' slices.
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
    index, names = tensor_index(files), {id(v): k for k, v in stored.items()}
    kept = {}
    for key, param in tree_flatten(model.parameters()):
        value = weights[key]
        if value.shape == param.shape:
            kept[key] = value  # whole: stays lazy, read when evaluated
            continue
        axis = next(a for a, (n, p) in enumerate(zip(value.shape, param.shape)) if n != p)
        parts, rank = value.shape[axis] // param.shape[axis], group.rank()
        entry = index.get(names.get(id(value)))
        if entry is not None and entry.matches(value):
            kept[key] = read_slice(entry, axis, rank, parts)
        else:  # computed at load time (not a file tensor as stored): split in memory
            kept[key] = mx.contiguous(mx.split(value, parts, axis=axis)[rank])
    return kept


def group_of(model) -> Optional[mx.distributed.Group]:
    sharding = getattr(model, "sharding", None)
    return sharding.group if sharding else None


def label(model) -> str:
    """'rank r/n ' for a sharded model's messages, '' in a single process."""
    group = group_of(model)
    return f"[rank {group.rank()}/{group.size()}] " if group else ""


def is_main(model) -> bool:
    """Whether this process prints the answer (rank 0, or the only process)."""
    group = group_of(model)
    return group is None or group.rank() == 0


# -- reading only a slice of a safetensors tensor -----------------------------------------


# -- generation: rank 0 encodes the images, every rank gets the features -------------------
class RankLost(RuntimeError):
    """The ring lost a rank. Its backend may fail the pending transfers without raising,
    leaving zeros where the lost rank's data would be, so `share_object` checks each frame."""


FRAME_MARK = 0x5A17C0DE  # the header's third word is size ^ FRAME_MARK: zeros or a torn header fail it


def share_object(group, obj=None):
    """Rank 0's picklable `obj` on every rank (as mlx-lm's server shares requests).

    A header (size, crc32, size ^ FRAME_MARK) comes first, so that a follower can tell a
    frame torn by a dead rank 0 from a real one: it raises `RankLost` instead of unpickling
    zeros or allocating a garbage size."""
    if group.rank() == 0:
        payload = pickle.dumps(obj)
        header = mx.array([len(payload), zlib.crc32(payload), len(payload) ^ FRAME_MARK], dtype=mx.uint32)
        mx.eval(mx.distributed.all_sum(header, group=group))
        mx.eval(mx.distributed.all_sum(mx.array(np.frombuffer(payload, dtype=np.uint8)), group=group))
        return obj
    size, crc, mark = np.array(mx.distributed.all_sum(mx.zeros(3, dtype=mx.uint32), group=group)).tolist()
    if size == 0 or mark != size ^ FRAME_MARK:
        raise RankLost("[ring] connection to rank 0 was lost: no message came")
    payload = np.array(mx.distributed.all_sum(mx.zeros(size, dtype=mx.uint8), group=group)).tobytes()
    if zlib.crc32(payload) != crc:
        raise RankLost("[ring] connection to rank 0 was lost: a message came torn")
    return pickle.loads(payload)


def check_ranks(group):
    """Raise `RankLost` unless every rank of `group` took part in this all-reduce."""
    present = mx.distributed.all_sum(mx.array(1, dtype=mx.int32), group=group).item()
    if present != group.size():
        raise RankLost(f"[ring] connection to a peer was lost: {present} of {group.size()} ranks answered")


def shared_features(model, encode: Callable):
    """(keys, features) from `encode()`: run here in one process; sharded, run on rank 0
    (the only rank that reads the images and holds the tower) and its features shared with
    the other ranks. An error `encode` raises on rank 0 is raised on every rank."""
    group = group_of(model)
    if group is None:
        return encode()
    if group.rank() == 0:
        try:
            keys, features = encode()
        except LlavaError as e:
            share_object(group, ("error", str(e)))
            raise
        share_object(group, ("ok", keys, [(f.shape, str(f.dtype).split(".")[-1]) for f in features]))
    else:
        status, *rest = share_object(group)
        if status == "error":
            raise LlavaError(rest[0])
        keys, shapes = rest
        features = [mx.zeros(shape, dtype=getattr(mx, dtype)) for shape, dtype in shapes]
    if not features:
        return keys, features
    flat = mx.distributed.all_sum(mx.concatenate([f.reshape(-1) for f in features]), group=group)
    sizes = np.cumsum([0] + [f.size for f in features])  # rank 0's features plus zeros: exact
    shared = [flat[sizes[i] : sizes[i + 1]].reshape(f.shape) for i, f in enumerate(features)]
    mx.eval(shared)
    return keys, shared


def agree_seed(model, seed: Optional[int]) -> Optional[int]:
    """Every rank samples the same tokens: without a seed, rank 0's random one is used."""
    group = group_of(model)
    if group is None or seed is not None:
        return seed
    mine = int(np.random.default_rng().integers(0, 2**31)) if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine), group=group).item())


def settle(model):
    """Finish the step mlx-lm schedules ahead, so no rank leaves a collective half done."""
    if group_of(model) is not None:
        from mlx_lm.generate import generation_stream

        mx.synchronize(generation_stream)
        mx.synchronize()
