"""``save``, ``read`` and ``load`` of the dynconvert file format (see :mod:`dynconvert.io`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .. import __version__
from ..convert import ConvertConfig, swap_named
from ..errors import DynconvertError
from ..files import atomic_torch_save, check_output_path, format_for_suffix, safe_torch_load
from ..layers import DynamicConvNd
from ..sources.records import source_problem
from ..sources.timm_models import SOURCE_ATTR, model_source, rebuild_timm_model
from .conversion import (
    CONVERSION_ATTR,
    architecture,
    architecture_difference,
    check_all_recorded,
    check_config_fits,
    check_converted,
    config_from_dict,
    conversion_of,
    layer_strategies,
    report_of_layers,
    submodule_or_none,
)

FORMAT = "dynconvert"
VERSION = 1
_REQUIRED = {"source": dict, "config": dict, "converted": list, "state_dict": dict}


# -- save -----------------------------------------------------------------------------------


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    report: Any = None,
    config: Any = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (converted by :func:`dynconvert.convert`) to ``path``; returns the path.

    ``report``: the :class:`~dynconvert.report.ConversionReport` of the conversion (best: its
    options, names and table are stored). ``config``: a ``ConvertConfig`` (or its dict) that
    overrides the options. ``source``: overrides the recorded source, e.g.
    ``{"kind": "timm", "name": "resnet18", "kwargs": {"num_classes": 10}}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if has_meta_tensors(model):
        raise DynconvertError(
            "model: its weights are on the meta device, which holds no data, so there is "
            "nothing to save; load real weights into it first (load_state_dict(..., "
            "assign=True)) or build it on a real device"
        )
    path = Path(path)
    check_output_path(path)

    conversion = conversion_of(model, report)
    if config is not None:
        if isinstance(config, dict):
            config = config_from_dict(config, "config")
        if not isinstance(config, ConvertConfig):
            raise TypeError(f"config: expected a ConvertConfig or dict, got {type(config)}")
        conversion["config"] = config.to_dict()
        conversion["config_inferred"] = False
    if source is None:
        source = model_source(model)
    _check_source(source)
    check_converted(model, conversion["converted"])
    check_config_fits(model, conversion["converted"], conversion["config"])
    if source["kind"] == "timm":
        check_all_recorded(model, conversion["converted"])

    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "config": conversion["config"],
        "config_inferred": conversion["config_inferred"],
        "converted": list(conversion["converted"]),
        "strategies": layer_strategies(model, conversion["converted"], conversion["config"]),
        "architecture": architecture(model),
        "report": conversion["report"],
        "dtype": _uniform_dtype(state_dict),
        "state_dict": state_dict,
        "versions": _versions(),
    }
    atomic_torch_save(payload, path)
    return path


def _versions() -> dict[str, str | None]:
    return {
        "torch": str(torch.__version__),
        "timm": str(timm.__version__),
        "dynconvert": str(__version__),
    }


def _uniform_dtype(state_dict: dict[str, torch.Tensor]) -> str | None:
    dtypes = {
        str(t.dtype).removeprefix("torch.") for t in state_dict.values() if t.is_floating_point()
    }
    return dtypes.pop() if len(dtypes) == 1 else None


def _check_source(source: Any) -> None:
    problem = source_problem(source)
    if problem:
        raise DynconvertError(
            f"source: the recorded source {problem}; a saved file records only a timm name "
            "and its architecture options (the weights are saved with it): pass source= "
            "without it, or {'kind': 'custom'} and load the file with model="
        )


def read(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """The checked contents of a dynconvert file, without building a model."""
    path = Path(path)
    if not path.exists():
        raise DynconvertError(f"{path} does not exist")
    if path.is_dir():
        raise DynconvertError(f"{path} is a folder, not a dynconvert file")
    exported = format_for_suffix(path)
    if exported:
        raise DynconvertError(
            f"{path} looks like an exported {exported} file, which runs without dynconvert but "
            "cannot be read back into it; give the .pt file that dynconvert saved"
        )
    data = safe_torch_load(path, map_location)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DynconvertError(f"{path} is not a dynconvert file: {_describe(data)}")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DynconvertError(f"{path} is a damaged dynconvert file: bad version {version!r}")
    if version > VERSION:
        raise DynconvertError(
            f"{path} was written by a newer dynconvert (file format {version}, this version "
            f"reads up to {VERSION}); upgrade dynconvert"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise DynconvertError(f"{path} is a damaged dynconvert file: no valid {key!r} entry")
    if not all(isinstance(n, str) for n in data["converted"]):
        raise DynconvertError(f"{path} is a damaged dynconvert file: bad 'converted' names")
    problem = source_problem(data["source"])
    if problem:  # checked before anything is built from the file, whatever the caller does
        raise DynconvertError(
            f"{path} was refused: its recorded source {problem}; nothing was built or loaded "
            "(a saved file names only a timm model and its architecture options; use files "
            "from a source you trust)",
            usage=True,
        )
    return data


def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, map_location: Any = "cpu"
) -> nn.Module:
    """Rebuild the model saved at ``path`` and load its weights strictly.

    timm models are rebuilt by name and kwargs with ``pretrained=False`` (the weights come from
    the file) and moved to ``map_location``. A custom model needs ``model=``: a fresh instance
    of its architecture (unconverted, or already converted at the saved names). The training
    mode is left as the model was built.
    """
    if str(map_location) == "meta":
        raise DynconvertError(
            "map_location='meta' would load no weights; load on cpu (or cuda), or use "
            "dynconvert.io.read(path, map_location='meta') to look at a file without its data"
        )
    if isinstance(model, nn.Module) and has_meta_tensors(model):
        raise DynconvertError(
            f"model: the {type(model).__name__} passed as model= is on the meta device, which "
            f"cannot hold the weights of {path}; build it on a real device (e.g. cpu)"
        )
    data = read(path, map_location=map_location)
    config = config_from_dict(data["config"], f"{path}: config")
    source = data["source"]
    given = model is not None
    if model is None:
        if source.get("kind") != "timm":
            cls = source.get("class", "a custom model")
            raise DynconvertError(
                f"{path} holds a custom model ({cls}); pass its architecture: "
                "dynconvert.load(path, model=YourModel(...)) in Python, --model "
                "package.module:function on the command line"
            )
        model = rebuild_timm_model(source, where=str(path))
        if data.get("dtype") not in (None, "float32"):
            model.to(getattr(torch, data["dtype"]))
        if isinstance(map_location, (str, torch.device)):
            model.to(map_location)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")

    _swap_saved(model, data["converted"], config, path)
    _check_architecture(model, data.get("architecture"), path, source, given)
    _load_strict(model, data["state_dict"], path, source, given)
    for name, strategy in (data.get("strategies") or {}).items():
        model.get_submodule(name).strategy = strategy
    report = data.get("report")
    if not isinstance(report, dict):
        layers = [(name, model.get_submodule(name)) for name in data["converted"]]
        report = report_of_layers(model, layers, config)
    object.__setattr__(model, SOURCE_ATTR, source)
    object.__setattr__(
        model,
        CONVERSION_ATTR,
        {
            "config": config.to_dict(),
            "config_inferred": bool(data.get("config_inferred", False)),
            "converted": list(data["converted"]),
            "report": report,
        },
    )
    return model


def _swap_saved(model: nn.Module, names: list[str], config, path: Path) -> None:
    # A model passed already converted keeps its layers; strict loading checks their shapes.
    todo = [n for n in names if not isinstance(submodule_or_none(model, n), DynamicConvNd)]
    try:
        swap_named(model, todo, config)
    except DynconvertError as exc:
        raise DynconvertError(f"{path} does not fit this model: {exc}") from exc


def _what(model: nn.Module, source: dict, given: bool) -> str:
    if given or source.get("kind") != "timm":
        return f"the {type(model).__name__} passed as model="
    return f"timm {source.get('name')} with kwargs {source.get('kwargs') or {}}"


def _remedy(given: bool) -> str:
    if given:
        return "pass the architecture it was saved from"
    return "it was built with other arguments: pass that architecture with model="


def _check_architecture(
    model: nn.Module, saved: Any, path: Path, source: dict, given: bool
) -> None:
    """Layers whose weights fit but compute something else (dilation, pooling type)."""
    if not isinstance(saved, list):  # written before the file recorded it
        return
    difference = architecture_difference(saved, architecture(model))
    if difference:
        raise DynconvertError(
            f"{path}: {_what(model, source, given)} is not the saved architecture "
            f"({difference}); {_remedy(given)}"
        )


def _load_strict(model: nn.Module, state_dict: dict, path: Path, source: dict, given: bool) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} in the file vs {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):  # fmt: skip
        if items:
            more = f" and {len(items) - 2} more" if len(items) > 2 else ""
            problems.append(f"{len(items)} {label} ({', '.join(items[:2])}{more})")
    if problems:
        raise DynconvertError(
            f"{path}: the weights do not fit {_what(model, source, given)}: "
            f"{'; '.join(problems)}; {_remedy(given)}"
        )
    model.load_state_dict(state_dict, strict=True)


def has_meta_tensors(model: nn.Module) -> bool:
    """Whether a parameter or buffer of ``model`` is on the meta device (shape, no data)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _describe(data: Any) -> str:
    """What a torch file that is not a dynconvert save holds, for the error message."""
    if isinstance(data, dict):
        fmt = data.get("format")
        if isinstance(fmt, str) and fmt.startswith("dynconvert."):
            return f"it is a {fmt} file, not a saved model"
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            return (
                "it holds a plain state dict; load it with model.load_state_dict, or pass it "
                "to the CLI as --checkpoint"
            )
        return "a torch file without the dynconvert marker; save models with dynconvert.save"
    return f"it holds a {type(data).__name__}; save models with dynconvert.save"
