"""What MODEL names and how it becomes a converted model, for the commands that take one.

MODEL is a timm name (``resnet50``, ``resnet50.a1_in1k``, ``hf-hub:org/name``),
``package.module:function`` building your own model (``--checkpoint`` is then its state
dict), or a file saved by dynconvert (already converted; a custom model's file needs
``--model package.module:function`` for its architecture). :func:`prepare_model` builds or
loads it and converts it with the options of a :class:`ModelRequest`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DynconvertError
from ..modes import training_mode
from .params import build_architecture, check_model_path, full_input_size

# File names that are certainly files, even if missing (timm names never end like this).
_FILE_SUFFIXES = {".pt", ".pth", ".pkl", ".bin", ".ckpt", ".safetensors", ".tar"}
# Options that steer a conversion; they make no sense for a file that is already converted.
CONVERSION_OPTIONS = (
    "k", "ratio", "temperature", "include", "exclude", "skip_stem", "min_channels",
    "depthwise", "strategy", "input_size", "seed",
)  # fmt: skip


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
    report: Any  # ConversionReport
    from_file: bool


def check_model_argument(model: str) -> None:
    """MODEL that names nothing (empty, or ``:`` with nothing around it) is bad usage, said
    before it is taken for the current folder or handed to timm."""
    module, sep, name = model.partition(":")
    empty = not model.strip()
    bad_colon = bool(sep) and not is_user_function(model) and not is_saved_file(model)
    if empty or (bad_colon and not (module in _TIMM_SOURCES and name.strip())):
        raise DynconvertError(
            f"MODEL {model!r} names no model; give a timm model name (e.g. resnet50), "
            "hf-hub:org/name, a file saved by dynconvert, or package.module:function",
            usage=True,
        )


def is_saved_file(model: str) -> bool:
    """MODEL is a file when it exists, or looks like a path (a timm name never does)."""
    if not model:  # Path("") is the current folder
        return False
    path = Path(model)
    if path.exists():
        return True
    if ":" in model:  # hf-hub:org/name, a timm name
        return False
    return "/" in model or "\\" in model or path.suffix.lower() in _FILE_SUFFIXES


_TIMM_SOURCES = ("hf-hub", "hf_hub", "local-dir")


def is_user_function(model: str) -> bool:
    """MODEL is ``package.module:function`` (your own model), not a timm ``source:name``."""
    module, sep, function = model.partition(":")
    return (
        bool(sep)
        and module not in _TIMM_SOURCES
        and all(part.isidentifier() for part in module.split("."))
        and function.isidentifier()
    )


def _flag(name: str, value: Any = None) -> str:
    """The flag as typed: ``--no-pretrained`` when a ``--x/--no-x`` switch was turned off."""
    return ("--no-" if value is False else "--") + name.replace("_", "-")


def convert_kwargs(request: ModelRequest) -> dict[str, Any]:
    """Keyword arguments of :func:`dynconvert.convert` from the CLI options."""
    options = dict(request.options)
    for name in ("include", "exclude"):
        patterns = options.get(name) or ()
        options[name] = [patterns] if isinstance(patterns, str) else list(patterns) or None
    return options


def prepare_model(request: ModelRequest) -> Prepared:
    """Build and convert the timm model, or load the saved file, with its report."""
    from dynconvert.report import ConversionReport

    check_model_argument(request.model)
    if is_saved_file(request.model):
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
        from .params import load_saved

        model = load_saved(path, build_architecture(request.architecture))
        return Prepared(model, ConversionReport.from_dict(_stored_report(model)), from_file=True)
    if request.architecture is not None:
        raise DynconvertError(
            f"--model builds the architecture of a saved file; {request.model} is a timm "
            "model name, drop --model",
            usage=True,
        )

    _refuse_saved_model_as_checkpoint(request.checkpoint)
    if is_user_function(request.model):
        model = _build_user_model(request)
    else:
        from dynconvert.models import build_timm_model

        model = build_timm_model(
            request.model, pretrained=request.pretrained, checkpoint=request.checkpoint
        )
    kwargs = convert_kwargs(request)
    kwargs["input_size"] = full_input_size(kwargs.get("input_size"), model)
    if kwargs["input_size"] is not None:
        probe_input_size(model, kwargs["input_size"], request.model)
    model, report = convert_strictly(model, kwargs)
    return Prepared(model, report, from_file=False)


def _refuse_saved_model_as_checkpoint(checkpoint: Path | None) -> None:
    """A dynconvert file is a MODEL of its own, not the weights of a static one."""
    from dynconvert import io

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


def _build_user_model(request: ModelRequest) -> nn.Module:
    """``package.module:function`` built, with ``--checkpoint`` as its state dict."""
    from ..finetune import load_user_model

    if request.pretrained and "pretrained" in request.explicit:
        raise DynconvertError(
            f"--pretrained applies to timm model names; {request.model} is your own model: "
            "pass its weights with --checkpoint FILE (a state dict)",
            usage=True,
        )
    return load_user_model(request.model, request.checkpoint)


def probe_input_size(model: nn.Module, size: tuple[int, ...], name: str) -> None:
    """One forward at the size the user gave, before converting: ``convert`` only notes a
    failed probe (and goes on without shapes and MACs), which would save a model whose report
    is about an input it cannot take."""
    import torch

    from ..models import _first_line

    like = next(model.parameters(), None)
    example = torch.zeros(1, *size, dtype=getattr(like, "dtype", torch.float32),
                          device=getattr(like, "device", "cpu"))  # fmt: skip
    try:
        with training_mode(model, False), torch.no_grad():
            model(example)
    except Exception as exc:
        default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        hint = f", e.g. its default {','.join(map(str, default))}" if default else ""
        raise DynconvertError(
            f"{name} cannot take inputs of size {tuple(size)} ({_first_line(exc)}); give "
            f"the size it expects with --input-size{hint}",
            usage=True,
        ) from exc


def _stored_report(model: nn.Module) -> dict[str, Any]:
    from dynconvert.io import CONVERSION_ATTR

    return getattr(model, CONVERSION_ATTR)["report"]


def convert_strictly(model: nn.Module, kwargs: dict[str, Any]):
    """``dynconvert.convert``, where an exclude pattern that matches nothing is an error."""
    import dynconvert

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "error", message=r"exclude pattern .* matches no", category=UserWarning
        )
        try:
            return dynconvert.convert(model, **kwargs)
        except UserWarning as exc:
            raise DynconvertError(f"{exc}; fix the pattern", usage=True) from None
