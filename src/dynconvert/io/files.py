"""Safe file handling: outputs checked before work, atomic writes, weights-only reads.

Writes go to a temporary file in the target folder and are renamed into place, so an
interrupted run never leaves a half file. Reads use ``torch.load(weights_only=True)`` only; a
pickle that would run code is refused (and not run) with one clear line.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import DynconvertError


def check_output_path(path: Path, inputs: tuple[Path | None, ...] = ()) -> None:
    """Fail before any work when ``path`` cannot be written: missing, unwritable or a folder,
    or one of the command's ``inputs`` (the write would destroy what the command reads)."""
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
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


def _same_file(a: Path, b: Path) -> bool:
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
    would get, and renamed to ``path``; on any error it is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as exc:
        raise DynconvertError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        try:
            _fsync(tmp)  # the rename must not reach the disk before the data does
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
            os.replace(tmp, path)
        except OSError as exc:
            raise DynconvertError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


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
