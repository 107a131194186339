"""A command's outputs checked together before any work: none may replace a file the command
reads, lie inside its data folder, or be another output's file.

The CLI calls :func:`check_outputs` with every output flag, every input file and every data
folder, before a model is built or trained; each refusal is a usage error (exit 2). The
outputs it accepts are recorded (:func:`dynconvert.interrupts.plan_outputs`), so that a run
interrupted after writing all of them can say that they are complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import DynconvertError
from ..files import check_output_path, same_file
from ..interrupts import plan_outputs

PathMap = Mapping[str, "str | Path | None"]


def check_outputs(
    outputs: PathMap,
    inputs: PathMap = {},  # noqa: B006 (read only)
    data: PathMap = {},  # noqa: B006 (read only)
    *,
    may_replace: Iterable[tuple[str, str]] = (),
) -> None:
    """Refuse, as usage errors, outputs that would destroy an input or each other.

    ``outputs``, ``inputs`` and ``data`` map what the user named (``--out``, ``MODEL``,
    ``--data``) to a path or None (not given). ``may_replace`` lists ``(output, input)``
    pairs that are meant to be one file: a training checkpoint rewrites the ``--resume``
    state it continues from.
    """
    allowed = set(may_replace)
    given = [(flag, Path(path)) for flag, path in outputs.items() if path is not None]
    read = [(what, Path(path)) for what, path in inputs.items() if path is not None]
    folders = [(what, Path(path)) for what, path in data.items() if path is not None]
    for index, (flag, path) in enumerate(given):
        for other_flag, other in given[:index]:
            if same_file(path, other):
                raise DynconvertError(
                    f"{other_flag} and {flag} are the same file {path}: the second write "
                    "would replace the first; give them different files",
                    usage=True,
                )
        for what, source in read:
            if (flag, what) not in allowed and same_file(path, source):
                raise DynconvertError(
                    f"cannot write {path}: it is the input file {source} ({what}), which the "
                    f"write would replace; give {flag} another path",
                    usage=True,
                )
        for what, folder in folders:
            if _inside(path, folder):
                raise DynconvertError(
                    f"{flag} {path} lies inside the {what} folder {folder}, where the write "
                    "could replace an image or add a file to the data; write it outside "
                    f"{folder}",
                    usage=True,
                )
        check_output_path(path)
    plan_outputs([path for _, path in given])


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (through links) lies in ``folder`` or in a folder linked from its
    split (``train``, ``val``) or class level."""
    target = path.resolve()
    return any(target.is_relative_to(root) for root in _data_roots(folder))


def _data_roots(folder: Path) -> set[Path]:
    """``folder`` resolved, plus where its linked split and class folders lead.

    Only two levels are listed (the split folders and the class folders): listing the class
    folders themselves would read every image name.
    """
    roots = {folder.resolve()}
    levels = [folder, folder / "train", folder / "val"]
    for level in levels:
        with contextlib.suppress(OSError):
            for child in level.iterdir():
                if child.is_symlink() and child.is_dir():
                    roots.add(child.resolve())
    return roots
