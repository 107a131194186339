"""Build the model to convert: a timm model by name, with one clear error for each way it fails.

Used by the CLI and by :func:`dynconvert.load` (which rebuilds timm models by name).

* An unknown name suggests close matches from ``timm.list_models``; an unknown pretrained tag
  lists the model's tags.
* Pretrained weights that cannot be downloaded (offline, no network, no weights published)
  are an error that suggests ``pretrained=False`` / ``--no-pretrained`` or a local checkpoint.
  There is never a silent fall-back to random weights.
* A local checkpoint is loaded by timm's own pretrained loader (``pretrained_cfg_overlay``
  with ``file=``), which reads it with ``torch.load(weights_only=True)`` or safetensors and
  adapts the classifier the way timm does for downloaded weights.

:func:`model_source` describes where a model came from, for the saved file: the timm name and
the ``create_model`` keyword arguments, or the class of a custom model.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
from typing import Any

import timm
from torch import nn

from ..errors import DynconvertError, first_line
from .records import source_problem

# Set on models built here so that ``save`` records the exact name and kwargs.
SOURCE_ATTR = "_dynconvert_source"
# Only plain data goes into a saved file's kwargs (weights-only ``torch.load`` reads it back).
_PLAIN = (str, int, float, bool, type(None))


def close_timm_names(name: str, n: int = 3) -> list[str]:
    """The timm model names closest to ``name`` (architectures, or ``arch.tag`` names)."""
    candidates = timm.list_pretrained() if "." in name else timm.list_models()
    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)


def _unknown_name_error(name: str) -> DynconvertError:
    matches = close_timm_names(name)
    hint = f"; did you mean {', '.join(matches)}?" if matches else "; see timm.list_models()"
    return DynconvertError(f"unknown timm model {name!r}{hint}", usage=True)


def _check_timm_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise DynconvertError(f"model name: expected a timm model name, got {name!r}", usage=True)
    if ":" in name:  # hf-hub:org/repo or local-dir:path, resolved by timm itself
        return
    if not timm.is_model(name):
        raise _unknown_name_error(name)
    arch, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(name):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        known = f"known tags: {', '.join(tags)}" if tags else f"{arch} has no pretrained tags"
        raise DynconvertError(f"unknown pretrained tag {tag!r} for {arch}; {known}", usage=True)


def _is_download_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) comes from fetching weights: offline, DNS, HTTP, URL."""
    seen = 0
    while exc is not None and seen < 8:
        module = type(exc).__module__ or ""
        if module.startswith(("huggingface_hub", "requests", "urllib", "http", "socket")):
            return True
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set and they are not in the local cache"
    return "no network, or the hub could not be reached"


def build_timm_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, pretrained=..., **kwargs)`` with clear errors.

    ``checkpoint`` loads weights from a local file (a timm/torch state dict or safetensors)
    instead of downloading them. The model records its name and kwargs (not ``pretrained``
    or ``checkpoint``: the weights travel in the saved state dict) for :func:`model_source`.
    """
    _check_timm_name(name)
    create_kwargs = dict(kwargs)
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if os.path.isdir(checkpoint):
            raise DynconvertError(
                f"checkpoint {checkpoint} is a folder; give the weights file", usage=True
            )
        if not os.path.isfile(checkpoint):
            raise DynconvertError(f"checkpoint {checkpoint} does not exist", usage=True)
        create_kwargs["pretrained_cfg_overlay"] = {"file": checkpoint}
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **create_kwargs)
    except (pickle.UnpicklingError, EOFError) as exc:
        raise _checkpoint_error(checkpoint, name, exc) from exc
    except RuntimeError as exc:
        message = str(exc)
        if message.startswith("Unknown model"):
            raise _unknown_name_error(name) from exc
        if "No pretrained weights exist" in message:
            raise DynconvertError(
                f"timm publishes no pretrained weights for {name}; use --no-pretrained "
                "(pretrained=False) for random weights or --checkpoint FILE for local weights"
            ) from exc
        if checkpoint is not None:
            raise _checkpoint_error(checkpoint, name, exc) from exc
        raise
    except Exception as exc:
        if checkpoint is not None and not _is_download_failure(exc):
            # timm's loader expects a dict of tensors: a list, a tensor or text fails inside
            raise _checkpoint_error(checkpoint, name, exc) from exc
        hub = name.startswith("hf-hub:") and _is_download_failure(exc)
        if hub and not (pretrained and checkpoint is None and _hub_config_cached(name)):
            raise _hub_needed_error(name) from exc
        if pretrained and checkpoint is None and _is_download_failure(exc):
            raise DynconvertError(
                f"cannot download pretrained weights for {name} ({_offline_hint()}); use "
                "--no-pretrained (pretrained=False) for random weights, or --checkpoint FILE "
                "for a local checkpoint"
            ) from exc
        raise
    _set_source(model, {"kind": "timm", "name": name, "kwargs": _plain_kwargs(kwargs)})
    return model


def _hub_needed_error(name: str) -> DynconvertError:
    """An ``hf-hub:`` model reads its config from the hub even for random weights."""
    org, _, model = name.removeprefix("hf-hub:").partition("/")
    plain = f"the plain timm name {model}" if org == "timm" and model else "a plain timm name"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set and it is not cached" if offline else "the hub was not reached"
    return DynconvertError(
        f"{name} needs the Hugging Face hub for its config, even without pretrained weights "
        f"({why}); connect to the hub{' (unset HF_HUB_OFFLINE)' if offline else ''}, or use "
        f"{plain} with --no-pretrained or --checkpoint FILE"
    )


def _hub_config_cached(name: str) -> bool:
    """Whether the config of ``hf-hub:org/name[@revision]`` is in the local hub cache (then
    only the weights were missing)."""
    try:
        from huggingface_hub import try_to_load_from_cache  # optional dependency

        repo, _, revision = name.removeprefix("hf-hub:").partition("@")
        found = try_to_load_from_cache(repo, "config.json", revision=revision or None)
    except Exception:  # an odd name or an old huggingface_hub: assume not cached
        return False
    return isinstance(found, str)


def _checkpoint_error(checkpoint: str, name: str, exc: BaseException) -> DynconvertError:
    message = str(exc)
    code = re.search(r"(?:Unsupported globals?:|GLOBAL)\s+([\w.]*\w)", message)
    if code:
        return DynconvertError(
            f"checkpoint {checkpoint} was refused: it holds pickled code ({code.group(1)}), "
            "which safe (weights-only) loading does not run; nothing was executed"
        )
    if "Error(s) in loading state_dict" in message:
        lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
        detail = _short(lines[0]) if lines else "keys or shapes differ"
        return DynconvertError(
            f"checkpoint {checkpoint} does not fit {name} ({detail}); check the model name "
            "and its options"
        )
    return DynconvertError(
        f"checkpoint {checkpoint} could not be read ({first_line(exc)}); it must be a "
        "weights-only torch file or safetensors"
    )


def _short(text: str, limit: int = 160) -> str:
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    def plain(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return isinstance(value, _PLAIN)

    bad = sorted(key for key, value in kwargs.items() if not plain(value))
    if bad:
        raise DynconvertError(
            f"timm kwargs {bad} are not plain values (str, number, bool, None, lists of them); "
            "a saved file could not record them"
        )
    return {key: list(v) if isinstance(v, tuple) else v for key, v in kwargs.items()}


def _set_source(model: nn.Module, source: dict[str, Any]) -> None:
    # A plain attribute (not a buffer): it travels with the module object, not the state dict.
    object.__setattr__(model, SOURCE_ATTR, source)


def model_source(model: nn.Module) -> dict[str, Any]:
    """Where ``model`` comes from: ``{"kind": "timm", "name", "kwargs"}`` or ``"custom"``.

    Models built by :func:`build_timm_model` or :func:`dynconvert.load` know their exact
    name and kwargs. Other timm models are recognised by ``pretrained_cfg``: the name is
    ``architecture[.tag]`` and the kwargs hold ``num_classes`` when it differs from the
    default; other ``create_model`` arguments cannot be recovered (``load`` then fails with
    a clear message and the caller passes ``model=``).
    """
    recorded = getattr(model, SOURCE_ATTR, None)
    if isinstance(recorded, dict):
        return recorded
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        name = cfg["architecture"]
        if cfg.get("tag"):
            name = f"{name}.{cfg['tag']}"
        kwargs: dict[str, Any] = {}
        num_classes = getattr(model, "num_classes", None)
        if isinstance(num_classes, int) and num_classes != cfg.get("num_classes"):
            kwargs["num_classes"] = num_classes
        return {"kind": "timm", "name": name, "kwargs": kwargs}
    cls = type(model)
    return {"kind": "custom", "class": f"{cls.__module__}.{cls.__qualname__}"}


def rebuild_timm_model(source: dict[str, Any], where: str = "source") -> nn.Module:
    """The architecture recorded by :func:`model_source`, with random weights.

    The one place that builds a model from a recorded source: the source is checked first
    (:func:`dynconvert.sources.records.source_problem`) and its name must be registered in timm
    (:func:`build_timm_model` checks plain names), so a file can make the tool neither load
    nor fetch anything (``where`` names the file).
    """
    problem = source_problem(source)
    if problem is None and source.get("kind") != "timm":
        problem = "is not a timm model"
    if problem:
        raise DynconvertError(
            f"{where}: cannot rebuild the model: its source {problem}", usage=True
        )
    name = source["name"]
    if ":" in name:  # hf-hub:org/repo fetches a config, local-dir:path reads one
        raise DynconvertError(
            f"{where}: the recorded timm name {name!r} names a config to fetch or read; a "
            "saved file is rebuilt from timm's registered names only: pass the architecture "
            "with model= (CLI: --model)",
            usage=True,
        )
    return build_timm_model(name, pretrained=False, **dict(source.get("kwargs") or {}))
