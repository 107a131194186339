"""What a saved file may record as its model's source, checked before anything is built.

A dynconvert file records where its model came from (see :mod:`dynconvert.io`)::

    {"kind": "timm", "name": "resnet50", "kwargs": {"num_classes": 10}}
    {"kind": "custom", "class": "pkg.mod.Net"}

``load`` rebuilds a timm source with ``timm.create_model(name, pretrained=False, **kwargs)``,
so whoever writes a file chooses those arguments. timm's ``create_model`` also takes
arguments that read or fetch files (``checkpoint_path``, ``pretrained_cfg_overlay={"file":
...}``, ``cache_dir``...): a file that set them would make the tool open a path the file names,
and an old torch or timm would unpickle it with code execution. So a recorded source is held
to what describes an architecture, checked by :func:`source_problem` on every save and every
read, and again by ``dynconvert.sources.timm_models.rebuild_timm_model`` (the one place that
rebuilds):

* ``kind`` is ``"timm"`` or ``"custom"``, and no other keys than the kind's own;
* a timm ``name`` is a short plain string (that timm registers it is checked on rebuild,
  where timm is imported; ``hf-hub:``/``local-dir:`` names, which fetch or read a config, are
  not rebuilt from a file);
* timm ``kwargs`` is a dict of at most :data:`MAX_KWARGS` keys from :data:`ARCHITECTURE_KWARGS`,
  whose values are ``None``, bools, numbers, short identifier-like strings (never a path or
  URL) or short flat lists of them;
* a custom ``class`` is a short one-line string, shown to the user and never imported: a
  custom model's architecture is always the caller's ``model=`` / ``--model``.
"""

from __future__ import annotations

import re
from typing import Any

# ``timm.create_model`` keyword arguments that only shape the architecture, the only ones a
# saved file may set. The project itself records ``num_classes`` (``model_source`` and
# ``finetune --num-classes``) and whatever plain kwargs the caller gave ``build_timm_model``;
# the others are the common architecture options of timm's model families.
ARCHITECTURE_KWARGS = frozenset({
    # heads and input
    "num_classes", "in_chans", "global_pool", "img_size", "patch_size", "fc_norm",
    "class_token", "no_embed_class", "reg_tokens", "dynamic_img_size", "dynamic_img_pad",
    "head_hidden_size", "features_only", "out_indices", "output_stride",
    # regularisation
    "drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate",
    "pos_drop_rate", "patch_drop_rate",
    # widths, depths, blocks
    "embed_dim", "depth", "depths", "dims", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm",
    "init_values", "layers", "channels", "stem_type", "stem_width", "stem_chs", "embed_dims",
    "widths", "width_factor",
    "cardinality", "base_width", "avg_down", "down_kernel_size", "zero_init_last",
    "block_reduce_first", "channel_multiplier", "depth_multiplier", "act_layer", "norm_layer",
    # timm's layer-config switches (which implementation of a layer is built)
    "scriptable", "exportable", "no_jit",
})  # fmt: skip
# Arguments of ``timm.create_model`` / ``build_model_with_cfg`` that load or fetch weights or
# configs: named as such when a file sets them. Any other key outside the allowlist is
# refused too, as "not an architecture option".
LOADING_KWARGS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
    "pretrained_filter_fn", "pretrained_model_args", "checkpoint_path", "cache_dir",
    "feature_cfg", "model_cfg", "kwargs_filter", "file", "url", "hf_hub_id", "state_dict",
})  # fmt: skip
# Substrings that mark a key as naming something to load, for keys in neither list.
_LOADING_WORDS = ("pretrained", "checkpoint", "path", "file", "url", "dir", "cache", "hub")
MAX_KWARGS = 32
MAX_LIST = 16
MAX_TEXT = 64
_KEYS = {"timm": {"kind", "name", "kwargs"}, "custom": {"kind", "class"}}
# Strings a file may pass as values: identifiers like "avg", "gelu_tanh", "deep-tiered".
# No "/", "\\", ":", "~" or "." that a path or URL needs.
_WORD = re.compile(r"[A-Za-z0-9_\-]*")
_ONE_LINE = re.compile(r"[^\x00-\x1f\x7f]{1,200}")


def source_problem(source: Any) -> str | None:
    """What makes ``source`` unfit to record or rebuild, as a phrase; None when it is fine."""
    if not isinstance(source, dict) or source.get("kind") not in _KEYS:
        return f"is {_short(source)}, not a dict with kind 'timm' or 'custom'"
    kind = source["kind"]
    extra = sorted(map(str, set(source) - _KEYS[kind]))
    if extra:
        return f"has unknown entries {extra} (a {kind} source holds {sorted(_KEYS[kind])})"
    if kind == "custom":
        cls = source.get("class")
        if cls is not None and not (isinstance(cls, str) and _ONE_LINE.fullmatch(cls)):
            return f"has a custom class {_short(cls)} that is not a one-line name"
        return None
    name = source.get("name")
    if not (isinstance(name, str) and _ONE_LINE.fullmatch(name)):
        return f"has timm name {_short(name)}, not a model name"
    return _kwargs_problem(source.get("kwargs"))


def _kwargs_problem(kwargs: Any) -> str | None:
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        return f"has timm kwargs {_short(kwargs)}, not a dict"
    if len(kwargs) > MAX_KWARGS:
        return f"has {len(kwargs)} timm kwargs (at most {MAX_KWARGS})"
    for key, value in kwargs.items():
        if not isinstance(key, str):
            return f"has a timm kwarg key {_short(key)} that is not a string"
        if key not in ARCHITECTURE_KWARGS:
            if key in LOADING_KWARGS or any(word in key.lower() for word in _LOADING_WORDS):
                return f"sets timm kwarg {key!r}, which loads or fetches files"
            return (
                f"sets timm kwarg {key!r}, which is not an architecture option a saved file "
                "may set (see dynconvert.sources.ARCHITECTURE_KWARGS)"
            )
        problem = _value_problem(value)
        if problem:
            return f"sets timm kwarg {key!r} to {problem}"
    return None


def _value_problem(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST:
            return f"a list of {len(value)} values (at most {MAX_LIST})"
        if any(isinstance(v, (list, tuple, dict)) for v in value):
            return "a nested list (only flat lists of plain values)"
        return next(filter(None, map(_value_problem, value)), None)
    if value is None or isinstance(value, (bool, int, float)):
        return None
    if isinstance(value, str):
        if not _WORD.fullmatch(value):
            return f"{_short(value)}, which looks like a path or URL (only plain words)"
        if len(value) > MAX_TEXT:
            return f"a string of {len(value)} characters (at most {MAX_TEXT})"
        return None
    return f"a {type(value).__name__} (only None, bools, numbers, words and lists of them)"


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to one short line: what an error may quote of a crafted value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
