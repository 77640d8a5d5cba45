"""python train.py --model_name_or_path lmsys/vicuna-7b-v1.5 --vision_tower openai/clip-vit-large-patch14-336 ..."""

import sys

from llava_mlx.__main__ import train

if __name__ == "__main__":
    sys.exit(train())
