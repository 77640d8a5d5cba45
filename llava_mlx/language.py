"""The language model: mlx-lm's decoders, by model type: llama (Vicuna, Mistral and Yi are
all llama), qwen2 (LLaVA-OneVision) and mixtral (the LLaVA-NeXT code's llava_mixtral).

Configs in the wild leave fields to the model type's defaults (llava-hf text_config often
holds only a few keys), spell rope_theta as `rope_parameters` (transformers 5), or keep
the text fields at the top level (original LLaVA). `text_args` turns any of them into
mlx-lm's ModelArgs; the decoder itself is mlx-lm's, not a copy.
"""

from mlx_lm.models import llama, mixtral, qwen2

# transformers' LlamaConfig / MistralConfig defaults, for fields a config leaves out.
LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    head_dim=None,
    sliding_window=None,
)
DEFAULTS = {
    "llama": LLAMA_DEFAULTS,
    "mistral": {
        **LLAMA_DEFAULTS,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096,
    },
    # transformers' Qwen2Config defaults; Qwen2 windows no layer unless use_sliding_window.
    "qwen2": {
        **LLAMA_DEFAULTS,
        "vocab_size": 151936,
        "intermediate_size": 22016,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # transformers' MixtralConfig defaults
    "mixtral": {
        **LLAMA_DEFAULTS,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
}
# mlx-lm's decoder module per model type (the table a new decoder joins).
DECODERS = {"llama": llama, "mistral": llama, "qwen2": qwen2, "mixtral": mixtral}
# Original LLaVA names its text model types after the backbone.
TEXT_MODEL_TYPES = {
    "llava_llama": "llama",
    "llava_mistral": "mistral",
    "llava_qwen": "qwen2",  # the LLaVA-NeXT code's (lmms-lab's releases)
    "llava_mixtral": "mixtral",  # the LLaVA-NeXT code's
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "mixtral": "mixtral",
}


def normalize_text_config(params: dict) -> dict:
    """Every field the decoder needs, from a (possibly partial) text config."""
    model_type = TEXT_MODEL_TYPES.get(params.get("model_type", "llama"))
    if model_type is None:
        raise ValueError(f"unsupported language model type '{params.get('model_type')}'")
    config = dict(DEFAULTS[model_type])
    config.update({k: params[k] for k in config if k in params})
    rope = params.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and config["rope_scaling"] is None:
        config["rope_scaling"] = rope
    if model_type == "qwen2":  # attention bias is part of Qwen2, the window is off by default
        config.pop("attention_bias"), config.pop("mlp_bias"), config.pop("head_dim")
        if not params.get("use_sliding_window"):
            config["sliding_window"] = None
    if config["num_key_value_heads"] is None:
        config["num_key_value_heads"] = config["num_attention_heads"]
    config["model_type"] = model_type
    return config


def context_length(config: dict) -> int:
    """Longest sequence the decoder handles exactly.

    Dynamic NTK rope scaling extends it by its factor. A sliding window caps it: mlx-lm's
    llama has no all-sliding-window attention, and no released LLaVA sets one
    (LLaVA-1.6-Mistral uses Mistral-v0.2, window null).
    """
    window = config.get("sliding_window")
    limit = config["max_position_embeddings"]
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("type") or scaling.get("rope_type")) == "dynamic":
        limit = int(limit * scaling["factor"])  # dynamic NTK stretches the base past it
    return min(limit, window or limit)


def build_language_model(config: dict):
    decoder = DECODERS[config["model_type"]]
    args = {k: v for k, v in config.items() if k != "sliding_window"}
    return decoder.Model(decoder.ModelArgs.from_dict(args))


def sanitize_decoder(language_model, weights: dict, prefix: str = "language_model.") -> dict:
    """The decoder's weights as its mlx-lm module names them (its own `sanitize`: Mixtral's
    experts stacked into one switch layer); everything else as it was."""
    ours = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    if not ours:
        return weights
    others = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    return {**others, **{prefix + k: v for k, v in language_model.sanitize(ours).items()}}
