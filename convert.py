"""python convert.py --model llava-hf/llava-v1.6-mistral-7b-hf --out llava-v1.6-mistral-7b-4bit -q"""

import sys

try:  # Ctrl-C while the libraries load: one line, no traceback
    from llava_mlx.convert import main
except KeyboardInterrupt:
    sys.exit(print("interrupted", file=sys.stderr) or 130)

if __name__ == "__main__":
    sys.exit(main())
