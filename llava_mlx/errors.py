"""The one error type the CLIs turn into a single line on stderr, and the one way to say
that the code had to guess."""

import sys


class LlavaError(Exception):
    """Bad input or an unusable checkpoint: the message says what and how to fix it."""


class LlavaTypeError(LlavaError, TypeError):
    """An API argument of the wrong type (catchable as TypeError too)."""


class LlavaValueError(LlavaError, ValueError):
    """An API argument out of range (catchable as ValueError too)."""


def warn(message: str):
    """A guess or a fallback the user should know about: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
