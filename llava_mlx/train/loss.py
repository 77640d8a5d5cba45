"""A batch's loss, computed by the same LlavaModel the generator runs.

A frozen tower encodes the batch's pictures outside the differentiated function (a trained
one, `--mm_tunable_parts mm_vision_tower`, inside it); inside it the projector, each picture's
merge (its crops, as at inference), the merge into each sequence (`model.embed`), the cut at model_max_length
(as prepare_inputs_labels_for_multimodal truncates the merged sequences), right padding and
the decoder, and the head on the positions whose next token is trained. The loss is the cross
entropy of every unmasked next token, summed, with their count: the caller divides by the
tokens of the whole batch (all ranks), which makes it the mean over every unmasked token of
the batch, as LlamaForCausalLM computes it.
"""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model import IMAGE_PLACEHOLDER, LlavaConfig
from .data import Example, merged, pixels
from .templates import IGNORE


@dataclass
class Batch:
    ids: List[List[int]]  # per sample, the pad tokens dropped, IMAGE_PLACEHOLDER where each picture goes
    labels: List[np.ndarray]  # per sample, over the merged sequence, cut at model_max_length
    pixels: Optional[np.ndarray]  # every crop of the batch's pictures, (n, crop, crop, 3)
    crops: List[int]  # how many crops each picture has, in order
    sizes: List[tuple]  # each picture's (width, height)
    several: List[bool]  # whether its record has several pictures (each then one padded crop)
    pictures: List[List[int]]  # which pictures each sample shows, in order

    @property
    def positions(self) -> int:
        return sum(len(x) for x in self.labels)


def make_batch(examples: List[Example], settings: dict, config: LlavaConfig, pad_id: int, max_length: int) -> Batch:
    """The collator (pad, cut at model_max_length, the pad tokens dropped as the attention mask
    drops them) and the pictures whose placeholders are left, as LazySupervisedDataset and
    DataCollatorForSupervisedDataset give them to the model."""
    ids, labels, crops, batch = [], [], [], Batch([], [], None, [], [], [], [])
    for e in examples:
        kept_ids, kept_labels = merged(e.ids[:max_length], e.labels[:max_length], pad_id)
        several = len(e.images) > 1
        shown, expanded, sources = [], [], iter(zip(e.images, e.sizes))
        for i, label in zip(kept_ids, kept_labels):
            if i != IMAGE_PLACEHOLDER:
                expanded.append(label)
                continue
            source, size = next(sources)
            shown.append(len(batch.sizes))
            crops.append(pixels(source, settings, config, several))
            batch.crops.append(len(crops[-1]))
            batch.sizes.append(size)
            batch.several.append(several)
            expanded += [IGNORE] * config.image_token_count(size, several)
        ids.append(kept_ids)
        labels.append(np.array(expanded[:max_length], dtype=np.int32))
        batch.pictures.append(shown)
    batch.ids, batch.labels = ids, labels
    batch.pixels = np.concatenate(crops) if crops else None
    return batch


def tower_features(model, batch: Batch) -> Optional[mx.array]:
    """The tower's features of every crop of the batch's pictures."""
    if batch.pixels is None:
        return None
    return model.tower_features(mx.array(batch.pixels))


def loss_sum(model, batch: Batch, features: Optional[mx.array], max_length: int):
    """(the summed cross entropy of every unmasked next token, their count). `features`: the
    frozen tower's (computed outside), or None to run a trained tower here."""
    if features is None and batch.pixels is not None:
        features = tower_features(model, batch)
    projected = model.multi_modal_projector(features) if features is not None else None
    starts = np.cumsum([0] + batch.crops)
    merged_pictures = [
        model.merge_image(projected[starts[p] : starts[p + 1]], size) for p, size in enumerate(batch.sizes)
    ]
    embeddings = []
    for ids, shown in zip(batch.ids, batch.pictures):
        images = [merged_pictures[p] for p in shown]
        embeddings.append(model.embed(ids, image_features=images)[0][:max_length])
    longest = max(e.shape[0] for e in embeddings)
    width = embeddings[0].shape[1]
    x = mx.stack(
        [
            mx.concatenate([e, mx.zeros((longest - e.shape[0], width), e.dtype)]) if e.shape[0] < longest else e
            for e in embeddings
        ]
    )
    labels = np.full((len(embeddings), longest), IGNORE, dtype=np.int32)
    for row, label in enumerate(batch.labels):
        labels[row, : len(label)] = label
    lm = model.language_model
    hidden = lm.model(None, input_embeddings=x)
    # The vocabulary's logits only where a next token is trained: the picture's positions and the
    # questions are most of a LLaVA sequence, and the head is a large share of its compute.
    rows, columns = np.nonzero(labels[:, 1:] != IGNORE)
    if len(rows) == 0:
        return hidden.sum() * 0.0, mx.array(0)
    h = hidden[mx.array(rows), mx.array(columns)]
    logits = (lm.lm_head(h) if "lm_head" in lm else lm.model.embed_tokens.as_linear(h)).astype(mx.float32)
    targets = mx.array(labels[rows, columns + 1])
    return nn.losses.cross_entropy(logits, targets).sum(), mx.array(len(rows))
