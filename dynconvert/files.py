"""Safe file handling: outputs checked before work, atomic writes, weights-only reads.

Writes go to a temporary file in the target folder and are renamed into place, so an
interrupted run never leaves a half file. Reads use ``torch.load(weights_only=True)`` only; a
pickle that would run code is refused (and not run) with one clear line.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import DynconvertError
from .interrupts import record_written, signals_held

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no temporary is taken for stale
    fcntl = None  # type: ignore[assignment]


def check_output_path(path: Path, inputs: tuple[Path | None, ...] = ()) -> None:
    """Fail before any work when ``path`` cannot be written: missing, unwritable or a folder,
    or one of the command's ``inputs`` (the write would destroy what the command reads)."""
    for source in inputs:
        if source is not None and same_file(path, Path(source)):
            raise DynconvertError(
                f"cannot write {path}: it is the input file {source}, which the write would "
                "replace; give another output path",
                usage=True,
            )
    folder = path.parent
    if path.is_dir():
        raise DynconvertError(f"cannot write {path}: it is a folder; give a file name")
    if not folder.exists():
        raise DynconvertError(f"cannot write {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise DynconvertError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DynconvertError(f"cannot write {path}: folder {folder} is not writable")


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: through links, hard links and other spellings."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also through links and different spellings
    return a.resolve() == b.resolve()


def check_free_space(path: Path, needed_bytes: int, what: str) -> None:
    """Fail before writing when ``path``'s disk has less room than ``needed_bytes`` (plus 1%).

    For writers that cannot be stopped cleanly once the disk fills (torch's exporters abort
    the process from C++), so the estimate is checked first.
    """
    free = shutil.disk_usage(path.parent).free
    if free < needed_bytes * 1.01:
        raise DynconvertError(
            f"cannot write {path}: {what} needs about {needed_bytes / 2**20:.1f} MiB and its "
            f"disk has {free / 2**20:.1f} MiB free; free some space or write elsewhere"
        )


@contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write.

    When the block ends without error the file is flushed to disk, given the mode a new file
    would get, and renamed to ``path``; on any error (Ctrl-C and SIGTERM included) it is
    removed and ``path`` is untouched. Temporaries of ``path`` that a killed process left
    behind are removed first. The temporary is locked while it is written, so that another
    process writing the same target does not take it for a stale one.
    """
    path = Path(path)
    remove_stale_temporaries(path, suffix)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as exc:
        raise DynconvertError(f"cannot write {path}: {exc.strerror or exc}") from exc
    tmp = Path(name)
    try:
        _lock(fd)
        yield tmp
        with signals_held():  # renamed and recorded together: a signal now finds it complete
            try:
                _fsync(tmp)  # the rename must not reach the disk before the data does
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
                os.replace(tmp, path)
            except OSError as exc:
                raise DynconvertError(f"cannot write {path}: {exc.strerror or exc}") from exc
            record_written(path)
    finally:
        with signals_held():  # a second Ctrl-C must not skip the clean-up
            tmp.unlink(missing_ok=True)
            os.close(fd)


def temporary_pattern(path: Path, suffix: str = ".tmp") -> re.Pattern[str]:
    """The names :func:`atomic_output` gives the temporaries of ``path``: ``.NAME.XXXXXXXX``
    and ``suffix``, with mkstemp's eight random characters."""
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")


def remove_stale_temporaries(path: Path, suffix: str = ".tmp") -> list[Path]:
    """Remove the temporaries of ``path`` that no live writer holds (left by a killed run).

    Only regular files whose whole name matches :func:`temporary_pattern` are touched;
    a temporary still locked by its writer, a link, or a file we may not delete stays.
    """
    pattern = temporary_pattern(path, suffix)
    folder = path.parent
    try:
        names = [n for n in os.listdir(folder) if pattern.fullmatch(n)]
    except OSError:
        return []  # a missing or unreadable folder: the write itself reports it
    removed = []
    for name in names:
        candidate = folder / name
        try:
            fd = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # a link (O_NOFOLLOW), gone already, or not ours to read
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not _try_lock(fd):
                continue  # not a file, or a writer is still at work on it
            if os.stat(candidate, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                continue  # replaced under us
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _lock(fd: int) -> None:
    """Mark a temporary as in use (a new file, so nobody else holds it)."""
    if fcntl is None:
        return
    with contextlib.suppress(OSError):  # a file system without locks: the write goes on
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _try_lock(fd: int) -> bool:
    """Whether no other process holds a lock on ``fd``'s file (the kernel drops the locks of
    a killed process). Without ``fcntl`` (Windows) nothing is taken for stale."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except OSError as exc:
            raise DynconvertError(f"cannot write {path}: {exc.strerror or exc}") from exc
        except RuntimeError as exc:  # torch's zip writer reports a full disk this way
            interrupt = _interrupt_behind(exc)  # ... and a Ctrl-C mid-write, too
            if interrupt is not None:
                raise interrupt from None
            free = shutil.disk_usage(tmp.parent).free
            raise DynconvertError(
                f"cannot write {path}: the write failed with {free / 2**20:.1f} MiB left on its "
                "disk; free some space and run again"
            ) from exc


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C during whose handling ``exc`` was raised, if any (torch's zip writer fails
    in its clean-up when interrupted)."""
    seen: set[int] = set()
    link = exc.__context__
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return link
        seen.add(id(link))
        link = link.__context__
    return None


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write UTF-8 text through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def safe_torch_load(path: Path, map_location: Any) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter from the weights-only reader
            return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as exc:
        raise DynconvertError(f"cannot read {path}: permission denied") from exc
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:
            raise DynconvertError(
                f"{path} was refused: it holds pickled code ({found.group(1)}), which safe "
                "(weights-only) loading does not run; nothing was executed. A whole pickled "
                "model must be saved again as a state dict, from a source you trust"
            ) from None
        raise DynconvertError(
            f"{path} is corrupt or not a weights-only torch file (it cannot be read safely; "
            "nothing in it was run)"
        ) from None
    except EOFError:
        raise DynconvertError(f"{path} is empty or truncated; save it again") from None
    except Exception as exc:
        # torch's own text is long (miniz advice) or bare (KeyError '101' for a non-torch
        # file): say what it means instead.
        if "zip archive" in str(exc) or "central directory" in str(exc):
            what = "truncated or corrupt (its zip archive cannot be read)"
        else:
            what = f"corrupt or not a torch file ({type(exc).__name__} while reading it)"
        raise DynconvertError(f"{path} is {what}; save or copy it again") from None


#: The suffix each export format's files usually have: ``io.read`` names an exported file
#: given in place of a dynconvert file, ``export`` checks ``--out`` against ``--format``.
EXPORT_SUFFIXES: dict[str, str] = {"pt2": ".pt2", "onnx": ".onnx", "torchscript": ".ts"}


def format_for_suffix(path: Path) -> str | None:
    """The export format whose usual file suffix ``path`` has (``.pt2``, ``.onnx``, ``.ts``)."""
    for name, suffix in EXPORT_SUFFIXES.items():
        if path.suffix.lower() == suffix:
            return name
    return None
