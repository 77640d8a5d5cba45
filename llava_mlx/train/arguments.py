"""The original train.py's arguments: its ModelArguments, DataArguments and TrainingArguments
(transformers' TrainingArguments and its own fields), same names, same defaults, so that
scripts/v1_5/pretrain.sh, finetune.sh and finetune_lora.sh run with `deepspeed
llava/train/train_mem.py` replaced by `python -m llava_mlx train`; and the LLaVA-NeXT code's
(lmms-lab's finetune_ov.sh): its own fields (code="next"), its other fields' tables, its
defaults, settled by `Arguments.for_code` once the checkpoint says whose rules apply.

Names take underscores or dashes; booleans take True/False (or nothing: true). The fields of
transformers' TrainingArguments that change nothing on one Mac (deepspeed, tf32, dataloader
workers, report_to, ...) are accepted with one `warning:` line each; values this trainer does
not build (another optimizer, another scheduler, LoRA biases) are one clear error.
"""

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import List, Optional

from ..errors import LlavaError, warn


def flag(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelArguments:
    model_name_or_path: str = flag(
        "facebook/opt-125m", "the model to train: a LLaVA checkpoint, or a language model with --vision_tower"
    )
    version: str = flag("v0", "the conversation template (conversation.py): v1, plain, llava_llama_2, mpt, ...")
    freeze_backbone: bool = flag(False, "freeze the language model's body (the head and the projector still train)")
    tune_mm_mlp_adapter: bool = flag(False, "train the projector alone (pretraining, stage 1)")
    vision_tower: Optional[str] = flag(None, "the CLIP tower (path or hub id), for a language model that has none")
    mm_vision_select_layer: int = flag(-1, "the tower's layer that feeds the projector")
    pretrain_mm_mlp_adapter: Optional[str] = flag(
        None, "a pretraining stage's mm_projector.bin to start the projector from"
    )
    mm_projector_type: str = flag("linear", "the projector: linear or mlp<N>x_gelu")
    mm_use_im_start_end: bool = flag(False, "wrap the picture in <im_start> / <im_end> tokens")
    mm_use_im_patch_token: bool = flag(True, "add an <im_patch> token (no prompt uses it; the scripts pass False)")
    mm_patch_merge_type: str = flag("flat", "how the picture's features are merged (flat)")
    mm_vision_select_feature: str = flag("patch", "patch (drop the class token) or cls_patch")

    # the LLaVA-NeXT code's (lmms-lab's OneVision and LLaVA-Video scripts)
    mm_tunable_parts: Optional[str] = flag(
        None, "LLaVA-NeXT: what trains, of mm_vision_tower, mm_mlp_adapter, mm_language_model", code="next"
    )
    unfreeze_mm_vision_tower: bool = flag(False, "LLaVA-NeXT: train the vision tower too", code="next")
    mm_newline_position: str = flag(
        "grid", "LLaVA-NeXT: where video newlines go (grid, frame, one_token, no_token)", code="next"
    )
    mm_spatial_pool_mode: str = flag("bilinear", "LLaVA-NeXT: how video frames are pooled", code="next")
    mm_spatial_pool_stride: Optional[int] = flag(None, "LLaVA-NeXT: the video pooling's stride", code="next")


@dataclass
class DataArguments:
    data_path: Optional[str] = flag(None, "the training data: LLaVA's JSON, or a JSONL of OpenAI messages")
    lazy_preprocess: bool = flag(False, "no effect: records are prepared before training and pictures read per step")
    is_multimodal: bool = flag(False, "no effect: set from the model, as train() does")
    image_folder: Optional[str] = flag(None, "the folder the records' image paths are under")
    image_aspect_ratio: str = flag("square", "pad (LLaVA-1.5: padded to a square of the mean colour) or square")
    eval_data_path: Optional[str] = flag(None, "data whose mean loss is reported at the end (and every --eval_steps)")
    image_grid_pinpoints: Optional[str] = flag(
        None, "LLaVA-NeXT: the anyres grid, '(1x1),...,(6x6)' or a list", code="next"
    )


@dataclass
class TrainingArguments:
    output_dir: Optional[str] = flag(None, "where the result, its checkpoints and train_log.jsonl are written")
    overwrite_output_dir: bool = flag(False, "write over a finished result already in --output_dir")
    model_max_length: int = flag(512, "the longest sequence, the picture's positions included: longer ones are cut")
    per_device_train_batch_size: int = flag(8, "records per batch (per rank under mlx.launch)")
    per_device_eval_batch_size: int = flag(8, "records per evaluation batch")
    gradient_accumulation_steps: int = flag(1, "batches per optimizer step")
    num_train_epochs: float = flag(3.0, "passes over the data")
    max_steps: int = flag(-1, "optimizer steps in all, when > 0 (instead of num_train_epochs)")
    learning_rate: float = flag(5e-5, "the peak learning rate")
    mm_projector_lr: Optional[float] = flag(None, "the projector's own learning rate")
    mm_vision_tower_lr: Optional[float] = flag(None, "LLaVA-NeXT: the vision tower's own learning rate", code="next")
    weight_decay: float = flag(0.0, "AdamW's decoupled weight decay (never on biases and norms)")
    adam_beta1: float = flag(0.9, "AdamW's beta1")
    adam_beta2: float = flag(0.999, "AdamW's beta2")
    adam_epsilon: float = flag(1e-8, "AdamW's epsilon")
    max_grad_norm: float = flag(1.0, "clip the gradients' global norm to this (0: no clipping)")
    lr_scheduler_type: str = flag("linear", "cosine, linear, constant or constant_with_warmup")
    warmup_ratio: float = flag(0.0, "warmup as a share of the steps")
    warmup_steps: int = flag(0, "warmup steps (over warmup_ratio when > 0)")
    optim: str = flag("adamw_torch", "the optimizer: adamw_torch (AdamW with bias correction)")
    seed: int = flag(42, "the random seed: LoRA's and the projector's initial weights, dropout, the records' order")
    shuffle: bool = flag(True, "take the records in a seeded random order (False: in file order)")
    group_by_modality_length: bool = flag(False, "batch picture records and text-only ones apart, as LLaVATrainer")
    bf16: bool = flag(False, "compute in bfloat16 (the trained weights stay float32)")
    fp16: bool = flag(False, "compute in float16 (the trained weights stay float32)")
    bits: int = flag(16, "4 or 8: QLoRA, LoRA over a base quantized to this many bits")
    double_quant: bool = flag(True, "no effect: bitsandbytes' double quantization (MLX's quantization is used)")
    quant_type: str = flag("nf4", "no effect: bitsandbytes' type (MLX's affine quantization is used)")
    lora_enable: bool = flag(False, "train LoRA adapters on every linear layer of the language model")
    lora_r: int = flag(64, "LoRA's rank")
    lora_alpha: int = flag(16, "LoRA's alpha (the update is scaled by alpha / r)")
    lora_dropout: float = flag(0.05, "dropout on LoRA's input")
    lora_weight_path: str = flag("", "no effect in the original either")
    lora_bias: str = flag("none", "none (LoRA trains no bias)")
    resume_adapter: Optional[str] = flag(None, "start LoRA from this adapter (peft's or this project's)")
    freeze_mm_mlp_adapter: bool = flag(False, "keep the projector frozen")
    attn_implementation: str = flag("flash_attention_2", "LLaVA-NeXT: no effect (MLX's attention)", code="next")
    gradient_checkpointing: bool = flag(False, "recompute each decoder layer in the backward pass (less memory)")
    logging_steps: float = flag(500, "optimizer steps between two lines of train_log.jsonl")
    evaluation_strategy: str = flag("no", "no, or steps (evaluate every --eval_steps)")
    eval_steps: Optional[float] = flag(None, "optimizer steps between evaluations (default: logging_steps)")
    save_strategy: str = flag("steps", "steps (a checkpoint every --save_steps) or no")
    save_steps: float = flag(500, "optimizer steps between checkpoints")
    save_total_limit: Optional[int] = flag(None, "checkpoints kept (the oldest removed)")
    resume_from_checkpoint: Optional[str] = flag(
        None, "go on from this checkpoint (the newest in --output_dir is found alone)"
    )

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"

    def warmup(self, steps: int) -> int:
        """transformers' get_warmup_steps."""
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(steps * self.warmup_ratio)


# transformers' other TrainingArguments fields: accepted, and said to change nothing here.
NO_EFFECT = {
    "deepspeed": "DeepSpeed splits a model over GPUs; one Mac holds it whole (mlx.launch spreads the batch)",
    "tf32": "TensorFloat-32 is an NVIDIA format",
    "dataloader_num_workers": "pictures are read in the training process",
    "report_to": "losses go to train_log.jsonl and the progress bar",
    "use_cpu": "MLX runs on the Mac's GPU, or its CPU where it has none",
    "torch_compile": "no torch here",
    "local_rank": "mlx.launch gives each process its rank",
    "lazy_preprocess": "records are checked and tokenized before training, pictures read per step",
    "is_multimodal": "set from the model",
    "mpt_attn_impl": "MPT is not trained here",
    "cache_dir": "the Hugging Face cache is used as it is",
    "remove_unused_columns": "no effect",
    "do_train": "this command trains",
    "double_quant": "MLX's quantization is used",
    "quant_type": "MLX's affine quantization is used",
    "lora_weight_path": "no effect in the original either",
    "dataloader_pin_memory": "MLX's memory is unified",
}
# Names of transformers 4.37's TrainingArguments that no script here needs: taken, and warned about.
OTHER_TRANSFORMERS_FIELDS = (
    "do_eval do_predict prediction_loss_only per_gpu_train_batch_size per_gpu_eval_batch_size "
    "eval_accumulation_steps eval_delay lr_scheduler_kwargs log_level log_level_replica log_on_each_node "
    "logging_dir logging_strategy logging_first_step logging_nan_inf_filter save_safetensors save_on_each_node "
    "save_only_model no_cuda use_mps_device data_seed jit_mode_eval use_ipex fp16_opt_level "
    "half_precision_backend bf16_full_eval fp16_full_eval ddp_backend tpu_num_cores tpu_metrics_debug debug "
    "dataloader_drop_last past_index run_name disable_tqdm label_names load_best_model_at_end "
    "metric_for_best_model greater_is_better ignore_data_skip fsdp fsdp_min_num_params fsdp_config "
    "fsdp_transformer_layer_cls_to_wrap label_smoothing_factor optim_args adafactor group_by_length "
    "length_column_name ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers "
    "dataloader_persistent_workers skip_memory_metrics use_legacy_prediction_loop push_to_hub hub_model_id "
    "hub_strategy hub_token hub_private_repo hub_always_push gradient_checkpointing_kwargs "
    "include_inputs_for_metrics fp16_backend push_to_hub_model_id push_to_hub_organization push_to_hub_token "
    "mp_parameters auto_find_batch_size full_determinism torchdynamo ray_scope ddp_timeout "
    "torch_compile_backend torch_compile_mode dispatch_batches split_batches include_tokens_per_second "
    "include_num_input_tokens_seen neftune_noise_alpha"
).split()
# The LLaVA-NeXT code's other fields: taken at their defaults (their value says what no script of
# its images' fine-tuning changes), a warning where a value changes nothing here, refused otherwise.
NO_EFFECT_NEXT = {  # name: the code's default; another value changes nothing here (a warning says so)
    "model_class_name": None,
    "vision_tower_pretrained": None,
    "delay_load": True,
    "verbose_logging": False,
    "video_folder": None,
    "video_fps": 1,
    "frames_upbound": 0,
    "add_time_instruction": False,
    "force_sample": False,
    "faster_token_stride": 10,
    "image_crop_resolution": None,
    "image_split_resolution": None,
    "mm_mask_drop_mode": "fixed",
    "mm_mask_drop_skip_percentage": 0.0,
    "mm_mask_drop_ratio": 0.25,
    "mm_mask_drop_ratio_upper": None,
    "mm_mask_drop_ratio_lower": None,
    "pos_skipping_range": 4096,
    "s2_scales": "336,672,1008",
    "zo_eps": 1e-3,
    "zo_num_directions": 1,
}
NOT_BUILT_NEXT = {  # name: the code's default, the only value taken
    "tune_mm_vision_resampler": False,
    "freeze_mm_vision_resampler": False,
    "unfreeze_language_model": False,
    "mm_resampler_type": None,
    "mm_spatial_pool_out_channels": None,
    "mm_perceiver_depth": 3,
    "mm_perceiver_latents": 32,
    "mm_perceiver_ff_mult": 4,
    "mm_perceiver_pretrained": None,
    "mm_qformer_depth": 3,
    "mm_qformer_latents": 32,
    "mm_qformer_pretrained": None,
    "rope_scaling_factor": None,
    "rope_scaling_type": None,
    "s2": False,
    "use_pos_skipping": False,
    "add_faster_video": False,
    "early_mix_text": False,
    "group_by_varlen": False,
    "group_by_modality_length_auto": False,
    "trainer_mode": "regular",
}
NEXT_OTHER = {
    **{k: (v, "warn") for k, v in NO_EFFECT_NEXT.items()},
    **{k: (v, "refuse") for k, v in NOT_BUILT_NEXT.items()},
}
# Defaults the LLaVA-NeXT code's fields have where the original's differ.
NEXT_DEFAULTS = {"model_max_length": 4096, "gradient_checkpointing": True}
GROUPS = (ModelArguments, DataArguments, TrainingArguments)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")  # the same AdamW, as far as the numbers go
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


def boolean(text: str) -> bool:
    value = str(text).lower()
    if value in ("true", "t", "yes", "y", "1"):
        return True
    if value in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not True or False")


def optional(kind):
    def convert(text: str):
        return None if text in ("None", "none", "") else kind(text)

    convert.__name__ = kind.__name__
    return convert


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llava_mlx train",
        usage="%(prog)s --model_name_or_path M [--vision_tower T] --data_path D --output_dir O [options]",
        description="Fine-tune LLaVA on a Mac, as the original llava/train/train.py does (its arguments, "
        "its defaults). Underscores or dashes; booleans take True or False.",
        argument_default=argparse.SUPPRESS,
    )
    for group in GROUPS:
        section = p.add_argument_group(group.__name__)
        for f in fields(group):
            names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            kind = f.type
            help = f"{f.metadata['help']} (default: {f.default})"
            if kind is bool:
                section.add_argument(*names, dest=f.name, type=boolean, nargs="?", const=True, help=help)
            else:
                base = getattr(kind, "__args__", (kind,))[0]
                convert = optional(base) if f.default is None else base
                section.add_argument(*names, dest=f.name, type=convert, help=help)
    next_other = p.add_argument_group("the LLaVA-NeXT code's other fields", "at their defaults only (or no effect)")
    for name, (default, _) in NEXT_OTHER.items():
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        next_other.add_argument(*names, dest=name, nargs="?", const="True", help=f"(default: {default})")
    other = p.add_argument_group("accepted, no effect here", "transformers' other TrainingArguments")
    for name in [*sorted(set(NO_EFFECT) - {f.name for g in GROUPS for f in fields(g)}), *OTHER_TRANSFORMERS_FIELDS]:
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        other.add_argument(*names, dest=name, nargs="*", help=NO_EFFECT.get(name, "no effect here"))
    return p


@dataclass
class Arguments:
    model: ModelArguments
    data: DataArguments
    training: TrainingArguments
    given: set  # the names the command line set
    next_other: dict  # the LLaVA-NeXT code's other fields the command line set, as text

    def for_code(self, code: str):
        """Settle the arguments for the code whose rules apply ('original' or 'next'): a field only
        the other code has, given, is refused; the LLaVA-NeXT code's own defaults applied."""
        only_next = [f.name for g in GROUPS for f in fields(g) if f.metadata.get("code") == "next"]
        m, d = self.model, self.data
        if code == "original":
            given = sorted({*self.given & set(only_next), *self.next_other})
            if given:
                raise LlavaError(
                    f"--{given[0]} is the LLaVA-NeXT code's: this checkpoint trains by the original train.py's rules"
                )
            if d.image_aspect_ratio not in ("pad", "square"):
                raise LlavaError(
                    f"--image_aspect_ratio {d.image_aspect_ratio}: the original train.py takes pad or square"
                )
            if m.mm_patch_merge_type != "flat":
                raise LlavaError(
                    f"--mm_patch_merge_type {m.mm_patch_merge_type}: the original train.py trains flat merges"
                )
            return
        if not re.fullmatch(r"pad|square|anyres|anyres_max_\d+", d.image_aspect_ratio):
            raise LlavaError(
                f"--image_aspect_ratio {d.image_aspect_ratio}: pad, square, anyres or anyres_max_N are trained here"
            )
        if m.mm_newline_position not in ("grid", "frame", "one_token", "no_token"):
            raise LlavaError(f"--mm_newline_position {m.mm_newline_position}: grid, frame, one_token or no_token")
        if m.mm_spatial_pool_mode not in ("bilinear", "average", "max"):
            raise LlavaError(f"--mm_spatial_pool_mode {m.mm_spatial_pool_mode}: bilinear, average or max")
        for name, default in NEXT_DEFAULTS.items():
            if name not in self.given:
                setattr(self.training, name, default)
        for name, text in self.next_other.items():
            default, effect = NEXT_OTHER[name]
            if text == str(default) or (text in ("true", "false") and text.title() == str(default)):
                continue
            if effect == "refuse":
                raise LlavaError(f"--{name} {text}: not built here (the LLaVA-NeXT code's default, {default}, is)")
            warn(f"--{name}: accepted, no effect on this trainer's pictures-and-text training")


def parse(argv: List[str]) -> Arguments:
    """The three argument groups from a command line (argparse's errors exit with one usage line)."""
    namespace = vars(parser().parse_args(argv))
    built = []
    for group in GROUPS:
        values = {f.name: namespace[f.name] for f in fields(group) if f.name in namespace}
        built.append(group(**values))
    other = {name: str(namespace[name]) for name in NEXT_OTHER if name in namespace}
    args = Arguments(*built, given=set(namespace) - set(other), next_other=other)
    for name in sorted(set(namespace) - {f.name for g in GROUPS for f in fields(g)} - set(NEXT_OTHER)):
        warn(f"--{name}: accepted, no effect here ({NO_EFFECT.get(name, 'not used by this trainer')})")
    for name in ("lazy_preprocess", "is_multimodal", "double_quant", "quant_type", "lora_weight_path"):
        if name in namespace:
            warn(f"--{name}: accepted, no effect here ({NO_EFFECT[name]})")
    check(args)
    return args


def check(args: Arguments):
    """What this trainer cannot do, one line each, before anything is read."""
    t, m, d = args.training, args.model, args.data
    if not t.output_dir:
        raise LlavaError("--output_dir is required")
    if not d.data_path:
        raise LlavaError("--data_path is required")
    if t.optim not in OPTIMIZERS:
        raise LlavaError(f"--optim {t.optim}: this trainer runs AdamW ({', '.join(OPTIMIZERS)})")
    if t.lr_scheduler_type not in SCHEDULERS:
        raise LlavaError(f"--lr_scheduler_type {t.lr_scheduler_type}: one of {', '.join(SCHEDULERS)}")
    if t.bits not in (4, 8, 16):
        raise LlavaError(f"--bits {t.bits}: 16 (no quantization), 8 or 4")
    if t.bits != 16 and not t.lora_enable:
        raise LlavaError(f"--bits {t.bits} quantizes the base for QLoRA: it needs --lora_enable True")
    if t.lora_bias != "none":
        raise LlavaError(f"--lora_bias {t.lora_bias}: LoRA here trains no bias (none)")
    if t.bf16 and t.fp16:
        raise LlavaError("--bf16 and --fp16 both: pick one compute dtype")
    for name in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "model_max_length",
        "lora_r",
    ):
        if getattr(t, name) < 1:
            raise LlavaError(f"--{name} must be at least 1 (got {getattr(t, name)})")
    if t.evaluation_strategy not in ("no", "steps") or t.save_strategy not in ("no", "steps"):
        raise LlavaError("--evaluation_strategy and --save_strategy take 'no' or 'steps' (epoch is not built)")
    if m.mm_vision_select_feature not in ("patch", "cls_patch"):
        raise LlavaError(f"--mm_vision_select_feature {m.mm_vision_select_feature}: patch or cls_patch")
    if m.mm_use_im_start_end:
        raise LlavaError("--mm_use_im_start_end True (LLaVA v0's <im_start>/<im_end> tokens) is not trained here")


def describe(args: Arguments) -> dict:
    """Every argument's value, for the run's record."""
    return {
        name: value
        for group in (args.model, args.data, args.training)
        for name, value in dataclasses.asdict(group).items()
    }
