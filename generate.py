"""python generate.py --image view.jpg --prompt "What is in this image?" """

import sys

from llava_mlx.__main__ import generate

if __name__ == "__main__":
    sys.exit(generate())
