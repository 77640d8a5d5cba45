"""python server.py --model DIR [--port 8080]: an OpenAI-compatible LLaVA server."""

import sys

from llava_mlx_cli import serve

if __name__ == "__main__":
    sys.exit(serve())
