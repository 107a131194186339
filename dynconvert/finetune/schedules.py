"""Per-iteration schedules: cosine learning rate with linear warm-up, and the router temperature.

Both are pure functions of the global iteration, so a resumed run recomputes exactly the
values an uninterrupted run would have used.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import DynamicConvNd


def cosine_warmup_factor(iteration: int, total: int, warmup: int, min_factor: float = 0.0) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based, before the step is taken).

    Linear warm-up from ``1/warmup`` to 1 over ``warmup`` iterations, then half a cosine down
    to ``min_factor`` at ``total`` (Loshchilov & Hutter, SGDR, 2017; Goyal et al., 2017).
    """
    if warmup > 0 and iteration < warmup:
        return (iteration + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (iteration - warmup) / span)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_warmup_scheduler(
    optimizer: torch.optim.Optimizer, total: int, warmup: int, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per iteration; every param group keeps its own base lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: cosine_warmup_factor(it, total, warmup, min_factor)
    )


class TemperatureSchedule:
    """Linear anneal of the routers' softmax temperature, per iteration.

    Chen et al. (CVPR 2020, §3.3) start near-uniform attention with a high temperature (30)
    so all K kernels are trained early, then lower it to 1. ``start=None`` disables it.
    """

    def __init__(self, start: float | None, end: float, iterations: int) -> None:
        self.start, self.end, self.iterations = start, end, max(1, iterations)

    @property
    def enabled(self) -> bool:
        return self.start is not None

    def value(self, iteration: int) -> float | None:
        if self.start is None:
            return None
        progress = min(1.0, iteration / self.iterations)
        return self.start + (self.end - self.start) * progress

    def apply(self, model: nn.Module, iteration: int) -> float | None:
        """Set the temperature of every dynamic layer; returns the value (None if disabled)."""
        value = self.value(iteration)
        if value is not None:
            for layer in dynamic_layers(model):
                layer.set_temperature(value)
        return value

    def state_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "iterations": self.iterations}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.end = state["start"], state["end"]
        self.iterations = max(1, int(state["iterations"]))

    def describe(self) -> str:
        if self.start is None:
            return "no temperature schedule"
        return f"temperature {self.start:g} -> {self.end:g} over {self.iterations} iterations"


def dynamic_layers(model: nn.Module) -> list[DynamicConvNd]:
    return [m for m in model.modules() if isinstance(m, DynamicConvNd)]


def current_temperature(model: nn.Module) -> float | None:
    """The temperature of the first dynamic layer that has one (None: no such layer)."""
    layer = next((m for m in dynamic_layers(model) if m.has_temperature), None)
    return None if layer is None else layer.temperature
