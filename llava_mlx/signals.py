"""Signals as exceptions, and a block no signal cuts in half.

SIGTERM and SIGHUP are raised as `Terminated` (a KeyboardInterrupt) so that the cleanup that
runs for Ctrl-C runs for them too. `signals_held` keeps a step that must not be cut in half
(moving a finished conversion into place, removing a half-written one) from being interrupted:
a signal that arrives inside it is acted on when it ends.
"""

import signal
import threading
from contextlib import contextmanager

TERMINATING = ("SIGTERM", "SIGHUP")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that the same cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def signals_held():
    """Run the block whole: SIGINT / SIGTERM / SIGHUP received inside are raised at its end.

    Yields the list of signals received so far, for a block that wants to stop early.
    Outside the main thread (where Python cannot handle signals) it holds nothing.
    """
    received = []
    if not main_thread():
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
