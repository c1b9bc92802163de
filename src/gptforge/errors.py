"""The one exception type for errors a user can cause (bad paths, bad configs, malformed data)."""


class GptforgeError(Exception):
    """A user-facing error: the message says what went wrong, where, and how to fix it.

    The CLI prints the message on one line and exits with status 2; tracebacks are kept for bugs.
    """
