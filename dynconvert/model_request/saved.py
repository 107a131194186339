"""A saved file loaded for a command, with errors that give the way forward (``--model``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import io
from ..errors import DynconvertError
from ..finetune.models import load_user_model


def build_architecture(spec: str | None) -> nn.Module | None:
    """The module ``--model`` names (imported and built), or None without ``--model``."""
    if spec is None:
        return None
    return load_user_model(spec)


def load_saved(path: Path, architecture: nn.Module | None) -> nn.Module:
    """:func:`dynconvert.load` whose errors give the CLI's way forward (``--model``)."""
    try:
        return io.load(path, model=architecture)
    except DynconvertError as exc:
        custom = _custom_class(path) if architecture is None else None
        if custom is not None:
            raise DynconvertError(
                f"{path} holds a custom model ({custom}); pass --model "
                "package.module:function that builds its architecture",
                usage=True,
            ) from exc
        raise


def _custom_class(path: Path) -> str | None:
    """The class name recorded in a readable file that holds a custom model, else None."""
    try:
        source = io.read(path, map_location="meta")["source"]  # no tensor data read
    except DynconvertError:
        return None
    return None if source.get("kind") == "timm" else str(source.get("class", "?"))


def refuse_saved_model_as_checkpoint(checkpoint: Path | None) -> None:
    """A dynconvert file is a MODEL of its own, not the weights of a static one."""
    if checkpoint is None or not checkpoint.is_file():
        return
    try:
        io.read(checkpoint, map_location="meta")  # no tensor data is read
    except DynconvertError:
        return
    raise DynconvertError(
        f"--checkpoint {checkpoint} is a saved dynconvert model, already converted; give it "
        f"as MODEL (dynconvert {checkpoint} ...) instead",
        usage=True,
    )
