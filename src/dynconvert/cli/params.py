"""Click parameters shared by the commands: int tuples, and ``--model`` with the loading of a
saved file (whose architecture ``--model`` builds when the file holds a custom model)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import DynconvertError

if TYPE_CHECKING:
    from torch import nn

ARCHITECTURE_HELP = (
    "package.module:function that builds the architecture of a file holding a custom "
    "(non-timm) model."
)


class IntTuple(click.ParamType):
    """A few positive ints separated by ``,``, ``x`` or spaces: ``3,224,224``, ``224x160``."""

    name = "int_tuple"

    def __init__(self, min_len: int, max_len: int, expected: str) -> None:
        self.min_len, self.max_len, self.expected = min_len, max_len, expected

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, tuple):
            return value
        parts = [p for p in re.split(r"[,x×\s]+", str(value).strip()) if p]
        try:
            sizes = tuple(int(p) for p in parts)
        except ValueError:
            sizes = ()
        if not self.min_len <= len(sizes) <= self.max_len or any(s < 1 for s in sizes):
            self.fail(f"expected {self.expected}; got {value!r}", param, ctx)
        return sizes


def input_size() -> IntTuple:
    """``224``, ``224,160`` (H,W) or ``3,224,224`` (C,H,W)."""
    return IntTuple(1, 3, "H, H,W or C,H,W with positive ints")


def sample_shape() -> IntTuple:
    """One sample's shape without the batch: ``3,224,224`` (C,H,W), ``64,100`` (C,L)..."""
    return IntTuple(2, 4, "one sample's shape as positive ints, e.g. 3,224,224 (C,H,W)")


def architecture_option(command: Callable) -> Callable:
    """``--model package.module:function`` (parameter ``architecture``), as in ``finetune``."""
    return click.option(
        "--model", "architecture", metavar="PKG.MOD:FN", default=None, help=ARCHITECTURE_HELP
    )(command)


def check_model_path(path: Path, what: str = "a dynconvert file or a timm model name") -> None:
    """A MODEL that is missing or a folder is bad usage, said before anything is loaded."""
    if path.is_dir():
        raise DynconvertError(f"{path} is a folder, not {what}; give the model file", usage=True)
    if not path.exists():
        raise DynconvertError(f"{path} does not exist", usage=True)


def build_architecture(spec: str | None) -> nn.Module | None:
    """The module ``--model`` names (imported and built), or None without ``--model``."""
    if spec is None:
        return None
    from ..finetune.models import load_user_model

    return load_user_model(spec)


def load_saved(path: Path, architecture: nn.Module | None) -> nn.Module:
    """:func:`dynconvert.load` whose errors give the CLI's way forward (``--model``)."""
    from .. import io

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
    from .. import io

    try:
        source = io.read(path, map_location="meta")["source"]  # no tensor data read
    except DynconvertError:
        return None
    return None if source.get("kind") == "timm" else str(source.get("class", "?"))
