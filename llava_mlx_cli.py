"""The command lines' entry points (`python generate.py`, `llava-generate`, ...), kept outside
the `llava_mlx` package on purpose: importing the package loads MLX, mlx-lm and transformers,
which takes seconds, and a Ctrl-C in that time must be one line and exit 130, not a traceback
of the import machinery. Only this module, which imports nothing heavy, can catch it.
"""

import sys
from importlib import import_module


def _run(module: str) -> int:
    try:
        main = import_module(module).main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return main()


def generate() -> int:
    return _run("llava_mlx.generate")


def convert() -> int:
    return _run("llava_mlx.convert")


def serve() -> int:
    return _run("llava_mlx.server")
