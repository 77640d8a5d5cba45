"""The one error type the CLIs turn into a single line on stderr."""


class LlavaError(Exception):
    """Bad input or an unusable checkpoint: the message says what and how to fix it."""
