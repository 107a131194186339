"""Swap modules in place in the module tree, under every name they are registered.

The model keeps its class, methods and attributes; a module registered under two names (or
called twice) is replaced by one dynamic module, so it stays shared.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DynconvertError
from .config import ConvertConfig
from .source_layers import converter_for


def _parent_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) → every (parent, attribute) that holds it."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, attr))
    return slots


def swap_modules(model: nn.Module, replacements: list[tuple[nn.Module, nn.Module]]) -> None:
    """Replace each ``old`` by ``new`` wherever ``old`` is registered under ``model``."""
    slots = _parent_slots(model)
    for old, new in replacements:
        for parent, attr in slots.get(id(old), []):
            setattr(parent, attr, new)


def module_order(model: nn.Module) -> dict[int, int]:
    """id(module) → its position in ``model.named_modules()``: the order kernels are drawn in."""
    return {id(m): i for i, (_, m) in enumerate(model.named_modules())}


def swap_named(model: nn.Module, names: list[str], config: ConvertConfig) -> None:
    """Replace exactly the convs called ``names`` by dynamic layers built with ``config``.

    Used to rebuild a saved model before ``load_state_dict(strict=True)``. The kernels are
    drawn in module order from a generator seeded with ``config.seed``, as :func:`convert`
    draws them, so the same names and config give the same layers as the conversion did.
    """
    targets: dict[int, nn.Module] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise DynconvertError(
                f"module {name!r} not found in {type(model).__name__}; the file was saved from "
                "another architecture"
            ) from exc
        if converter_for(module) is None:
            raise DynconvertError(
                f"module {name!r} is a {type(module).__name__}, which cannot be converted; the "
                "file was saved from another architecture or version"
            )
        targets[id(module)] = module
    order = module_order(model)
    generator = torch.Generator().manual_seed(config.seed)
    replacements = [
        (module, converter_for(module)(module, config, generator))
        for module in sorted(targets.values(), key=lambda m: order[id(m)])
    ]
    swap_modules(model, replacements)
