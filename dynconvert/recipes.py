"""Recipes: plain YAML files with the sections ``model``, ``convert``, ``finetune`` and ``data``.

Every key is checked: an unknown key is an error that names it (and its section), a value
of the wrong type is an error that names the key and the expected type. CLI flags override
recipe values (see ``dynconvert finetune --recipe``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from .convert.config import ConvertConfig
from .errors import DynconvertError
from .finetune.options import FinetuneOptions
from .option_fields import recipe_schema

_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))

MODEL_SCHEMA: dict[str, tuple[type, ...]] = {
    "name": (str,),  # a timm name, or package.module:function
    "weights": _OPT_STR,
    "pretrained": (bool,),
    "num_classes": _OPT_INT,
}

# The other sections are derived from the options dataclasses, key by key.
CONVERT_SCHEMA = recipe_schema(ConvertConfig)
# ``distill: true`` becomes ``teacher=True`` (the static original), see finetune_options.
FINETUNE_SCHEMA = {**recipe_schema(FinetuneOptions), "distill": (bool,)}
# ``path`` is the data folder, not an option of the run.
DATA_SCHEMA = {"path": _OPT_STR, **recipe_schema(FinetuneOptions, "data")}

SECTIONS = ("model", "convert", "finetune", "data")


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "int", float: "number", str: "string", bool: "true/false", list: "list"}
    return " or ".join(names.get(t, "null") for t in types if not (t is int and float in types))


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= 60 else text[:59] + "…"


@dataclasses.dataclass
class Recipe:
    """A validated recipe; each section is a plain dict of the keys the file set."""

    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    convert: dict[str, Any] = dataclasses.field(default_factory=dict)
    finetune: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "<recipe>"

    def finetune_options(self) -> dict[str, Any]:
        """``finetune`` + ``data`` as keyword arguments of :func:`dynconvert.finetune`
        (``distill`` becomes ``teacher=True``; ``data.path`` is not an option)."""
        out = {k: v for k, v in self.finetune.items() if k != "distill"}
        out.update({k: v for k, v in self.data.items() if k != "path"})
        if self.finetune.get("distill"):
            out["teacher"] = True
        return out


def validate_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DynconvertError(
            f"recipe {source}: expected a mapping of sections ({', '.join(SECTIONS)}) at the "
            f"top level, got {_kind(raw)}",
            usage=True,
        )
    schemas = {
        "model": MODEL_SCHEMA,
        "convert": CONVERT_SCHEMA,
        "finetune": FINETUNE_SCHEMA,
        "data": DATA_SCHEMA,
    }
    sections: dict[str, dict[str, Any]] = {}
    for section, body in raw.items():
        if section not in schemas:
            raise DynconvertError(
                f"recipe {source}: unknown section {section!r}; expected one of "
                f"{', '.join(SECTIONS)}",
                usage=True,
            )
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise DynconvertError(
                f"recipe {source}: section {section!r} must be a mapping of keys "
                f"(key: value lines under '{section}:'), got {_kind(body)}",
                usage=True,
            )
        schema = schemas[section]
        for key, value in body.items():
            if key not in schema:
                raise DynconvertError(
                    f"recipe {source}: unknown key {section}.{key!s}; known keys: "
                    f"{', '.join(sorted(schema))}",
                    usage=True,
                )
            types = schema[key]
            wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
            if wrong:
                raise DynconvertError(
                    f"recipe {source}: {section}.{key} must be {_type_name(types)}, "
                    f"got {type(value).__name__} {value!r}",
                    usage=True,
                )
        sections[section] = dict(body)
    recipe = Recipe(**sections, source=source)
    _check_values(recipe)
    return recipe


def _check_values(recipe: Recipe) -> None:
    """Range checks by the objects that own them, reported against the recipe file."""
    try:
        FinetuneOptions.from_kwargs(**recipe.finetune_options())
    except DynconvertError as exc:
        raise DynconvertError(f"recipe {recipe.source}: {exc}", usage=True) from None
    if recipe.convert:
        try:
            ConvertConfig(**recipe.convert)
        except (TypeError, ValueError) as exc:
            raise DynconvertError(f"recipe {recipe.source}: convert.{exc}", usage=True) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise DynconvertError(f"recipe: {path} is a folder; give the YAML file", usage=True)
    if not path.is_file():
        raise DynconvertError(f"recipe: {path} does not exist", usage=True)
    return validate_recipe(_read_yaml(path), str(path))


def _read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` that refuses a key set twice in one mapping (PyYAML keeps the last
    one, so the first value would be silently dropped)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    earlier = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                line = key_node.start_mark.line + 1
                if earlier is not None:
                    raise DynconvertError(
                        f"recipe {path}: duplicate key {key!r} at line {line} (already set "
                        f"at line {earlier}); keep one",
                        usage=True,
                    )
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    # YAML 1.2 floats: PyYAML's 1.1 rules read `lr: 1e-3` (no dot) as the string "1e-3".
    UniqueKeyLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a SafeLoader: no code runs
    except yaml.YAMLError as exc:
        problem = _yaml_problem(exc)
        raise DynconvertError(f"recipe {path}: not valid YAML {problem}", usage=True) from None


def _yaml_problem(exc: Exception) -> str:
    """``at line L, column C: <problem> (<context>)`` from a PyYAML error."""
    mark = getattr(exc, "problem_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return f"{where}: {detail}" if where else f"({detail})"
