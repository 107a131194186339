"""What a MODEL string names: a file saved by dynconvert, ``package.module:function`` (your own
model), or a timm name (``resnet50``, ``resnet50.a1_in1k``, ``hf-hub:org/name``). Told apart
from the text alone (and whether the path exists), before anything is built or read."""

from __future__ import annotations

from pathlib import Path

from ..errors import DynconvertError

# File names that are certainly files, even if missing (timm names never end like this).
_FILE_SUFFIXES = {".pt", ".pth", ".pkl", ".bin", ".ckpt", ".safetensors", ".tar"}
# timm's own ``source:name`` prefixes, which are not ``package.module:function``.
_TIMM_SOURCES = ("hf-hub", "hf_hub", "local-dir")


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


def is_user_function(model: str) -> bool:
    """MODEL is ``package.module:function`` (your own model), not a timm ``source:name``."""
    module, sep, function = model.partition(":")
    return (
        bool(sep)
        and module not in _TIMM_SOURCES
        and all(part.isidentifier() for part in module.split("."))
        and function.isidentifier()
    )


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


def check_model_path(path: Path, what: str = "a dynconvert file or a timm model name") -> None:
    """A MODEL that is missing or a folder is bad usage, said before anything is loaded."""
    if path.is_dir():
        raise DynconvertError(f"{path} is a folder, not {what}; give the model file", usage=True)
    if not path.exists():
        raise DynconvertError(f"{path} does not exist", usage=True)
