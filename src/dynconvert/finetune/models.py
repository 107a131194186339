"""Model-side helpers of fine-tuning: the classifier head, the static teacher, user models."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import DynconvertError
from ..layers import DynamicConvNd


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".attention." not in f".{name}.":
            found = (name, module)
    return found


def model_num_classes(model: nn.Module) -> int | None:
    """The head's output count: timm's ``num_classes``, else the last ``nn.Linear``'s."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    last = _last_linear(model)
    return last[1].out_features if last else None


def reset_head(model: nn.Module, num_classes: int) -> None:
    """A fresh ``num_classes`` head: timm's ``reset_classifier``, else a new last ``nn.Linear``."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    last = _last_linear(model)
    if last is None:
        raise DynconvertError(
            "num_classes: the model has no reset_classifier() and no nn.Linear head to replace"
        )
    name, linear = last
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    new = nn.Linear(
        linear.in_features,
        num_classes,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    setattr(parent, name.rpartition(".")[2], new)


def check_head(model: nn.Module, classes: list[str] | None) -> None:
    if classes is None:
        return
    n = model_num_classes(model)
    if n is not None and n != len(classes):
        raise DynconvertError(
            f"data: the model's head has {n} outputs but the data has {len(classes)} classes; "
            f"pass --num-classes {len(classes)} (num_classes=) to reset the head",
            usage=True,
        )


def static_twin(model: nn.Module, *, keep_trained_routers: bool = False) -> nn.Module:
    """A copy of ``model`` whose dynamic convs are plain convs with the mean of their K kernels.

    Each such conv computes what its layer computes under a uniform router, at the static
    cost: for a freshly converted model, the model it came from; for a trained one, the
    function without the per-sample attention. ``keep_trained_routers`` leaves the layers
    whose router has trained (non-zero logit layer) dynamic.
    """
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if not isinstance(module, DynamicConvNd):
            continue
        fc2 = module.attention.fc2
        if keep_trained_routers and (fc2.weight.count_nonzero() or fc2.bias.count_nonzero()):
            continue
        if not name:
            return module.to_conv()
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name), child, module.to_conv())
    return twin


def static_teacher(model: nn.Module) -> nn.Module:
    """A frozen static copy of a freshly converted model: the original model it came from.

    While a dynamic layer's router is still uniform (its logit layer is zero, as
    ``from_conv`` leaves it), the layer computes the conv with the mean of its K kernels, so
    that conv replaces it exactly and the teacher costs what the original cost. Layers
    whose router has already trained stay dynamic (and frozen).
    """
    return static_twin(model, keep_trained_routers=True).eval().requires_grad_(False)


@torch.no_grad()
def to_channels_last(model: nn.Module) -> nn.Module:
    """``channels_last`` for the 4-D parameters and buffers only.

    ``Module.to(memory_format=torch.channels_last)`` fails on the 5-D ``(K, out, in, kh, kw)``
    kernels of dynamic layers; those are mixed per sample before the conv anyway.
    """
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


def clean_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: unwraps ``state_dict``/``model``, strips ``module.``."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DynconvertError("weights: the file does not hold a state dict of tensors")
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_user_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Build ``package.module:function`` and load ``weights`` (a state dict) into it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DynconvertError(f"model: expected package.module:function, got {spec!r}", usage=True)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DynconvertError(f"model: cannot import {spec} ({exc})", usage=True) from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise DynconvertError(f"model: {spec}() returned {type(model).__name__}, not a module")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise DynconvertError(f"weights: {path} does not exist", usage=True)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DynconvertError(f"weights: cannot read {path} ({exc})") from None
        try:
            model.load_state_dict(clean_state_dict(state))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise DynconvertError(
                f"weights: {path} does not fit {spec}: {' '.join(first[:3])}"
            ) from None
    return model
