"""Context managers that put a model in its export state and restore it afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from torch import nn

from ..engine import autotune
from ..layers import DynamicConvNd
from ..modes import training_mode


def eval_mode(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """``model.eval()`` for the block; every module's own training flag is restored after."""
    return training_mode(model, False)


@contextmanager
def static_strategy(model: nn.Module) -> Iterator[nn.Module]:
    """Every dynamic conv on its ``'static'`` path for the block, whatever it was set to.

    ``'auto'`` already picks ``'static'`` under ``torch.jit.trace`` and ``torch.export``; a
    layer forced to ``'grouped'`` would bake the export batch size into the conv's ``groups``.
    """
    layers = [m for m in model.modules() if isinstance(m, DynamicConvNd)]
    saved = [layer.strategy for layer in layers]
    for layer in layers:
        layer.strategy = "static"
    try:
        yield model
    finally:
        for layer, strategy in zip(layers, saved, strict=True):
            layer.strategy = strategy


@contextmanager
def any_batch_size(model: nn.Module) -> Iterator[nn.Module]:
    """Layers forced to ``'dense'`` (batch 1 only) choose their strategy for the block.

    The probe and the verification run the model at several batch sizes; the export itself
    is on the static path anyway.
    """
    layers = [m for m in model.modules() if isinstance(m, DynamicConvNd) and m.strategy == "dense"]
    for layer in layers:
        layer.strategy = "auto"
    try:
        yield model
    finally:
        for layer in layers:
            layer.strategy = "dense"


@contextmanager
def fixed_strategy_choice() -> Iterator[None]:
    """``'auto'`` layers use the cost model instead of timing strategies, for the block.

    Verification runs each batch size once: measuring every strategy for every new input
    shape would cost more than the check, and all strategies compute the same function.
    """
    enabled = autotune.autotune_enabled()
    autotune.set_autotune(False)
    try:
        yield
    finally:
        autotune.set_autotune(enabled)
