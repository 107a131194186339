"""Stop signals: SIGTERM handled like Ctrl-C, held off while a finished file is put in place,
and the record of which outputs were complete when one came.

Ctrl-C raises ``KeyboardInterrupt``; :func:`sigterm_as_interrupt` makes SIGTERM (what ``kill``,
job schedulers and container runtimes send) raise it too, so every clean-up written for
Ctrl-C (temporaries removed, a fine-tuning run's state saved) also runs for SIGTERM.

:func:`signals_held` delays both signals until a block ends: the atomic writer renames the
finished file and records it there, so a signal never lands between the two and a run
interrupted after its last rename can say that its files are complete.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_planned: list[Path] = []  # the outputs the running command will write
_written: list[Path] = []  # the files renamed into place since the command started


class Interrupted(KeyboardInterrupt):
    """``KeyboardInterrupt`` raised by a SIGTERM; ``signal_name`` says which signal it was."""

    signal_name = "SIGTERM"


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted("SIGTERM")


def interrupt_for(signum: int | None) -> KeyboardInterrupt:
    """The exception that stands for ``signum`` (None: Ctrl-C, or not known)."""
    return Interrupted("SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt()


def signal_name(exc: BaseException) -> str:
    """``SIGTERM`` for a SIGTERM turned into an interrupt, else ``SIGINT`` (Ctrl-C)."""
    return exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"


def _in_main_thread() -> bool:
    # Python runs signal handlers, and lets them be changed, in the main thread only.
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Interrupted` (a ``KeyboardInterrupt``)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block reach their handlers when it ends.

    Python-level, not ``pthread_sigmask``: torch's worker threads would still receive a
    blocked signal and Python would run its handler in the main thread anyway.
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set in C
        for sig in dict.fromkeys(pending):  # each held signal once, to its own handler
            signal.raise_signal(sig)


def reset_outputs() -> None:
    """Forget the planned and written outputs (a new command starts)."""
    _planned.clear()
    _written.clear()


def plan_outputs(paths: list[Path]) -> None:
    """The files the running command will write, checked before its work started."""
    _planned.extend(p for p in paths if p not in _planned)


def record_written(path: Path) -> None:
    """``path`` was renamed into place: it is complete."""
    _written.append(Path(path))


def written_outputs() -> list[Path]:
    """The planned outputs written so far (each once, in plan order)."""
    done = {_key(p) for p in _written}
    return [p for p in _planned if _key(p) in done]


def all_outputs_written() -> bool:
    """Whether the command planned outputs and every one of them is in place."""
    return bool(_planned) and len(written_outputs()) == len(_planned)


def _key(path: Path) -> Path:
    return Path(path).absolute()
