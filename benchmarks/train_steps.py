"""Where one training step of ours goes, in its own process (the training benchmark runs it):

    python -m benchmarks.train_steps MODEL DATA.json FOLDER

Reading and preparing the batch's pictures, the frozen tower, the projector, the decoder's forward
pass (the head included), the backward pass, the optimizer's update; LoRA, the mean of four steps
after one. Prints
one `RESULT {json}` line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

BATCH, RANK = 4, 8


def main(model: str, data: str, folder: str):
    import mlx.core as mx

    from llava_mlx.checkpoint.preprocessing import image_settings
    from llava_mlx.train.arguments import parse
    from llava_mlx.train.build import build
    from llava_mlx.train.data import prepare
    from llava_mlx.train.loss import loss_sum, tower_features
    from llava_mlx.train.run import training_tokenizer
    from llava_mlx.train.templates import template
    from llava_mlx.train.trainer import Trainer

    args = parse(
        ["--model_name_or_path", model, "--data_path", data, "--image_folder", folder, "--output_dir", "unused",
         "--lora_enable", "True", "--lora_r", str(RANK), "--lora_alpha", str(2 * RANK), "--lora_dropout", "0",
         "--version", "v1", "--model_max_length", "2048", "--image_aspect_ratio", "pad",
         "--mm_use_im_patch_token", "False", "--per_device_train_batch_size", str(BATCH)]
    )  # fmt: skip
    trainable = build(args)
    tokenizer = training_tokenizer(trainable.source, args)
    settings = image_settings(trainable.source, trainable.tower_dir, trainable.model.config)
    positions = trainable.model.config.image_token_count
    examples, _ = prepare(Path(data), Path(folder), template("v1"), tokenizer, positions)
    trainer = Trainer(trainable, args, examples, settings, tokenizer.pad_id)
    model_ = trainable.model
    parts = dict(pictures=0.0, tower=0.0, projector=0.0, decoder_forward=0.0, backward=0.0, optimizer=0.0)
    for n, share in enumerate(trainer.batches_of(0)[:5]):
        marks = [time.perf_counter()]
        batch = trainer.batch(share)
        marks.append(time.perf_counter())
        features = tower_features(model_, batch)
        mx.eval(features)
        marks.append(time.perf_counter())
        mx.eval(model_.multi_modal_projector(features))
        marks.append(time.perf_counter())
        total, _ = loss_sum(model_, batch, features, 2048)
        mx.eval(total)
        marks.append(time.perf_counter())
        _, grads = trainer.value_and_grad(model_, batch, features)
        mx.eval(grads)
        marks.append(time.perf_counter())
        trainer.optimizer.update(model_, grads)
        mx.eval(model_.trainable_parameters(), trainer.optimizer.state)
        marks.append(time.perf_counter())
        spans = [b - a for a, b in zip(marks, marks[1:])]
        spans[4] -= spans[3]  # the gradient's pass less its forward: the backward
        spans[3] -= spans[2]  # the forward less the projector's share: the decoder (and the head)
        if n:
            for key, span in zip(parts, spans):
                parts[key] += span / 4
    print("RESULT " + json.dumps(parts))


if __name__ == "__main__":
    main(*sys.argv[1:4])
