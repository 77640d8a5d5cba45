"""`python -m llava_mlx train`: check, build, prepare, train, save.

Everything that can be wrong with the command (its arguments, the model, every record of the
data) is found before the output directory is touched; the result is moved into it whole at
the end, checkpoints every --save_steps (and at Ctrl-C or SIGTERM, of the last whole step),
one line of train_log.jsonl every --logging_steps, a progress bar, and a summary.
"""

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..checkpoint.preprocessing import image_settings
from ..checkpoint.validate import checkpoint_files
from ..distributed.group import world
from ..errors import LlavaError, warn
from ..model import IMAGE_PLACEHOLDER
from ..tokenizer import SentencePieceTokenizer, chunked_ids
from .arguments import Arguments, describe
from .build import build
from .chat_templates import chat_tokenizer
from .data import prepare
from .next_code import byte_level
from .save import OUTPUT_FILES, move_into, result_kind, scratch, whole_directory, write_result
from .templates import IMAGE, Tokenizer, template
from .trainer import Trainer

CHECKPOINT = "checkpoint-"
LOG = "train_log.jsonl"


def training_tokenizer(source: Path, args: Arguments, code: str = "original", decoder: str = "llama") -> Tokenizer:
    """The tokenizer train() loads (the original's: AutoTokenizer, use_fast=False, the slow
    SentencePiece one with the config's legacy rule; the LLaVA-NeXT code's: the fast one for
    Qwen2, Mistral and Mixtral, which it picks by the path's name, here by the decoder), its
    pad token set as train() sets it for the version."""
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.utils import logging as hf_logging

    conversation = template(args.model.version, code)
    checkpoint_files(source)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = AutoTokenizer.from_pretrained(source, config=PretrainedConfig())
    except (OSError, ValueError, TypeError) as e:
        raise LlavaError(f"cannot load the tokenizer of {source}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    fast = code == "next" and (decoder in ("qwen2", "mistral", "mixtral") or byte_level(source))
    slow = None if fast else SentencePieceTokenizer.from_checkpoint(source, hf, None)
    if slow is None:
        if not fast:
            warn(
                f"{source} has no tokenizer.model: the original trains with the slow SentencePiece tokenizer; "
                "tokenizer.json's is used"
            )
        encode, legacy = (lambda text: hf(text).input_ids), getattr(hf, "legacy", True)
    else:
        encode, legacy = slow.encode, slow.legacy
    version = args.model.version
    if version == "v0":
        if hf.pad_token is None:
            raise LlavaError(
                "--version v0 adds a [PAD] token to a tokenizer without one, which is not done here: use v1"
            )
        pad = hf.pad_token_id
    elif code == "original" or version == "v0.5" or hf.unk_token is not None:
        pad = hf.unk_token_id  # train(): tokenizer.pad_token = tokenizer.unk_token
    else:  # the LLaVA-NeXT code keeps the tokenizer's own pad; its collator takes 0 where there is none
        pad = hf.pad_token_id if hf.pad_token_id is not None else 0
    return Tokenizer(
        encode=encode,
        with_images=lambda text: chunked_ids(text, encode, hf.bos_token_id, {IMAGE: IMAGE_PLACEHOLDER}),
        pad_id=pad,
        legacy=legacy,
        max_length=args.training.model_max_length,
        chat=chat_tokenizer(conversation, hf, source) if conversation.style == "CHAT" else None,
    )


def checkpoints(directory: Path) -> list:
    found = [p for p in directory.glob(f"{CHECKPOINT}*") if p.is_dir() and p.name[len(CHECKPOINT) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT) :]))


def resume_point(args: Arguments) -> Optional[Path]:
    """The checkpoint to go on from: --resume_from_checkpoint, else the newest in --output_dir (as
    train() does); a finished result there is only replaced with --overwrite_output_dir."""
    out, t = Path(args.training.output_dir), args.training
    if t.resume_from_checkpoint not in (None, "False", "false"):
        if t.resume_from_checkpoint in ("True", "true"):
            found = checkpoints(out) if out.is_dir() else []
            if not found:
                raise LlavaError(f"--resume_from_checkpoint True: no {CHECKPOINT}N in {out}")
            return found[-1]
        path = Path(t.resume_from_checkpoint)
        if not (path / "trainer_state.json").exists():
            raise LlavaError(f"--resume_from_checkpoint {path} is not a checkpoint of this trainer")
        return path
    if not out.exists():
        return None
    if not out.is_dir():
        raise LlavaError(f"--output_dir {out} is a file")
    found = checkpoints(out)
    if found:
        return found[-1]
    if any((out / name).exists() for name in OUTPUT_FILES) and not t.overwrite_output_dir:
        raise LlavaError(f"{out} already holds a trained result: pass --overwrite_output_dir True to replace it")
    return None


class Reporter:
    """The progress bar, train_log.jsonl and the summary (rank 0 only)."""

    def __init__(self, out: Path, trainer: Trainer, quiet: bool):
        self.out, self.trainer, self.quiet = out, trainer, quiet
        self.window, self.positions, self.seconds = [], 0, 0.0
        self.total_positions, self.started = 0, time.perf_counter()
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(
                total=trainer.plan.steps,
                initial=trainer.state.step,
                desc="training",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def batch(self, positions: int, seconds: float):
        self.positions += positions
        self.total_positions += positions
        self.seconds += seconds

    def step(self, record: dict, eval_loss: Optional[float]):
        t = self.trainer.args.training
        self.window.append(record)
        peak = mx.get_peak_memory() / 1e9
        speed = self.positions / self.seconds if self.seconds else 0.0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['learning_rate']:.2e}",
                tok_s=f"{speed:.0f}",
                peak_gb=f"{peak:.2f}",
            )
        due = record["step"] % max(1, int(t.logging_steps)) == 0 or record["step"] == self.trainer.plan.steps
        if (due or eval_loss is not None) and not self.quiet:
            line = {
                "step": record["step"],
                "epoch": round(record["epoch"], 4),
                "loss": sum(r["loss"] for r in self.window) / len(self.window),
                "learning_rate": record["learning_rate"],
                "grad_norm": record["grad_norm"],
                "tokens": self.positions,
                "tokens_per_second": speed,
                "peak_memory_gb": peak,
            }
            if eval_loss is not None:
                line["eval_loss"] = eval_loss
            with open(self.out / LOG, "a", encoding="utf-8") as log:
                log.write(json.dumps(line) + "\n")
            self.trainer.state.log.append(line)
            self.window, self.positions, self.seconds = [], 0, 0.0

    def close(self):
        if self.bar is not None:
            self.bar.close()


def save_checkpoint(trainer: Trainer, out: Path, kind: str, base: str):
    t = trainer.args.training
    with whole_directory(out / f"{CHECKPOINT}{trainer.state.step}") as partial:
        write_result(partial, trainer.trainable, kind, base)
        trainer.save_state(partial)
    if t.save_total_limit:
        for old in checkpoints(out)[: -t.save_total_limit]:
            shutil.rmtree(old)


def run(args: Arguments) -> dict:
    """Train as the arguments say; the summary."""
    t, d = args.training, args.data
    group = world()
    main = group is None or group.rank() == 0
    out = Path(t.output_dir)
    resume = resume_point(args)
    trainable = build(args)
    code, config = trainable.code, trainable.model.config
    conversation = template(args.model.version, code)
    tokenizer = training_tokenizer(trainable.source, args, code, config.text_config["model_type"])
    settings = image_settings(trainable.source, trainable.tower_dir, config)
    folder = Path(d.image_folder) if d.image_folder else None
    positions = config.image_token_count
    examples, masked = prepare(Path(d.data_path), folder, conversation, tokenizer, positions, code)
    if masked:
        warn(
            f"{masked} of {len(examples)} records are masked whole by the original's tokenization-mismatch rule "
            "(its 'WARNING: tokenization mismatch'): they train nothing, as in the original"
        )
    evaluation = (
        prepare(Path(d.eval_data_path), folder, conversation, tokenizer, positions, code)[0]
        if d.eval_data_path
        else None
    )
    trainer = Trainer(trainable, args, examples, settings, tokenizer.pad_id, group, evaluation)
    if resume is not None:
        trainer.restore(resume)
    kind, base = result_kind(trainable.parts), args.model.model_name_or_path
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_args.json").write_text(json.dumps(describe(args), indent=1, default=str))
    reporter = Reporter(out, trainer, quiet=not main)
    eval_every = int(t.eval_steps or t.logging_steps) if t.evaluation_strategy == "steps" else 0

    def on_step(record):
        eval_loss = trainer.evaluate() if eval_every and record["step"] % eval_every == 0 else None
        reporter.step(record, eval_loss)
        if main and t.save_strategy == "steps" and record["step"] % max(1, int(t.save_steps)) == 0:
            save_checkpoint(trainer, out, kind, base)

    started = time.perf_counter()
    try:
        trainer.run(on_step, reporter.batch)
    except KeyboardInterrupt:
        reporter.close()
        if main and trainer.state.step and not (out / f"{CHECKPOINT}{trainer.state.step}").exists():
            save_checkpoint(trainer, out, kind, base)
            print(
                f"saved {out / f'{CHECKPOINT}{trainer.state.step}'}: go on with --resume_from_checkpoint True",
                file=sys.stderr,
            )
        raise
    reporter.close()
    eval_loss = trainer.evaluate()
    if main:
        with scratch(out, "result") as partial:
            write_result(partial, trainable, kind, base)
            move_into(partial, out)
    elapsed = time.perf_counter() - started
    return {
        "output_dir": str(out),
        "saved": kind,
        "steps": trainer.state.step,
        "epochs": trainer.plan.epochs,
        "records": len(examples),
        "masked_by_tokenization_mismatch": masked,
        "last_loss": (trainer.state.log or [{}])[-1].get("loss"),
        "eval_loss": eval_loss,
        "tokens": reporter.total_positions,
        "seconds": elapsed,
        "tokens_per_second": reporter.total_positions / elapsed if elapsed else 0.0,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
