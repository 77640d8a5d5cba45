"""Run the ORIGINAL LLaVA training code (llava/train/train.py and llava/train/llava_trainer.py of
llava-torch 1.2.2.post1, transformers 4.37.2's Trainer, accelerate 0.21.0, peft) on tiny fixtures.

Executed by the reference venv (scripts/setup_reference.sh), never imported by the tests:

    .venv-orig/bin/python tests/reference/run_train_original.py preprocess JOBS.json OUT.json
    .venv-orig/bin/python tests/reference/run_train_original.py train RECORD.json [INITIAL_ADAPTER_DIR] -- ARGS

preprocess: JOBS.json is {"model": dir, "model_max_length": n, "image_folder": dir, "image_aspect_ratio": s,
"cases": [{"version": v, "data": [records...]}]}; for every record of every case, the ids and labels
train.py's own LazySupervisedDataset gives (its `preprocess_*` for the version as train() sets it up,
with its pad token), and the pixels of its picture, written to OUT.json (pixels to OUT.json's
folder as .npy). The tokenization-mismatch warnings it prints are counted per record.

train: train.py's own `train()` with ARGS as its command line (the arguments of
scripts/v1_5/*.sh), on the CPU in float32. Written to RECORD.json: every optimizer step's loss
(unrounded: the Trainer logs it rounded to 4 places), learning rate and gradient norm before
clipping. With INITIAL_ADAPTER_DIR, the LoRA adapter peft made (before any step) is saved there
as peft saves adapters, for the test to start from the same LoRA weights.

The smallest workarounds for running the release as it is on a CPU, each said where it is made:
- `deepspeed`: train.py's savers import it even off ZeRO-3 (for parameters that are never
  partitioned here); a stand-in module is given.
- train() casts the vision tower to float16 (bfloat16 with --bf16) for GPUs: the cast is
  dropped, the tower stays float32 like everything else.
- records in file order: the Trainer's random sampler is replaced by a sequential one (the
  project's --shuffle False), so both sides see the same batches.
"""

import importlib.machinery
import json
import os
import pathlib
import sys
import types
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def stand_in_deepspeed():
    """Workaround: train.py's maybe_zero_3 imports deepspeed's ZeRO helpers even off ZeRO-3,
    where no parameter is partitioned (they have no ds_id): a stand-in that is imported, never used."""
    deepspeed = types.ModuleType("deepspeed")
    zero = types.ModuleType("deepspeed.zero")

    @contextmanager
    def gathered(params):
        yield

    zero.GatheredParameters = gathered
    deepspeed.utils = types.SimpleNamespace(set_z3_leaf_modules=lambda *a, **k: None)  # the LLaVA-NeXT code's Mixtral
    partition = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    partition.ZeroParamStatus = types.SimpleNamespace(NOT_AVAILABLE="not available")
    deepspeed.zero = zero
    runtime = types.ModuleType("deepspeed.runtime")
    runtime_zero = types.ModuleType("deepspeed.runtime.zero")
    runtime_zero.partition_parameters = partition
    runtime.zero = runtime_zero
    deepspeed.runtime = runtime
    for name, module in {
        "deepspeed": deepspeed,
        "deepspeed.zero": zero,
        "deepspeed.runtime": runtime,
        "deepspeed.runtime.zero": runtime_zero,
        "deepspeed.runtime.zero.partition_parameters": partition,
    }.items():
        # a spec, so that find_spec() works; no package metadata, so transformers and accelerate
        # still see deepspeed as not installed
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules.setdefault(name, module)


def keep_the_tower_float32():
    """Workaround: train() puts the tower in float16 (a GPU's half precision); on the CPU in
    float32 the cast is dropped (the LLaVA-NeXT code's SigLIP tower too, when it has one)."""
    import importlib

    import torch

    towers = [("llava.model.multimodal_encoder.clip_encoder", "CLIPVisionTower")]
    towers.append(("llava.model.multimodal_encoder.siglip_encoder", "SigLipVisionTower"))
    for module, name in towers:
        try:
            tower = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError:  # the original code has no SigLIP tower
            continue

        def to_float32(self, *args, _to=tower.to, **kwargs):
            if kwargs.get("dtype") in (torch.float16, torch.bfloat16):
                kwargs["dtype"] = torch.float32
            return _to(self, *args, **kwargs)

        tower.to = to_float32


def records_in_file_order():
    """Workaround: the project's --shuffle False; the Trainer's RandomSampler would order them by torch's RNG."""
    from llava.train.llava_trainer import LLaVATrainer
    from torch.utils.data import SequentialSampler

    sampler = LLaVATrainer._get_train_sampler

    def in_order(self):
        if self.args.group_by_modality_length:
            return sampler(self)
        return SequentialSampler(self.train_dataset)

    LLaVATrainer._get_train_sampler = in_order


def record_steps(record: dict):
    """Each optimizer step's loss (the micro-batches' losses / GA, summed, as tr_loss adds them),
    learning rate and gradient norm, unrounded."""
    import torch
    from accelerate import Accelerator
    from llava.train.llava_trainer import LLaVATrainer

    step_loss = [0.0]
    training_step, clip = LLaVATrainer.training_step, Accelerator.clip_grad_norm_

    def recording_step(self, model, inputs):
        loss = training_step(self, model, inputs)
        step_loss[0] += float(loss)
        return loss

    def recording_clip(self, parameters, max_norm, norm_type=2):
        norm = clip(self, parameters, max_norm, norm_type)
        record["grad_norm"].append(float(norm))
        return norm

    LLaVATrainer.training_step, Accelerator.clip_grad_norm_ = recording_step, recording_clip
    optimizer_step = torch.optim.AdamW.step

    def recording_optimizer_step(self, *args, **kwargs):
        record["loss"].append(step_loss[0])
        record["learning_rate"].append([group["lr"] for group in self.param_groups])
        step_loss[0] = 0.0
        return optimizer_step(self, *args, **kwargs)

    torch.optim.AdamW.step = recording_optimizer_step


def save_initial_adapter(directory: str):
    """Save the LoRA adapter as peft made it, before the first step."""
    import peft

    get_peft_model = peft.get_peft_model

    def saving(model, config, *args, **kwargs):
        wrapped = get_peft_model(model, config, *args, **kwargs)
        wrapped.save_pretrained(directory)
        return wrapped

    peft.get_peft_model = saving


def train(record_file: str, adapter_dir, args):
    stand_in_deepspeed()
    keep_the_tower_float32()
    records_in_file_order()
    record = {"loss": [], "learning_rate": [], "grad_norm": []}
    record_steps(record)
    if adapter_dir:
        save_initial_adapter(adapter_dir)
    from llava.train import train as train_module

    sys.argv = ["train.py", *args]
    train_module.train()
    pathlib.Path(record_file).write_text(json.dumps(record))


def preprocess(jobs_file: str, out_file: str):
    """ids, labels and pixels of every record, from train.py's own dataset, per version."""
    import io
    from contextlib import redirect_stdout

    import numpy as np
    import transformers
    from llava import conversation as conversation_lib
    from llava.train import train as train_module

    jobs = json.loads(pathlib.Path(jobs_file).read_text())
    out_dir = pathlib.Path(out_file).parent
    processor = transformers.CLIPImageProcessor.from_pretrained(jobs["vision_tower"])
    module_default = conversation_lib.default_conversation
    results = []
    for c, case in enumerate(jobs["cases"]):
        version = case["version"]
        # as train() sets them up for the version: v0 and v0.5 keep the module's default template
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            jobs["model"], model_max_length=jobs["model_max_length"], padding_side="right", use_fast=False
        )
        if version == "v0":
            assert tokenizer.pad_token is not None  # else train() adds [PAD] (not a case here)
            conversation_lib.default_conversation = module_default
        elif version == "v0.5":
            tokenizer.pad_token = tokenizer.unk_token
            conversation_lib.default_conversation = module_default
        else:
            tokenizer.pad_token = tokenizer.unk_token
            conversation_lib.default_conversation = conversation_lib.conv_templates.get(
                version, conversation_lib.conv_templates["vicuna_v1"]
            )
        data_path = out_dir / f"data-{c}.json"
        data_path.write_text(json.dumps(case["data"]))
        data_args = train_module.DataArguments(
            data_path=str(data_path),
            image_folder=jobs["image_folder"],
            image_aspect_ratio=jobs["image_aspect_ratio"],
            is_multimodal=True,
        )
        data_args.image_processor = processor
        data_args.mm_use_im_start_end = case.get("mm_use_im_start_end", False)
        dataset = train_module.LazySupervisedDataset(str(data_path), tokenizer, data_args)
        for i in range(len(dataset)):
            printed = io.StringIO()
            with redirect_stdout(printed):
                item = dataset[i]
            pixels = out_dir / f"pixels-{c}-{i}.npy"
            np.save(pixels, item["image"].numpy())
            results.append(
                {
                    "version": version,
                    "id": case["data"][i].get("id"),
                    "input_ids": item["input_ids"].tolist(),
                    "labels": item["labels"].tolist(),
                    "mismatch_warnings": printed.getvalue().count("WARNING: tokenization mismatch"),
                    "pixels": str(pixels),
                }
            )
    pathlib.Path(out_file).write_text(json.dumps(results))


def main(argv):
    if len(argv) >= 4 and argv[1] == "preprocess":
        stand_in_deepspeed()
        preprocess(argv[2], argv[3])
    elif len(argv) >= 4 and argv[1] == "train" and "--" in argv:
        split = argv.index("--")
        head = argv[2:split]
        train(head[0], head[1] if len(head) > 1 else None, argv[split + 1 :])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
