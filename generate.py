"""python generate.py --image view.jpg --prompt "What is in this image?" """

import sys

try:  # Ctrl-C while the libraries load: one line, no traceback
    from llava_mlx.generate import main
except KeyboardInterrupt:
    sys.exit(print("interrupted", file=sys.stderr) or 130)

if __name__ == "__main__":
    sys.exit(main())
