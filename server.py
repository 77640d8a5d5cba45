"""python server.py --model DIR [--port 8080]: an OpenAI-compatible LLaVA server."""

import sys

from llava_mlx.__main__ import server

if __name__ == "__main__":
    sys.exit(server())
