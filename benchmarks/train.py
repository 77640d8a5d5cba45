"""The training benchmark: trained tokens per second and MLX's peak memory for LoRA, QLoRA
(4-bit) and a full fine-tune, this project's trainer against mlx-vlm's on the same checkpoint
and data in the same run; LoRA on a small LLaVA-OneVision too (train_onevision.py: Qwen2 +
SigLIP, anyres_max_9, by the LLaVA-NeXT code's rules here, its llava_onevision layout there);
and where a step of ours goes.

The checkpoint is the benchmark's LLaVA-1.5 (llava-hf layout, which mlx-vlm loads), also written
in the original layout (its tower beside it), which the original train.py's rules start from:
the same weights. The data: pictures and two-turn conversations, in LLaVA's JSON for this
project and as mlx-vlm's `messages` rows for it. Each (trainer, mode) runs in its own process;
a trainer's tokens are the positions of the sequences it trained on (the pictures' 576 included),
per second of its training loop (model loading excluded), as each reports them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import train_onevision
from .checkpoints import ROOT, checkpoint_dir, make_image
from .report import fmt, machine_rows, target_row
from .worker import child_env

MODES = ("lora", "qlora", "full", "onevision lora")
ONEVISION_RECORDS = 16  # its pictures take ~3,000 positions each (anyres_max_9): fewer, one epoch, and one a
# batch: mlx-vlm's llava_onevision cannot batch pictures of different tile counts (a broadcast error)
RECORDS = 32
BATCH = 4
EPOCHS = 2
RANK = 8
TARGET = 1.25  # this project's trained tokens/s over mlx-vlm's, at no more peak memory
ANSWERS = [
    "The picture shows a wide landscape with a river, trees and a few houses under a cloudy sky.",
    "There are several colourful circles on a gradient background, some overlapping each other.",
    "A small red boat floats near the shore while two people walk along the sandy beach.",
    "The image is mostly blue and green, with a bright yellow shape in the upper left corner.",
]


def original_layout(hf: Path, out: Path) -> Path:
    """The same checkpoint in the original layout (LlavaLlamaForCausalLM + a CLIP tower directory)."""
    from safetensors.numpy import load_file, save_file

    tower, model = out / "clip-tower", out / "llava-original"
    for d in (tower, model):
        d.mkdir(parents=True, exist_ok=True)
    config = json.loads((hf / "config.json").read_text())
    weights = {}
    for file in sorted(hf.glob("*.safetensors")):
        weights.update(load_file(file))
    own, vision = {}, {}
    for name, value in weights.items():
        if name.startswith("vision_tower."):
            vision[name[len("vision_tower.") :]] = value
        elif name.startswith("language_model.model."):
            own["model." + name[len("language_model.model.") :]] = value
        elif name.startswith("language_model.lm_head."):
            own[name[len("language_model.") :]] = value
        else:
            index, rest = name[len("multi_modal_projector.linear_") :].split(".", 1)
            own[f"model.mm_projector.{2 * (int(index) - 1)}.{rest}"] = value
    save_file(vision, tower / "model.safetensors", metadata={"format": "pt"})
    (tower / "config.json").write_text(json.dumps(config["vision_config"], indent=1))
    shutil.copyfile(hf / "preprocessor_config.json", tower / "preprocessor_config.json")
    save_file(own, model / "model.safetensors", metadata={"format": "pt"})
    text = config["text_config"]
    mm = {
        "model_type": "llava_llama",
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": str(tower),
        "mm_hidden_size": config["vision_config"]["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "use_mm_proj": True,
    }
    (model / "config.json").write_text(json.dumps({**text, **mm}, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(hf / name, model / name)
    return model


def data(root: Path, records: int = RECORDS, epochs: int = EPOCHS, batch: int = BATCH) -> dict:
    """The same records for both trainers: LLaVA's JSON and mlx-vlm's messages JSONL."""
    pictures = root / "data" / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    llava, rows = [], []
    for i in range(records):
        name = f"pictures/{i}.png"
        make_image((400 + 37 * (i % 7), 300 + 53 * (i % 5)), 100 + i, root / "data" / name)
        question, answer = "What is in the image?", ANSWERS[i % len(ANSWERS)]
        follow, second = "What colours do you see?", "Mostly blue, green and a little red."
        llava.append(
            {
                "id": str(i),
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                    {"from": "human", "value": follow},
                    {"from": "gpt", "value": second},
                ],
            }
        )
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            {"role": "user", "content": [{"type": "text", "text": follow}]},
            {"role": "assistant", "content": [{"type": "text", "text": second}]},
        ]
        rows.append({"images": [name], "messages": messages})
    (root / "data" / "train.json").write_text(json.dumps(llava))
    (root / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"folder": root / "data", "llava": root / "data" / "train.json", "epochs": epochs, "batch": batch}


def timed(command: list, blas, timeout: float = 7200, **env) -> tuple:
    tic = time.perf_counter()
    environment = child_env(blas, **env)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=environment)
    return proc, time.perf_counter() - tic


def ours(mode: str, model: Path, corpus: dict, out: Path, blas) -> dict:
    argv = [
        sys.executable, "-m", "llava_mlx", "train", "--model_name_or_path", model, "--data_path", corpus["llava"],
        "--image_folder", corpus["folder"], "--output_dir", out, "--per_device_train_batch_size", corpus["batch"],
        "--num_train_epochs", corpus["epochs"], "--learning_rate", "1e-4", "--logging_steps", 1,
        "--save_strategy", "no", "--mm_use_im_patch_token", "False",
    ]  # fmt: skip
    env = {}
    if mode.startswith("onevision"):  # finetune_ov.sh's: the tower named by hub id, in the benchmark's cache
        argv += ["--version", "qwen_1_5", "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model",
                 "--model_max_length", 32768]  # fmt: skip
        env["HF_HOME"] = str(corpus["hf_home"])
    else:
        argv += ["--version", "v1", "--image_aspect_ratio", "pad", "--model_max_length", 2048,
                 "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2"]  # fmt: skip
    if mode != "full":
        argv += ["--lora_enable", "True", "--lora_r", RANK, "--lora_alpha", 2 * RANK, "--lora_dropout", "0.0"]
    if mode == "qlora":
        argv += ["--bits", 4]
    proc, _ = timed([str(a) for a in argv], blas, **env)
    found = re.search(r"\{\s*\"output_dir\".*\}", proc.stderr, re.S)
    if proc.returncode != 0 or found is None:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    summary = json.loads(found.group(0))
    return {
        "tokens_per_second": summary["tokens_per_second"],
        "peak_memory_gb": summary["peak_memory_gb"],
        "tokens": summary["tokens"],
    }


def mlx_vlm(mode: str, checkpoint: Path, corpus: dict, out: Path, blas) -> dict:
    argv = [
        sys.executable, "-m", "benchmarks.train_mlx_vlm", "--model", checkpoint, "--data", corpus["folder"],
        "--batch-size", corpus["batch"], "--epochs", corpus["epochs"], "--learning-rate", "1e-4",
        "--max-seq-length", 32768 if mode.startswith("onevision") else 2048,
        "--train-type", "full" if mode == "full" else "lora", "--lora-rank", RANK, "--lora-alpha", 2 * RANK,
        "--steps-per-report", 1, "--output-path", out, "--train-on-completions",
    ]  # fmt: skip
    if mode == "qlora":
        argv += ["--quantization-bits", 4, "--quantization-group-size", 32]  # as ours picks for these widths
    proc, _ = timed([str(a) for a in argv], blas)
    report = proc.stdout + proc.stderr
    # its running totals: positions processed (pictures and padding included) per second of training
    speeds = re.findall(r"\bprocessed_tokens_per_second=([0-9.,]+)", report)
    peaks = [float(x) for x in re.findall(r"\bpeak_memory=([0-9.]+)", report)]
    if proc.returncode != 0 or not speeds:
        return {"error": report.strip().splitlines()[-1:]}
    return {"tokens_per_second": float(speeds[-1].replace(",", "")), "peak_memory_gb": max(peaks) if peaks else None}


def breakdown(model: Path, corpus: dict, blas) -> dict:
    """Where one step of ours goes (train_steps.py, in its own process)."""
    argv = [sys.executable, "-m", "benchmarks.train_steps", str(model), str(corpus["llava"]), str(corpus["folder"])]
    proc, _ = timed(argv, blas)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": proc.stderr.strip().splitlines()[-1:]}


def run(a, root: Path) -> dict:
    hf = checkpoint_dir(root, "llava-1.5", a.shape, a.dtype)
    model = original_layout(hf, root / "train-checkpoints")
    corpus = data(root / "train-data")
    onevision = train_onevision.build(root / "train-onevision")
    onevision_corpus = {**data(root / "train-onevision", ONEVISION_RECORDS, 1, 1), "hf_home": onevision["hf_home"]}
    results = {}
    for mode in MODES:
        sources = (onevision["next"], onevision["hf"], onevision_corpus) if "onevision" in mode else (model, hf, corpus)
        for name, trainer, source in (("llava-mlx", ours, sources[0]), ("mlx-vlm", mlx_vlm, sources[1])):
            out = root / f"train-out-{name}-{mode.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            results[f"{name}|{mode}"] = trainer(mode, source, sources[-1], out, a.blas)
            print(f"train {mode} {name}: {results[f'{name}|{mode}']}", flush=True)
    return {
        "settings": {
            "shape": a.shape,
            "dtype": a.dtype,
            "records": RECORDS,
            "onevision_records": ONEVISION_RECORDS,
            "batch": BATCH,
            "epochs": EPOCHS,
            "rank": RANK,
        },
        "results": results,
        "breakdown": breakdown(model, corpus, a.blas),
    }


def section(record: dict) -> list:
    s, results = record["settings"], record["results"]
    L = [
        "## Training: trained tokens per second and peak memory\n",
        f"`{record.get('command', 'python bench.py --suite train')}` ({record.get('measured_at', '')}). "
        f"The {s['shape']} LLaVA-1.5 shape in {s['dtype']}, {s['records']} pictures with two-turn conversations, "
        f"batch {s['batch']}, {s['epochs']} epochs, LoRA rank {s['rank']} on every linear layer of the decoder; "
        "each trainer in its own process, its tokens the positions of the sequences it trained on, per second of "
        "its training loop, as it reports them (mlx-vlm's count includes the padding it adds). mlx-vlm trains "
        "the llava-hf layout of the same weights (`--train-on-completions`) through its own command, with the "
        "two fixes its LLaVA path needs to run (benchmarks/train_mlx_vlm.py). The OneVision row: a small "
        f"Qwen2 + SigLIP at so400m's geometry, anyres_max_9, {s.get('onevision_records')} pictures, one epoch, "
        "one picture a batch (mlx-vlm's llava_onevision cannot batch pictures of different tile counts: a "
        "broadcast error), "
        "LoRA by the LLaVA-NeXT code's rules here (finetune_ov.sh's `--mm_tunable_parts "
        "mm_mlp_adapter,mm_language_model`, peft's LoRA in the tower's attention too, as that code builds it), "
        "mlx-vlm's LoRA on the llava_onevision layout of the same weights (its own preprocessing: other "
        "sequence lengths).\n",
        "| mode | llava-mlx tokens/s | mlx-vlm tokens/s | ratio | llava-mlx peak GB | mlx-vlm peak GB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    targets, failures = [], []
    for mode in MODES:
        o, m = results.get(f"llava-mlx|{mode}", {}), results.get(f"mlx-vlm|{mode}", {})
        ratio = (
            o.get("tokens_per_second") / m["tokens_per_second"]
            if o.get("tokens_per_second") and m.get("tokens_per_second")
            else None
        )
        L.append(
            f"| {mode} | {fmt(o.get('tokens_per_second'), '.0f')} | {fmt(m.get('tokens_per_second'), '.0f')} | "
            f"{fmt(ratio, '.2f', '×')} | {fmt(o.get('peak_memory_gb'), '.3f')} | "
            f"{fmt(m.get('peak_memory_gb'), '.3f')} |"
        )
        memory_ok = (
            o.get("peak_memory_gb") is not None
            and m.get("peak_memory_gb") is not None
            and o["peak_memory_gb"] <= m["peak_memory_gb"]
        )
        row, line = target_row(
            f"{mode}: ≥ {TARGET}× mlx-vlm's tokens/s, no more peak memory",
            fmt(ratio, ".2f", "×"),
            None if ratio is None else (ratio >= TARGET and memory_ok),
            "mlx-vlm's failed" if m.get("error") else "peak memory " + ("≤" if memory_ok else ">") + " mlx-vlm's",
        )
        targets.append(row)
        failures += [
            f"{name} {mode} failed: `{r['error']}`" for name, r in (("llava-mlx", o), ("mlx-vlm", m)) if r.get("error")
        ]
    L += [""] + failures if failures else []
    b = record.get("breakdown", {})
    if b and not b.get("error"):
        total = sum(b.values())
        L += [
            "",
            "Where a LoRA step of ours goes (seconds, the mean of 4 steps after one):",
            "",
            "| part | s | share |",
            "| --- | --- | --- |",
        ]
        L += [f"| {k} | {v:.3f} | {v / total:.0%} |" for k, v in b.items()]
    L += ["", "| target | measured | met | |", "| --- | --- | --- | --- |", *targets, ""]
    L += machine_rows(record)
    return L
