"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class DynconvertError(Exception):
    """A user-facing failure: the message says what is wrong and what to do.

    The CLI prints ``error: <message>`` and exits 1 (2 when ``usage`` is set), with a
    traceback only under ``--debug``.
    """

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class UnmatchedPatternWarning(UserWarning):
    """An ``exclude`` pattern that matches no convolution (it excludes nothing): the API warns,
    the CLI makes it an error by this category, never by the message text."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first non-empty line`` of an exception, cut to ``limit`` characters: what a
    one-line error can quote of a library's multi-line message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
