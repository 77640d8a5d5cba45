"""The one entry point: `python -m llava_mlx generate|convert|server|train [options]`.

The root scripts (`python generate.py`, `train.py`, ...) and the console scripts (`llava-generate`, ...) are
shims over `run`. It imports nothing heavy itself: a Ctrl-C while MLX, mlx-lm and transformers
are being imported (seconds) is one line and exit 130, not a traceback of the import machinery.
"""

import os
import sys
from importlib import import_module

COMMANDS = {
    "generate": "ask LLaVA about images and videos",
    "convert": "convert (and quantize) a checkpoint to MLX",
    "server": "serve an OpenAI-compatible API and a chat page",
    "train": "fine-tune (LoRA, QLoRA, projector, full) as the original train.py",
}
USAGE = "usage: python -m llava_mlx {" + ",".join(COMMANDS) + "} [options]   (--help after a command for its options)"


def run(command: str, argv=None) -> int:
    """Run `command`'s main() with `argv` (default: the rest of sys.argv)."""
    try:
        main = import_module(f"llava_mlx.cli.{command}").main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            USAGE + "\n\n" + "\n".join(f"  {c:10s}{h}" for c, h in COMMANDS.items()),
            file=sys.stderr if not argv else sys.stdout,
        )
        return 2 if not argv else 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}' (choose {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    sys.argv[0] = f"python -m llava_mlx {argv[0]}"  # what --help and usage errors call it
    if argv[0] == "server":
        end_server(run("server", argv[1:]))
    return run(argv[0], argv[1:])


def end_server(code: int):
    """The server process ends here, once main() has answered, drained and closed everything:
    left to the interpreter's teardown, MLX's CPU backend sometimes aborts it ("terminate called
    without an active exception", the engine thread's MLX state torn down) after a clean stop."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def generate() -> int:
    return run("generate")


def convert() -> int:
    return run("convert")


def server() -> int:
    end_server(run("server"))


def train() -> int:
    return run("train")


if __name__ == "__main__":
    sys.exit(main())
