"""One option, written once: a dataclass field whose metadata says how it is shown.

The options dataclasses (:class:`~dynconvert.convert.config.ConvertConfig`,
:class:`~dynconvert.finetune.options.FinetuneOptions`, the export options) declare each
option with :func:`option`: its name, default and type are the field's own; ``help``,
``choices``, the lowest value, the CLI flag and the recipe section are metadata. Everything
else is derived from the fields: the click options (``dynconvert.cli.options``), the recipe
schemas (:func:`recipe_schema`) and the API keyword defaults. A plain field without metadata
still gets a CLI flag and a recipe key (its type read from its annotation), so adding a field
is the whole change.

This module imports nothing from the package: every layer may use it.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_MISSING = dataclasses.MISSING

# How a value reads on the command line when its annotation alone does not say it:
# "shape": N or C,H,W (an int tuple); "path": a file or folder to read; "file_to_write".
VALUE_KINDS = ("shape", "path", "file_to_write")


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    default_factory: Any = _MISSING,
    choices: Sequence[str] | None = None,
    minimum: float | None = None,
    above_minimum: bool = False,
    flag: str | None = None,
    metavar: str | None = None,
    value: str | None = None,
    repeatable: bool = False,
    cli: bool = True,
    recipe: str | None = "",
    recipe_types: tuple[type, ...] | None = None,
) -> Any:
    """A dataclass field that is also a CLI option and a recipe key.

    * ``choices``: the allowed strings; ``minimum`` (``above_minimum``: excluded): the
      lowest number. The dataclass still validates; these make the CLI refuse early.
    * ``flag``: the CLI flag when it is not ``--name-with-dashes``; ``cli=False``: none.
    * ``value``: one of :data:`VALUE_KINDS`; ``repeatable``: a tuple given as a repeated flag.
    * ``recipe``: the recipe section that holds the key (``""``: the dataclass's own section),
      ``None``: not a recipe key. ``recipe_types``: the YAML types accepted, when the
      annotation says less (a tuple option that also takes one value).
    """
    if value is not None and value not in VALUE_KINDS:
        raise ValueError(f"value: expected one of {VALUE_KINDS}, got {value!r}")
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "minimum": minimum,
        "above_minimum": above_minimum,
        "flag": flag,
        "metavar": metavar,
        "value": value,
        "repeatable": repeatable,
        "cli": cli,
        "recipe": recipe,
        "recipe_types": recipe_types,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def meta(field: dataclasses.Field, key: str, fallback: Any = None) -> Any:
    """``key`` of the field's :func:`option` metadata (``fallback`` for a plain field)."""
    return field.metadata.get(key, fallback)


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not _MISSING:
        return field.default
    if field.default_factory is not _MISSING:
        return field.default_factory()
    return None


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field (annotations are strings under ``__future__``)."""
    return typing.get_type_hints(cls)


def type_members(annotation: Any) -> tuple[Any, ...]:
    """``X | Y | None`` as ``(X, Y, NoneType)``; any other annotation as ``(annotation,)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _yaml_types(member: Any) -> tuple[type, ...]:
    origin = typing.get_origin(member) or member
    if member is type(None):
        return (type(None),)
    if origin is bool:
        return (bool,)
    if origin is int:
        return (int,)
    if origin is float:
        return (int, float)
    if origin in (str, Path):
        return (str,)
    if isinstance(origin, type) and issubclass(origin, (tuple, list, Sequence)):
        return (list,)
    return ()  # callables, objects: not plain YAML


def recipe_types(cls: type, field: dataclasses.Field) -> tuple[type, ...]:
    """The YAML types a recipe may give ``field``: declared, or read from its annotation."""
    declared = meta(field, "recipe_types")
    if declared is not None:
        return declared
    found: list[type] = []
    for member in type_members(field_types(cls)[field.name]):
        found += [t for t in _yaml_types(member) if t not in found]
    return tuple(found)


def recipe_fields(cls: type, section: str = "") -> list[dataclasses.Field]:
    """The fields that are recipe keys of ``section`` (``""``: the dataclass's own)."""
    return [f for f in dataclasses.fields(cls) if meta(f, "recipe", "") == section]


def recipe_schema(cls: type, section: str = "") -> dict[str, tuple[type, ...]]:
    """``{key: accepted YAML types}`` of one recipe section, from the fields."""
    return {f.name: recipe_types(cls, f) for f in recipe_fields(cls, section)}


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are CLI options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if meta(f, "cli", True)]


def flag_name(field: dataclasses.Field) -> str:
    """``--name-with-dashes``, or the field's declared ``flag``."""
    return meta(field, "flag") or "--" + field.name.replace("_", "-")


def keyword_signature(
    cls: type,
    head: Sequence[inspect.Parameter],
    *,
    positional: Sequence[str] = (),
    tail: Sequence[str] = (),
) -> inspect.Signature:
    """The signature of a function taking ``cls``'s fields as keywords (``**options``), so that
    ``help()`` and editors list each option with its default: ``head`` first, then the fields
    named in ``positional`` (in that order, positional-or-keyword), the other fields
    (keyword-only, in field order), and ``tail``'s keyword-only ``None`` parameters."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    ordered = [*(by_name[n] for n in positional),
               *(f for f in dataclasses.fields(cls) if f.name not in positional)]  # fmt: skip
    fields = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD
            if f.name in positional
            else inspect.Parameter.KEYWORD_ONLY,
            default=default_of(f),
            annotation=f.type,
        )
        for f in ordered
    ]
    rest = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in tail]
    return inspect.Signature([*head, *fields, *rest])


def refuse_unknown_keywords(function: str, cls: type, keywords: Any) -> None:
    """A TypeError naming the fields of ``cls`` when ``keywords`` holds another name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise TypeError(
            f"{function}() got unexpected keyword(s) {', '.join(unknown)}; the options are the "
            f"fields of {cls.__name__}: {', '.join(sorted(known))}"
        )
