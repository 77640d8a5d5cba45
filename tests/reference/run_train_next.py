"""Run the LLaVA-NeXT code's own training (llava/train/train.py and llava_trainer.py at the pinned
commit, transformers 4.45.2, accelerate 0.34.2, peft 0.13.2) on tiny fixtures, as
run_train_original.py runs the original's:

    .venv-next/bin/python tests/reference/run_train_next.py train RECORD.json ADAPTER_DIR|- [PROBE.json] -- ARGS
    .venv-next/bin/python tests/reference/run_train_next.py preprocess JOBS.json OUT.json

train: as run_train_original.py's (ADAPTER_DIR: where peft's initial LoRA weights are saved, -
for none). PROBE.json: a job of run_next.py's `run` (images, turns and conv_mode) and "out": the
trained model's logits on it, computed in memory as soon as training ends, written there as
run_next.py writes them (this code's builder cannot load a LoRA result over Qwen2).

The workarounds of run_train_original.py (a stand-in for deepspeed, which train.py imports at its
top; the tower kept float32 instead of train()'s float16 cast; records in file order), and for
this code, the smallest that let it run as released on a CPU, each said where it is made:
- trl: llava_trainer.py imports its DPO trainer, which supervised fine-tuning never uses;
- the copy of transformers' `_inner_training_loop` in llava_trainer.py names ~30 things it never
  imported (DebugOption, TrainerState, math, ...): they are given from transformers.trainer, and
  `plot_graphs_based_on_log_history`, defined nowhere, as nothing;
- `torch.cuda.synchronize()` in its saver is made a no-op on a machine without CUDA.
"""

import importlib.machinery
import json
import pathlib
import sys
import types

import run_train_original as common


def stand_in_trl():
    """Workaround: llava_trainer.py imports trl's DPO trainer (for its DPO class only)."""
    names = ("trl", "trl.trainer", "trl.trainer.utils")
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules.setdefault(name, module)
    modules["trl.trainer"].DPOTrainer = type("DPOTrainer", (), {})
    modules["trl.trainer.utils"].DPODataCollatorWithPadding = type("DPODataCollatorWithPadding", (), {})
    modules["trl"].trainer = modules["trl.trainer"]


def give_the_loop_its_names():
    """Workaround: the names llava_trainer's copy of _inner_training_loop uses without importing
    them, from transformers.trainer (where the loop came from)."""
    import torch
    import transformers.trainer as hf_trainer
    from llava.train import llava_trainer

    for name in dir(hf_trainer):
        if not name.startswith("__") and not hasattr(llava_trainer, name):
            setattr(llava_trainer, name, getattr(hf_trainer, name))
    llava_trainer.plot_graphs_based_on_log_history = lambda *args, **kwargs: None
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None


def probe_after_training(probe_file: str):
    """The trained model's logits on the probe's job, right after LLaVATrainer.train returns."""
    import numpy as np
    import torch
    from llava.mm_utils import process_images
    from llava.train.llava_trainer import LLaVATrainer
    from PIL import Image

    job = json.loads(pathlib.Path(probe_file).read_text())
    train = LLaVATrainer.train

    def training_then_probe(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        import run_next  # only now: importing it turns autograd off (it runs inference)

        model, tokenizer = self.model, self.tokenizer
        model.eval()
        images = [Image.open(p).convert("RGB") for p in job["images"]]
        pixels = process_images(images, model.get_vision_tower().image_processor, model.config)
        prompt = run_next.conversation(job, len(images), tokenizer)
        with torch.no_grad():
            record = run_next.answer(
                tokenizer, model, prompt, [pixels[i] for i in range(len(images))], ["image"] * len(images),
                [im.size for im in images], int(job.get("new_tokens", 16)),
            )  # fmt: skip
        np.savez(job["out"], **record)
        torch.set_grad_enabled(True)
        model.train()
        return result

    LLaVATrainer.train = training_then_probe


def tokenizer_as_train_loads_it(model: str, version: str, max_length: int):
    """train()'s tokenizer for the model's path and the version (its pad token, its default
    conversation set in conversation.py as train() sets them)."""
    import transformers
    from llava import conversation as conversation_lib

    name = model.lower()
    kwargs = dict(model_max_length=max_length)
    if "mistral" in name or "mixtral" in name or "zephyr" in name:
        kwargs.update(padding_side="left")
    elif "qwen" in name:
        kwargs.update(padding_side="right")
    else:
        kwargs.update(padding_side="right", use_fast=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model, **kwargs)
    if version == "v0":
        assert tokenizer.pad_token is not None  # else train() adds [PAD] (not a case here)
        conversation_lib.default_conversation = conversation_lib.conv_vicuna_v0
    elif version == "v0.5":
        tokenizer.pad_token = tokenizer.unk_token
        conversation_lib.default_conversation = conversation_lib.conv_vicuna_v0
    else:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        conversation_lib.default_conversation = conversation_lib.conv_templates.get(
            version, conversation_lib.conv_templates["vicuna_v1"]
        )
    return tokenizer


def preprocess(jobs_file: str, out_file: str):
    """ids, labels and pictures of every record from the code's own LazySupervisedDataset, per
    version. JOBS.json: {"model", "model_max_length", "image_folder", "image_aspect_ratio",
    "image_grid_pinpoints" (a list, as train() turns the string form into), "siglip": bool,
    "cases": [{"version", "data"}]}; each picture's pixels to OUT.json's folder as .npy."""
    import numpy as np
    import transformers
    from llava.model.multimodal_encoder.siglip_encoder import SigLipImageProcessor
    from llava.train import train as train_module

    jobs = json.loads(pathlib.Path(jobs_file).read_text())
    out_dir = pathlib.Path(out_file).parent
    if jobs["siglip"]:
        processor = SigLipImageProcessor()
    else:
        processor = transformers.CLIPImageProcessor.from_pretrained(jobs["vision_tower"])
    results = []
    for c, case in enumerate(jobs["cases"]):
        tokenizer = tokenizer_as_train_loads_it(jobs["model"], case["version"], jobs["model_max_length"])
        data_path = out_dir / f"next-data-{c}.json"
        data_path.write_text(json.dumps(case["data"]))
        data_args = train_module.DataArguments(
            data_path=str(data_path),
            image_folder=jobs["image_folder"],
            image_aspect_ratio=jobs["image_aspect_ratio"],
            image_grid_pinpoints=jobs["image_grid_pinpoints"],
            is_multimodal=True,
        )
        data_args.image_processor = processor
        data_args.mm_use_im_start_end = False
        dataset = train_module.LazySupervisedDataset(str(data_path), tokenizer, data_args)
        for i in range(len(dataset)):
            item = dataset._get_item(i)  # no retries: a failing record fails the job
            pictures = []
            for k, (pixels, size, modality) in enumerate(item["image"]):
                file = out_dir / f"next-pixels-{c}-{i}-{k}.npy"
                np.save(file, pixels.numpy())
                pictures.append({"pixels": str(file), "size": list(size), "modality": modality})
            results.append(
                {
                    "version": case["version"],
                    "id": case["data"][i].get("id"),
                    "input_ids": item["input_ids"].tolist(),
                    "labels": item["labels"].tolist(),
                    "pad_id": tokenizer.pad_token_id,
                    "pictures": pictures,
                }
            )
    pathlib.Path(out_file).write_text(json.dumps(results))


def main(argv):
    common.stand_in_deepspeed()
    stand_in_trl()
    if len(argv) >= 4 and argv[1] == "preprocess":
        preprocess(argv[2], argv[3])
    elif len(argv) >= 4 and argv[1] == "train" and "--" in argv:
        give_the_loop_its_names()
        split = argv.index("--")
        head = argv[2:split]
        if len(head) > 2:
            probe_after_training(head[2])
        adapter = head[1] if len(head) > 1 and head[1] != "-" else None
        common.train(head[0], adapter, argv[split + 1 :])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
