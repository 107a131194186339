"""The checks of a fine-tuning run that need no model: the recipe and the flags merged into
the finetune options, the output paths, the plot format and the data layout.

The commands (``dynconvert finetune``, ``dynconvert MODEL --data DIR``) run them before anything
slow is loaded, so a mistake costs a line, not a conversion. ``flags`` are the command's
options as given (``None``: not given); precedence: built-in defaults < recipe < flags.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .. import io
from ..errors import DynconvertError
from ..finetune.data import scan_image_folder, split_folders
from ..finetune.distributed import resolve_device
from ..finetune.plot import check_plot_path
from ..recipes import Recipe, load_recipe
from ..sources import is_saved_file

# The flags of the commands that are not FinetuneOptions fields.
NOT_OPTIONS = {"data", "recipe", "num_classes", "distill"}


def collect_options(flags: dict[str, Any]) -> tuple[dict[str, Any], Any, Path | None]:
    """``(finetune kwargs, recipe, data path)`` from the recipe and the flags given."""
    recipe = load_recipe(flags["recipe"]) if flags.get("recipe") else Recipe()
    options = recipe.finetune_options()
    for name, value in flags.items():
        if name in NOT_OPTIONS or value is None:
            continue
        if name == "progress" and value is True and "progress" in options:
            continue
        options[name] = str(value) if isinstance(value, Path) else value
    if flags.get("distill") is not None:
        options.pop("teacher", None)
        if flags["distill"]:
            options["teacher"] = True
    data = flags.get("data") or recipe.data.get("path")
    if data is None:
        raise DynconvertError("--data DIR is required (or data.path in the recipe)", usage=True)
    if flags.get("num_classes") is None and recipe.model.get("num_classes") is not None:
        flags["num_classes"] = recipe.model["num_classes"]
    return options, recipe, Path(data)


@dataclasses.dataclass
class RunPlan:
    """What :func:`check_run` found: the finetune kwargs, the recipe and the data."""

    options: dict[str, Any]
    recipe: Any
    data: Path
    has_val: bool


def check_run(
    flags: dict[str, Any],
    out: Path,
    inputs: dict[str, Path | None] | None = None,
    outputs: dict[str, Path | None] | None = None,
    checkpoint_flag: str = "--checkpoint",
) -> RunPlan:
    """Every check that needs no model: options, output paths, plot format, data layout.

    ``inputs``: files the run reads (``MODEL``, weights), which no output may replace;
    ``outputs``: the command's other outputs (``--json``), which must be other files.
    """
    options, recipe, data = collect_options(flags)
    resolve_device(options.get("device"))  # a bad --device is bad usage, said before the run
    explicit_checkpoint = options.get("checkpoint") is not None
    options.setdefault("checkpoint", str(out.with_suffix(".ckpt")))
    _check_distinct(out, options, explicit_checkpoint=flags.get("checkpoint") is not None)
    named = recipe.model.get("name")
    read = {
        **(inputs or {}),
        "--recipe": flags.get("recipe"),
        "the recipe's model.name": named if named and is_saved_file(named) else None,
        "the recipe's model.weights": recipe.model.get("weights"),
        "--resume": options.get("resume"),
    }
    checkpoint = checkpoint_flag if explicit_checkpoint else "the training checkpoint"
    written = {"--out": out, **(outputs or {}), checkpoint: options["checkpoint"]}
    io.check_outputs(
        {**written, "--plot": options.get("plot")},
        read,
        {"--data": data},
        may_replace=[(checkpoint, "--resume")],  # the checkpoint continues the resumed run
    )
    if options.get("plot") is not None:
        check_plot_path(options["plot"])
    train_root, val_root = split_folders(data)
    allow_empty = bool(options.get("allow_empty_classes"))
    classes, _, _ = scan_image_folder(train_root, "train", allow_empty_classes=allow_empty)
    wanted = flags.get("num_classes")
    if wanted is not None and wanted != len(classes):
        raise DynconvertError(
            f"--num-classes {wanted} does not match the {len(classes)} class folders in "
            f"{train_root}",
            usage=True,
        )
    return RunPlan(options, recipe, data, has_val=val_root is not None)


def _check_distinct(out: Path, options: dict[str, Any], *, explicit_checkpoint: bool) -> None:
    """The saved model, the training checkpoint and the plot must be three files: each write
    would silently replace the other."""
    checkpoint = Path(options["checkpoint"])
    if out.resolve() == checkpoint.resolve():
        if explicit_checkpoint:
            raise DynconvertError(
                f"--out and --checkpoint are the same file {out}; give them different files",
                usage=True,
            )
        raise DynconvertError(
            f"--out {out} is also the training checkpoint (OUT with .ckpt), which the saved "
            f"model would replace; give --out another suffix (e.g. {out.with_suffix('.pt')}) "
            "or --checkpoint another file",
            usage=True,
        )
    plot = options.get("plot")
    for flag, path in (("--out", out), ("--checkpoint", checkpoint)):
        if plot is not None and Path(plot).resolve() == path.resolve():
            raise DynconvertError(
                f"--plot and {flag} are the same file {path}; give them different files",
                usage=True,
            )
