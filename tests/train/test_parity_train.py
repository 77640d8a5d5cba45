"""Fine-tuning exact to the original train.py, live: the same command line (scripts/v1_5's
arguments) run by the original's own trainer (transformers 4.37.2's Trainer, in .venv-orig) and
by this project, in float32, records in file order. LoRA with --mm_projector_lr (from the
reference's own initial LoRA weights, dropout 0), the projector alone with --version plain
(pretraining), a full fine-tune with weight decay and gradient accumulation. The data has
several turns, a text-only record, <image> after the question and a record cut by
model_max_length; the runs go over more than one epoch.

Every step's loss is within 1e-4 (relative) of the reference's at the first step and 1e-3 after,
at the same learning rates; what each run saved, loaded by the original builder and by this
project, gives the reference's trained logits within 1e-3 of max|logit|.
"""

import numpy as np
import pytest

from llava_mlx import load

from reference.original import run_original
from reference.training import reference_train, train_log

QUESTION = "What is in the image?"


def common(training) -> list:
    return [
        "--model_name_or_path", training["vicuna"], "--vision_tower", training["tower"],
        "--pretrain_mm_mlp_adapter", training["projector"], "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_folder", training["data"], "--image_aspect_ratio", "pad", "--bf16", "False",
        "--evaluation_strategy", "no", "--save_strategy", "no", "--logging_steps", "1",
        "--model_max_length", "700", "--gradient_checkpointing", "False", "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True", "--report_to", "none",
    ]  # fmt: skip


# scripts/v1_5/finetune_lora.sh, pretrain.sh and finetune.sh, shrunk
MODES = {
    "lora": [
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
        "--mm_projector_lr", "3e-3", "--version", "v1", "--data_path", "train.json",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--learning_rate", "2e-3", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
    ],
    "projector": [
        "--tune_mm_mlp_adapter", "True", "--version", "plain", "--data_path", "captions.json",
        "--num_train_epochs", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-3", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
    ],
    # 2 batches an epoch, 3 per step: the Trainer's quirks (a step at an epoch's end with fewer
    # batches, the next epoch's first step sooner) are in play
    "full": [
        "--version", "v1", "--data_path", "train.json",
        "--num_train_epochs", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3",
        "--learning_rate", "1e-3", "--weight_decay", "0.1", "--warmup_steps", "1", "--lr_scheduler_type", "linear",
    ],
}  # fmt: skip


def argv(training, mode: str, out) -> list:
    args = [str(a) for a in common(training) + MODES[mode]]
    i = args.index("--data_path") + 1
    args[i] = str(training["data"] / args[i])
    return args + ["--output_dir", str(out)]


@pytest.fixture(scope="session")
def trained(training, tmp_path_factory):
    """mode -> (the reference's record, its output, our log, our output)."""
    from llava_mlx.train.arguments import parse
    from llava_mlx.train.run import run

    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for mode in MODES:
        adapter = root / f"initial-{mode}" if mode == "lora" else None
        # the builder reads a result as LoRA by its name ('lora' in it), as projector-only otherwise
        reference, ours = root / f"reference-{mode}", root / f"ours-{mode}"
        record = reference_train(argv(training, mode, reference), root / f"{mode}.json", adapter)
        extra = ["--shuffle", "False"] + (["--resume_adapter", str(adapter)] if adapter else [])
        run(parse(argv(training, mode, ours) + extra))
        runs[mode] = (record, reference, train_log(ours), ours)
    return runs


@pytest.mark.parametrize("mode", list(MODES))
def test_every_step_equals_the_reference(mode, trained):
    record, _, log, _ = trained[mode]
    theirs, ours = record["loss"], [line["loss"] for line in log]
    print(f"\n{mode}: " + " ".join(f"{a:.6f}/{b:.6f}" for a, b in zip(theirs, ours)), end=" ")  # pytest -s
    assert len(ours) == len(theirs) > 2
    for step, (a, b) in enumerate(zip(theirs, ours)):
        assert abs(a - b) <= (1e-4 if step == 0 else 1e-3) * abs(a), (step, a, b)
    assert [line["learning_rate"] for line in log] == pytest.approx([rates[0] for rates in record["learning_rate"]])
    assert [line["grad_norm"] for line in log] == pytest.approx(record["grad_norm"], rel=1e-3)


@pytest.fixture(scope="session")
def builder_logits(trained, training, tmp_path_factory):
    """The original builder's logits for each mode's reference and our saved result."""
    jobs = []
    for mode, (_, reference, _, ours) in trained.items():
        for who, path in (("reference", reference), ("ours", ours)):
            job = {
                "name": f"{who}-{mode}",
                "checkpoint": str(path),
                "images": [str(training["data"] / "pictures" / "wide.png")],
            }
            job.update(question=QUESTION, conv_mode="llava_v1", new_tokens=16)
            if mode != "full":
                job["model_base"] = str(training["vicuna"])
            jobs.append(job)
    return run_original(jobs, tmp_path_factory.mktemp("trained-logits"))


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("mode", list(MODES))
def test_what_was_saved_gives_the_references_trained_logits(mode, trained, builder_logits, training):
    reference, ours = builder_logits[f"reference-{mode}"], builder_logits[f"ours-{mode}"]
    assert relative(ours["logits"], reference["logits"]) <= 1e-3  # the original builder, on our files
    assert ours["greedy"].tolist() == reference["greedy"].tolist()
    model, processor = load(str(trained[mode][3]), model_base=None if mode == "full" else str(training["vicuna"]))
    inputs = processor(str(reference["prompt"]), [str(training["data"] / "pictures" / "wide.png")])
    assert relative(model(**inputs)[0], reference["logits"]) <= 1e-3  # this project, on our files
