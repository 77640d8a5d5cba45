"""What the command lines share: bad input is one `error:` line and exit 1; Ctrl-C is one
line and exit 130, SIGTERM / SIGHUP one line and 128 + the signal, never a traceback;
both run the same cleanup (`finally`, `except BaseException`) as Ctrl-C does.

`signals_held` keeps a step that must not be cut in half (moving a finished conversion
into place, removing a half-written one) from being interrupted: a signal that arrives
inside it is acted on when it ends.
"""

import functools
import os
import signal
import sys
import threading
from contextlib import contextmanager

from .errors import LlavaError

TERMINATING = ("SIGTERM", "SIGHUP")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that the same cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def command(main):
    """Wrap a CLI `main(argv) -> int` with the error, interrupt and signal handling."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        signums = [getattr(signal, name) for name in TERMINATING if hasattr(signal, name)]
        previous = {s: signal.signal(s, _terminate) for s in signums} if _main_thread() else {}
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


@contextmanager
def signals_held():
    """Run the block whole: SIGINT / SIGTERM / SIGHUP received inside are raised at its end.

    Yields the list of signals received so far, for a block that wants to stop early.
    Outside the main thread (where Python cannot handle signals) it holds nothing.
    """
    received = []
    if not _main_thread():
        yield received
        return
    signums = [signal.SIGINT] + [getattr(signal, n) for n in TERMINATING if hasattr(signal, n)]
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signums}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt() if received[0] == signal.SIGINT else Terminated(received[0])
