"""python server.py --model DIR [--port 8080]: an OpenAI-compatible LLaVA server."""

import sys

from llava_mlx.server import main

if __name__ == "__main__":
    sys.exit(main())
