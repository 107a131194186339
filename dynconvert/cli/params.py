"""Click parameters shared by the commands: paths, ``--input-size`` and ``--model``."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import DynconvertError

ARCHITECTURE_HELP = (
    "package.module:function that builds the architecture of a file holding a custom "
    "(non-timm) model."
)


class FilePath(click.Path):
    """``click.Path`` that refuses an empty string: ``Path("")`` is the current folder, which
    would be read as the data, the model or the place to write."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a path", param, ctx)
        return super().convert(value, param, ctx)


INPUT_SIZE_FORMS = "N (one positive int: N×N images, e.g. 224) or C,H,W (three, e.g. 3,224,224)"
_POSITIVE_INT = re.compile(r"[1-9][0-9]*")


def parse_input_size(text: str) -> tuple[int, ...]:
    """``--input-size`` as ``(N,)`` or ``(C, H, W)``: every command reads it here.

    Each comma-separated token must be a positive int: ``3,x,32`` or ``3,,32`` is refused
    rather than read as ``3,32`` with a token dropped. Raises ValueError with the accepted
    forms.
    """
    tokens = [token.strip() for token in str(text).split(",")]
    if len(tokens) not in (1, 3) or not all(_POSITIVE_INT.fullmatch(t) for t in tokens):
        raise ValueError(f"expected {INPUT_SIZE_FORMS}; got {text!r}")
    return tuple(int(token) for token in tokens)


class InputSize(click.ParamType):
    """The click side of :func:`parse_input_size`: a usage error (exit 2) with the forms."""

    name = "input_size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, tuple):
            return value
        try:
            return parse_input_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def input_size_option(help_text: str) -> Callable[[Callable], Callable]:
    """``--input-size N`` or ``--input-size C,H,W``, the same option in every command."""
    return click.option(
        "--input-size", type=InputSize(), default=None, metavar="N|C,H,W", help=help_text
    )


def json_option(help_text: str) -> Callable[[Callable], Callable]:
    """``--json FILE`` (parameter ``json_path``): a report or figures written as JSON."""
    return click.option(
        "--json",
        "json_path",
        type=FilePath(dir_okay=False, path_type=Path),
        default=None,
        help=help_text,
    )


def square_image_size(size: tuple[int, ...] | None) -> int | None:
    """The side N of the RGB images that fine-tuning reads, from ``N`` or ``3,N,N``."""
    if size is None or len(size) == 1:
        return None if size is None else size[0]
    channels, height, width = size
    if channels != 3 or height != width:
        raise DynconvertError(
            f"--input-size {','.join(map(str, size))}: fine-tuning reads RGB images at a "
            "square size; give N or 3,N,N",
            usage=True,
        )
    return height


def architecture_option(command: Callable) -> Callable:
    """``--model package.module:function`` (parameter ``architecture``), as in ``finetune``."""
    return click.option(
        "--model", "architecture", metavar="PKG.MOD:FN", default=None, help=ARCHITECTURE_HELP
    )(command)
