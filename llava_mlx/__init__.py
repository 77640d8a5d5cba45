"""llava-mlx: LLaVA 1.5 and 1.6 on Apple silicon with MLX, exact to the original code;
LLaVA-OneVision and LLaVA-NeXT-Video (images and video), exact to transformers.

    from llava_mlx import load, generate, stream_generate
    model, processor = load("llava-hf/llava-v1.6-mistral-7b-hf")
    print(generate(model, processor, "What is in this image?", images=["view.jpg"]).text)

The package face is lazy (PEP 562): `import llava_mlx` loads nothing heavy; MLX, mlx-lm and
transformers are imported when one of the names below is first used.
"""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "convert", "LlavaError"]

# name → the module that defines it
_HOMES = {
    "load": "llava_mlx.checkpoint.load",
    "generate": "llava_mlx.generation",
    "stream_generate": "llava_mlx.generation",
    "convert": "llava_mlx.checkpoint.convert",
    "LlavaError": "llava_mlx.errors",
}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name]), name)
        globals()[name] = value  # the next lookup does not come here
        return value
    raise AttributeError(f"module 'llava_mlx' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)
