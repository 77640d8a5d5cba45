"""The training command as a user meets it: its flags, its bad input (one line, nothing written),
checkpoints, Ctrl-C and SIGTERM, resuming, evaluation, two ranks under mlx.launch, QLoRA, and
what it saves running through generate.py, convert.py and the server."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llava_mlx import generate, load

from conftest import ROOT
from helpers import environment, launch_two
from reference.training import train_log

TRAIN = str(ROOT / "train.py")


def lora_argv(training, out, *extra, model=None) -> list:
    return [
        "--model_name_or_path", model or training["vicuna"], "--vision_tower", training["tower"],
        "--pretrain_mm_mlp_adapter", training["projector"], "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2", "--mm_use_im_patch_token", "False", "--version", "v1",
        "--data_path", training["train.json"], "--image_folder", training["data"], "--image_aspect_ratio", "pad",
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
        "--model_max_length", "700", "--per_device_train_batch_size", "2", "--num_train_epochs", "2",
        "--learning_rate", "2e-3", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03",
        "--logging_steps", "1", "--save_strategy", "no", "--shuffle", "False", "--output_dir", out, *extra,
    ]  # fmt: skip


def run_here(argv) -> dict:
    from llava_mlx.train.arguments import parse
    from llava_mlx.train.run import run

    return run(parse([str(a) for a in argv]))


def cli(*argv, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, TRAIN, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env or environment(),
    )


@pytest.fixture(scope="session")
def lora_run(training, tmp_path_factory):
    """One LoRA run of the whole plan (4 steps), its output and log: what the others compare with."""
    out = tmp_path_factory.mktemp("lora-run") / "out"
    summary = run_here(lora_argv(training, out))
    return out, train_log(out), summary


def test_help_lists_every_flag_with_its_default():
    result = cli("--help")
    assert result.returncode == 0
    options = " ".join(result.stdout.split())
    options = options[options.index("options:") :]
    defaults = {
        "--lora_r": "64",
        "--model_max_length": "512",
        "--version": "v0",
        "--learning_rate": "5e-05",
        "--mm_use_im_patch_token": "True",
        "--image_aspect_ratio": "square",
        "--shuffle": "True",
    }
    for flag, default in defaults.items():
        after = options[options.index(f"{flag} ") :]
        assert re.search(r"\(default: ([^)]*)\)", after).group(1) == default, flag
    assert "--deepspeed" in options and "--lora-r" in options  # transformers' other fields; dashes too
    module = subprocess.run(
        [sys.executable, "-m", "llava_mlx", "train", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment(),
    )
    assert module.stdout == result.stdout


BAD = {
    "no data": (["--output_dir", "{out}"], "--data_path is required"),
    "unknown version": (["--version", "v9"], "--version 'v9' is not a conversation template"),
    "other optimizer": (["--optim", "adafactor"], "--optim adafactor: this trainer runs AdamW"),
    "bits without LoRA": (["--lora_enable", "False", "--bits", "4"], "--bits 4 quantizes the base for QLoRA"),
    "no picture": (["--data_path", "{bad}"], "record 'bad': its picture .* does not exist"),
    "a language model without a tower": (["--vision_tower", "None"], "pass --vision_tower"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_nothing_is_written(case, training, tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "id": "bad",
                    "image": "nowhere.png",
                    "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}],
                }
            ]
        )
    )
    extra, message = BAD[case]
    extra = [e.format(out=out, bad=bad) for e in extra]
    argv = lora_argv(training, out) + extra
    if case == "no data":
        argv = [a for i, a in enumerate(argv) if a != "--data_path" and (i == 0 or argv[i - 1] != "--data_path")]
    result = cli(*argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_ignored_flags_warn_once_each(training, tmp_path):
    from llava_mlx.train.arguments import parse

    extra = ["--deepspeed", "zero3.json", "--tf32", "True", "--report_to", "wandb", "--dataloader-num-workers", "4"]
    argv = lora_argv(training, tmp_path / "out", *extra, "--gradient_checkpointing", "True")
    code = "import sys; from llava_mlx.train.arguments import parse; parse(sys.argv[1:])"
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=ROOT, env=environment()
    )
    warned = sorted(line.split(":")[1].strip() for line in result.stderr.strip().splitlines())
    assert warned == ["--dataloader_num_workers", "--deepspeed", "--report_to", "--tf32"]
    assert parse([str(a) for a in argv]).training.gradient_checkpointing  # built: no warning


def test_a_finished_result_is_not_overwritten(lora_run, training):
    out = lora_run[0]
    result = cli(*lora_argv(training, out))
    assert (
        result.returncode == 1
        and "already holds a trained result" in result.stderr
        and "--overwrite_output_dir" in result.stderr
    )


def test_checkpoints_and_resuming_give_the_same_run(lora_run, training, tmp_path):
    """A checkpoint every step (the last two kept), each loadable; going on from checkpoint 2
    ends where the uninterrupted run ends."""
    out = tmp_path / "out"
    run_here(
        lora_argv(
            training,
            out,
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--save_total_limit",
            "2",
            "--max_steps",
            "2",
        )
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(out.glob(".*partial*"))
    model, processor = load(str(out / "checkpoint-2"), model_base=str(training["vicuna"]))
    assert generate(model, processor, "Hi", max_tokens=2).text is not None
    (out / "checkpoint-1").rename(tmp_path / "away")  # only checkpoint-2 is found
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json"):
        (out / name).unlink()  # what the 2-step run finished with
    run_here(lora_argv(training, out))  # the newest checkpoint in --output_dir, as train() resumes
    full = [line["loss"] for line in lora_run[1]]
    resumed = [line["loss"] for line in train_log(out)]
    assert resumed[:2] == pytest.approx(full[:2], rel=1e-6) and resumed[2:] == pytest.approx(full[2:], rel=1e-5)
    theirs, ours = load_file(lora_run[0] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(np.allclose(theirs[k], ours[k], atol=1e-6) for k in theirs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_last_whole_step(signum, training, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, TRAIN, *map(str, lora_argv(training, out, "--num_train_epochs", "50"))]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=environment()
    )
    deadline = time.monotonic() + 300
    while not ((out / "train_log.jsonl").exists() and (out / "train_log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    steps = len(train_log(out))
    saved = out / f"checkpoint-{steps}"
    assert saved.is_dir() and (saved / "adapter_model.safetensors").exists() and (saved / "trainer_state.json").exists()
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == steps
    assert f"saved {saved}" in err and err.strip().splitlines()[-1] in ("terminated (SIGTERM)", "interrupted")
    assert not (out / "adapter_config.json").exists() and not list(out.glob(".*partial*"))


def test_eval_data_gives_an_eval_loss(training, tmp_path):
    out = tmp_path / "out"
    evaluation = ["--eval_data_path", training["train.json"], "--evaluation_strategy", "steps", "--eval_steps", "2"]
    summary = run_here(lora_argv(training, out, *evaluation, "--max_steps", "2"))
    log = train_log(out)
    assert "eval_loss" in log[1] and "eval_loss" not in log[0]
    assert summary["eval_loss"] == pytest.approx(log[1]["eval_loss"], rel=1e-6) and np.isfinite(summary["eval_loss"])


def test_two_ranks_equal_one_process_with_the_whole_batch(lora_run, training, tmp_path):
    out = tmp_path / "ranks"
    result = launch_two(TRAIN, *map(str, lora_argv(training, out, "--per_device_train_batch_size", "1")), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = [line["loss"] for line in lora_run[1]]
    ranks = [line["loss"] for line in train_log(out)]
    assert ranks == pytest.approx(alone, rel=1e-5)
    theirs, ours = load_file(lora_run[0] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(np.allclose(theirs[k], ours[k], atol=1e-5) for k in theirs)


def test_qlora_against_lora_over_the_dequantized_base(training, tmp_path):
    """QLoRA (4-bit base) and LoRA over that same base dequantized to float: the losses differ
    only by how the quantized matrix products round (bounded at 1e-3 of the loss here)."""
    dequantized = tmp_path / "vicuna-dequantized"
    shutil.copytree(training["vicuna"], dequantized)
    weights = load_file(dequantized / "model.safetensors")
    for name, w in weights.items():
        if w.ndim == 2 and "embed_tokens" not in name:
            q = mx.quantize(mx.array(w), group_size=64, bits=4)
            weights[name] = np.array(mx.dequantize(*q, group_size=64, bits=4))
    save_file(weights, dequantized / "model.safetensors", metadata={"format": "pt"})
    qlora = run_here(lora_argv(training, tmp_path / "qlora", "--bits", "4", "--max_steps", "3"))
    lora = run_here(lora_argv(training, tmp_path / "lora", "--max_steps", "3", model=dequantized))
    q, f = (
        [line["loss"] for line in train_log(tmp_path / "qlora")],
        [line["loss"] for line in train_log(tmp_path / "lora")],
    )
    worst = max(abs(a - b) / abs(b) for a, b in zip(q, f))
    print(f"\nQLoRA vs LoRA over the dequantized base: worst relative loss difference {worst:.2e}", end=" ")
    assert worst <= 1e-3  # Adam's first update, ±lr where a gradient is near 0, amplifies the rounding
    assert qlora["peak_memory_gb"] > 0 and lora["steps"] == qlora["steps"] == 3


def test_what_was_saved_runs_everywhere(lora_run, training, tmp_path, images):
    """generate.py with --model-base, convert.py merging and quantizing it, the server on that."""
    from serving import ask, start_server, user

    out = lora_run[0]
    env = environment()
    base = ["--model", str(out), "--model-base", str(training["vicuna"])]
    question = ["--image", str(images["wide"]), "--prompt", "What is in the image?", "--max-tokens", "8"]
    generated = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *base, *question],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert generated.returncode == 0, generated.stderr
    model, processor = load(str(out), model_base=str(training["vicuna"]))
    expected = generate(model, processor, "What is in the image?", [str(images["wide"])], max_tokens=8)
    assert generated.stdout.strip() == expected.text.strip()
    merged = tmp_path / "merged-4bit"
    converted = subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), *base, "--out", str(merged), "-q", "--q-group-size", "32"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert converted.returncode == 0, converted.stderr
    server = start_server(merged, tmp_path / "server.log")
    try:
        assert ask(server, [user("What is in the image?", images["wide"])]).choices[0].message.content is not None
    finally:
        assert server.stop() == 0


def test_the_other_starting_points(training, checkpoints, tmp_path):
    """The projector alone from a LLaVA checkpoint (its own settings kept; a flag contradicting
    one refused), a fresh projector over a plain language model, bfloat16 compute."""
    llava = checkpoints["orig-v1.5-vicuna"]
    common = ["--data_path", training["captions.json"], "--image_folder", training["data"], "--version", "plain",
              "--tune_mm_mlp_adapter", "True", "--max_steps", "1", "--save_strategy", "no", "--model_max_length", "700",
              "--mm_use_im_patch_token", "False", "--shuffle", "False"]  # fmt: skip
    summary = run_here(["--model_name_or_path", llava, "--output_dir", tmp_path / "from-llava", *common])
    assert summary["saved"] == "projector" and summary["steps"] == 1
    config = json.loads((tmp_path / "from-llava" / "config.json").read_text())
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    model, processor = load(str(tmp_path / "from-llava"), model_base=str(llava))
    assert generate(model, processor, "Hi", max_tokens=2).text is not None
    contradicting = cli(
        "--model_name_or_path", llava, "--output_dir", tmp_path / "x", "--mm_projector_type", "linear", *common
    )
    assert contradicting.returncode == 1
    assert contradicting.stderr.strip().splitlines() == [
        f"error: --mm_projector_type linear but {llava} was trained with mlp2x_gelu"
    ]
    fresh = [
        "--model_name_or_path",
        training["vicuna"],
        "--vision_tower",
        training["tower"],
        "--mm_projector_type",
        "mlp2x_gelu",
    ]
    summary = run_here([*fresh, "--output_dir", tmp_path / "fresh", "--bf16", "True", *common])
    assert summary["saved"] == "projector" and np.isfinite(summary["last_loss"])
    model, processor = load(str(tmp_path / "fresh"), model_base=str(training["vicuna"]))
    assert generate(model, processor, "Hi", max_tokens=2).text is not None
