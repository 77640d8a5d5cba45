"""python convert.py --model llava-hf/llava-v1.6-mistral-7b-hf --out llava-v1.6-mistral-7b-4bit -q"""

import sys

from llava_mlx.__main__ import convert

if __name__ == "__main__":
    sys.exit(convert())
