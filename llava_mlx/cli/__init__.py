"""The command lines (`python -m llava_mlx generate|convert|server`), and what they share: bad
input is one `error:` line and exit 1; Ctrl-C is one line and exit 130, SIGTERM / SIGHUP one
line and 128 + the signal, never a traceback; both run the same cleanup (`finally`,
`except BaseException`) as Ctrl-C does (signals.py).
"""

import functools
import os
import signal
import sys

from ..errors import LlavaError
from ..signals import TERMINATING, Terminated, main_thread


def _terminate(signum, frame):
    raise Terminated(signum)


def command(main):
    """Wrap a CLI `main(argv) -> int` with the error, interrupt and signal handling."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        signums = [getattr(signal, name) for name in TERMINATING if hasattr(signal, name)]
        previous = {s: signal.signal(s, _terminate) for s in signums} if main_thread() else {}
        try:
            return main(argv)
        except (LlavaError, ValueError) as e:
            message = str(e).strip().splitlines()
            print(f"error: {message[0] if message else type(e).__name__}", file=sys.stderr)
            return 1
        except Terminated as e:
            print(f"terminated ({signal.Signals(e.signum).name})", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    return run
