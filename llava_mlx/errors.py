"""The one error type the CLIs turn into a single line on stderr."""


class LlavaError(Exception):
    """Bad input or an unusable checkpoint: the message says what and how to fix it."""


class LlavaTypeError(LlavaError, TypeError):
    """An API argument of the wrong type (catchable as TypeError too)."""


class LlavaValueError(LlavaError, ValueError):
    """An API argument out of range (catchable as ValueError too)."""
