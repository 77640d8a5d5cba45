"""A batch's loss, computed by the same LlavaModel the generator runs.

The tower (frozen) encodes the batch's pictures outside the differentiated function; inside
it the projector, the merge into each sequence (`model.embed`), the cut at model_max_length
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

from ..model import IMAGE_PLACEHOLDER
from .data import Example, merged, pixels
from .templates import IGNORE


@dataclass
class Batch:
    ids: List[List[int]]  # per sample, the pad tokens dropped, IMAGE_PLACEHOLDER where the picture goes
    labels: List[np.ndarray]  # per sample, over the merged sequence, cut at model_max_length
    pixels: Optional[np.ndarray]  # the batch's pictures, (n, crop, crop, 3)
    picture: List[Optional[int]]  # which of them each sample shows
    sizes: List[Optional[tuple]]  # each sample's picture's (width, height) as the model sees it

    @property
    def positions(self) -> int:
        return sum(len(x) for x in self.labels)


def make_batch(
    examples: List[Example], settings: dict, aspect: str, pad_id: int, max_length: int, image_positions: int
) -> Batch:
    """The collator (pad, cut at model_max_length, the pad tokens dropped as the attention mask
    drops them) and the pictures, as LazySupervisedDataset and DataCollatorForSupervisedDataset
    give them to the model."""
    ids, labels, pictures, picture, sizes = [], [], [], [], []
    for e in examples:
        kept_ids, kept_labels = merged(e.ids[:max_length], e.labels[:max_length], pad_id)
        expanded = []
        for i, label in zip(kept_ids, kept_labels):
            expanded += [IGNORE] * image_positions if i == IMAGE_PLACEHOLDER else [label]
        ids.append(kept_ids)
        labels.append(np.array(expanded[:max_length], dtype=np.int32))
        if e.has_image and IMAGE_PLACEHOLDER in kept_ids:
            picture.append(len(pictures))
            pictures.append(pixels(e, settings, aspect))
            sizes.append((settings["crop"], settings["crop"]))  # one square crop: its size is not read
        else:
            picture.append(None)
            sizes.append(None)
    return Batch(ids, labels, np.concatenate(pictures) if pictures else None, picture, sizes)


def tower_features(model, batch: Batch) -> Optional[mx.array]:
    """The frozen tower's features of the batch's pictures (nothing is differentiated through it)."""
    if batch.pixels is None:
        return None
    return mx.stop_gradient(model.tower_features(mx.array(batch.pixels)))


def loss_sum(model, batch: Batch, features: Optional[mx.array], max_length: int):
    """(the summed cross entropy of every unmasked next token, their count)."""
    projected = model.multi_modal_projector(features) if features is not None else None
    embeddings = []
    for ids, picture, size in zip(batch.ids, batch.picture, batch.sizes):
        images = [model.merge_image(projected[picture : picture + 1], size)] if picture is not None else []
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
