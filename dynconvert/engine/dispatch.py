"""The engine's entry point: pick a strategy for a call and run it, under the memory-lean
backward where autograd records."""

from __future__ import annotations

import torch

from . import autotune
from .context import func_transforms_active, graph_capture, recording
from .lean_backward import backward_kind, lean_backward_enabled, lean_forward
from .spec import DynamicConvSpec
from .strategies import STRATEGIES


def select_strategy(layer: DynamicConvSpec, x: torch.Tensor) -> str:
    """The ``'auto'`` choice: the layer's forced strategy, else one picked by shape and mode."""
    if func_transforms_active() and layer.strategy != "static":
        # vmap cannot batch what loop, dense and packed read on the host (attention values,
        # data pointers) nor unfold's in-place writes; grouped is the same function in pure
        # tensor ops, and a timing on wrapped tensors would mean nothing.
        return "grouped"
    if layer.strategy != "auto":
        return layer.strategy
    # A branch on the batch size would bake the export batch into the graph.
    if graph_capture():
        return "static"
    return autotune.choose(layer, x, STRATEGIES)


def run(layer: DynamicConvSpec, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The layer's conv output for the padded input ``x`` and attention ``(B, K)``.

    While autograd records, every strategy but ``static`` (whose graph holds no mixed
    kernels, and which export traces) runs under the memory-lean backward, unless it is
    switched off or ``torch.func`` transforms run (then autograd records the strategy itself).
    """
    name = select_strategy(layer, x)
    records = recording(x, layer.weight, attn, layer.bias)
    if name == "packed" and records:
        name = "loop"  # the same convs; packing pays only while the kernels stay fixed
    strategy = STRATEGIES[name]
    lean = (
        records
        and lean_backward_enabled()
        and name != "static"
        and not graph_capture()
        and not torch.compiler.is_compiling()
        and not func_transforms_active()  # torch.func differentiates the strategy itself
    )
    if lean:
        return lean_forward(layer, x, attn, strategy, backward_kind(layer, name))
    return strategy(layer, x, attn)
