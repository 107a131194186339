"""A model in one training mode for a block, every module's own flag given back after.

``model.train(mode)`` sets every submodule; a model may hold a mix (a frozen BatchNorm in
eval inside a model in training), which a plain ``model.train(previous)`` would lose.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def training_mode(model: nn.Module, mode: bool) -> Iterator[nn.Module]:
    flags = [(module, module.training) for module in model.modules()]
    model.train(mode)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
