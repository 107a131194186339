"""The router of a dynamic convolution: one softmax over K kernels per sample.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020, §3.2:
global average pool → FC (reduce) → ReLU → FC (K logits) → softmax(logits / temperature).

Unlike the paper's squeeze-and-excitation branch there is no BatchNorm, so batch size 1
trains and eval equals train mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_width(in_channels: int, ratio: float, min_width: int = 4) -> int:
    """Router width: ``ratio`` of the input channels, never below ``min_width``."""
    return max(min_width, round(in_channels * ratio))


class KernelAttention(nn.Module):
    """Maps an input batch ``(B, C, *spatial)`` to kernel weights ``(B, K)`` that sum to 1.

    ``temperature`` is a buffer, so it is saved with the model and can be annealed by a
    schedule from outside (see :meth:`set_temperature`).
    """

    def __init__(
        self,
        in_channels: int,
        k: int,
        ratio: float = 0.25,
        temperature: float = 1.0,
        *,
        min_width: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not ratio > 0:
            raise ValueError(f"ratio: must be > 0, got {ratio!r}")
        factory = {"device": device, "dtype": dtype}
        hidden = attention_width(in_channels, ratio, min_width)
        self.fc1 = nn.Linear(in_channels, hidden, **factory)
        self.fc2 = nn.Linear(hidden, k, **factory)
        self.register_buffer("temperature", torch.empty((), **factory))
        self.set_temperature(temperature)
        self.reset_router()

    @torch.no_grad()
    def reset_router(self) -> None:
        """Zero the logit layer: attention becomes exactly uniform (1/K each)."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    @torch.no_grad()
    def set_temperature(self, value: float) -> None:
        value = float(value)
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"temperature: must be a finite number > 0, got {value!r}")
        stored = torch.tensor(value, dtype=self.temperature.dtype)
        if not (stored > 0 and torch.isfinite(stored)):
            raise ValueError(
                f"temperature: {value!r} is {stored.item()} in {self.temperature.dtype}; "
                "pick a value that dtype can hold"
            )
        self.temperature.fill_(value)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=tuple(range(2, x.dim())))
        return self.fc2(F.relu(self.fc1(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x) / self.temperature, dim=1)
