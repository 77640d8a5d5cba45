"""llava-mlx: LLaVA 1.5 and 1.6 on Apple silicon with MLX, exact to the original code;
LLaVA-OneVision and LLaVA-NeXT-Video (images and video), exact to transformers.

    from llava_mlx import load, generate, stream_generate
    model, processor = load("llava-hf/llava-v1.6-mistral-7b-hf")
    print(generate(model, processor, "What is in this image?", images=["view.jpg"]).text)
"""

from .convert import convert
from .errors import LlavaError
from .generate import generate, stream_generate
from .load import load

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "convert", "LlavaError"]
