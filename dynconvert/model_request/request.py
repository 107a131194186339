"""What MODEL names and how it becomes a converted model, for the commands that take one.

MODEL is a timm name (``resnet50``, ``resnet50.a1_in1k``, ``hf-hub:org/name``),
``package.module:function`` building your own model (``checkpoint`` is then its state dict),
or a file saved by dynconvert (already converted; a custom model's file needs
``architecture``, ``--model package.module:function``). :func:`prepare_model` builds or loads
it and converts it with the options of a :class:`ModelRequest`: the CLI passes its strings.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..convert import convert
from ..convert.config import ConvertConfig
from ..errors import DynconvertError, UnmatchedPatternWarning
from ..finetune.models import load_user_model
from ..io import CONVERSION_ATTR
from ..report import ConversionReport
from ..sources import (
    build_timm_model,
    check_model_argument,
    check_model_path,
    full_input_size,
    is_saved_file,
    is_user_function,
    probe_input_size,
)
from .saved import build_architecture, load_saved, refuse_saved_model_as_checkpoint

# Options that steer a conversion; they make no sense for a file that is already converted.
CONVERSION_OPTIONS = tuple(f.name for f in dataclasses.fields(ConvertConfig))


@dataclass
class ModelRequest:
    """What MODEL names and how to build and convert it."""

    model: str
    pretrained: bool = False
    checkpoint: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    explicit: set[str] = field(default_factory=set)  # options given on the command line
    architecture: str | None = None  # --model package.module:function, for a saved file


@dataclass
class Prepared:
    model: nn.Module
    report: ConversionReport
    from_file: bool


def _flag(name: str, value: Any = None) -> str:
    """The flag as typed: ``--no-pretrained`` when a ``--x/--no-x`` switch was turned off."""
    return ("--no-" if value is False else "--") + name.replace("_", "-")


def convert_kwargs(request: ModelRequest) -> dict[str, Any]:
    """Keyword arguments of :func:`dynconvert.convert` from the request's options."""
    options = dict(request.options)
    for name in ("include", "exclude"):
        patterns = options.get(name) or ()
        options[name] = [patterns] if isinstance(patterns, str) else list(patterns) or None
    return options


def prepare_model(request: ModelRequest) -> Prepared:
    """Build and convert the timm model, or load the saved file, with its report."""
    check_model_argument(request.model)
    if is_saved_file(request.model):
        return _prepare_saved(request)
    if request.architecture is not None:
        raise DynconvertError(
            f"--model builds the architecture of a saved file; {request.model} is a timm "
            "model name, drop --model",
            usage=True,
        )

    refuse_saved_model_as_checkpoint(request.checkpoint)
    if is_user_function(request.model):
        model = _build_user_model(request)
    else:
        model = build_timm_model(
            request.model, pretrained=request.pretrained, checkpoint=request.checkpoint
        )
    kwargs = convert_kwargs(request)
    kwargs["input_size"] = full_input_size(kwargs.get("input_size"), model)
    if kwargs["input_size"] is not None:
        probe_input_size(model, kwargs["input_size"], request.model)
    model, report = convert_strictly(model, kwargs)
    return Prepared(model, report, from_file=False)


def _prepare_saved(request: ModelRequest) -> Prepared:
    """A saved file is already converted: conversion options are refused, not ignored."""
    path = Path(request.model)
    check_model_path(path)
    given = sorted(request.explicit & {*CONVERSION_OPTIONS, "pretrained", "checkpoint"})
    if given:
        values = {**request.options, "pretrained": request.pretrained}
        flags = ", ".join(_flag(n, values.get(n)) for n in given)
        verb = "applies" if len(given) == 1 else "apply"
        raise DynconvertError(
            f"{path} is a saved dynconvert model, already converted; {flags} {verb} to "
            "timm model names only",
            usage=True,
        )
    model = load_saved(path, build_architecture(request.architecture))
    stored = getattr(model, CONVERSION_ATTR)["report"]
    return Prepared(model, ConversionReport.from_dict(stored), from_file=True)


def _build_user_model(request: ModelRequest) -> nn.Module:
    """``package.module:function`` built, with ``checkpoint`` as its state dict."""
    if request.pretrained and "pretrained" in request.explicit:
        raise DynconvertError(
            f"--pretrained applies to timm model names; {request.model} is your own model: "
            "pass its weights with --checkpoint FILE (a state dict)",
            usage=True,
        )
    return load_user_model(request.model, request.checkpoint)


def convert_strictly(model: nn.Module, kwargs: dict[str, Any]):
    """``dynconvert.convert``, where an exclude pattern that matches nothing is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedPatternWarning)
        try:
            return convert(model, **kwargs)
        except UnmatchedPatternWarning as exc:
            raise DynconvertError(f"{exc}; fix the pattern", usage=True) from None
