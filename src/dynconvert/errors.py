"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class DynconvertError(Exception):
    """A user-facing failure: the message says what is wrong and what to do.

    The CLI prints ``error: <message>`` and exits 1 (2 when ``usage`` is set), with a
    traceback only under ``--debug``.
    """

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage
