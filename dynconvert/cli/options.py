"""Click options made from an options dataclass, so that each option is written once.

:func:`dataclass_options` turns the fields of :class:`ConvertConfig`, :class:`FinetuneOptions`
or the export options (see :mod:`dynconvert.option_fields`) into click options: a bool
becomes ``--x/--no-x``, ``choices`` a ``click.Choice``, a ``minimum`` an ``IntRange`` or
``FloatRange``, a repeatable tuple a ``multiple`` option, a ``shape`` an ``--input-size``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from ..option_fields import cli_fields, default_of, field_types, flag_name, meta, type_members
from .params import FilePath, InputSize


def _base_type(cls: type, field: dataclasses.Field) -> Any:
    """The annotation without ``None`` (``int | None`` -> ``int``)."""
    members = [m for m in type_members(field_types(cls)[field.name]) if m is not type(None)]
    return members[0] if len(members) == 1 else str


def _number_type(base: Any, field: dataclasses.Field) -> Any:
    low = meta(field, "minimum")
    if low is None:
        return base
    range_type = click.IntRange if base is int else click.FloatRange
    return range_type(min=low, min_open=meta(field, "above_minimum", False))


def _click_type(cls: type, field: dataclasses.Field) -> Any:
    value_kind = meta(field, "value")
    if value_kind == "shape":
        return InputSize()
    if value_kind == "path":
        return FilePath(path_type=Path)
    if value_kind == "file_to_write":
        return FilePath(dir_okay=False, path_type=Path)
    if meta(field, "choices") is not None:
        return click.Choice(meta(field, "choices"))
    base = _base_type(cls, field)
    if base in (int, float):
        return _number_type(base, field)
    if meta(field, "repeatable", False):
        return str
    return base if base in (str, bool) else str


def field_option(
    cls: type,
    field: dataclasses.Field,
    *,
    recipe_defaults: bool = False,
    help_text: str | None = None,
):
    """The click option of one field.

    ``recipe_defaults``: the option defaults to ``None`` (not given), so that a recipe can
    fill it; the field's default is then shown in the help as ``[default: X]``.
    ``help_text``: another wording where the option means more (or less) in one command.
    """
    name = flag_name(field)
    default = default_of(field)
    help_text = meta(field, "help", "") if help_text is None else help_text
    kwargs: dict[str, Any] = {"help": help_text}
    if meta(field, "metavar") or meta(field, "value") == "shape":
        kwargs["metavar"] = meta(field, "metavar") or "N|C,H,W"
    if _base_type(cls, field) is bool and meta(field, "value") is None:
        # --x/--no-x, or a plain --x flag where only switching on makes sense
        names = (name,) if meta(field, "flag") else (f"{name}/--no-{name[2:]}",)
    else:
        names = (name,)
        kwargs["type"] = _click_type(cls, field)
        kwargs["multiple"] = meta(field, "repeatable", False)
    if meta(field, "flag") and "type" not in kwargs:
        kwargs["is_flag"] = True
    if recipe_defaults and meta(field, "recipe", "") is not None:
        kwargs["default"] = None
        if default is not None:
            kwargs["help"] = f"{help_text} [default: {default}]"
    elif recipe_defaults:  # not a recipe key: nothing to fill, the field's own default
        kwargs["default"] = default
    elif not kwargs.get("multiple"):
        kwargs["default"] = default
        kwargs["show_default"] = default is not None
    return click.option(*names, field.name, **kwargs)


def dataclass_options(
    cls: type,
    *,
    skip: Iterable[str] = (),
    recipe_defaults: bool = False,
    extra: dict[str, Callable] | None = None,
) -> Callable[[Callable], Callable]:
    """A decorator adding the click options of ``cls``'s CLI fields (but ``skip``), in field
    order. ``extra``: hand-written options placed before the field of the same name."""
    skipped, extra = set(skip), extra or {}

    def decorate(command: Callable) -> Callable:
        decorators = []
        for field in cli_fields(cls):
            if field.name in extra:
                decorators.append(extra[field.name])
            if field.name not in skipped:
                decorators.append(field_option(cls, field, recipe_defaults=recipe_defaults))
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def named_option(cls: type, name: str, help_text: str | None = None):
    """The click option of the field ``name`` of ``cls`` (``help_text``: another wording)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field_option(cls, field, help_text=help_text)


def cli_option_names(cls: type, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The parameter names of ``cls``'s CLI options (the field names)."""
    return tuple(f.name for f in cli_fields(cls) if f.name not in set(skip))
