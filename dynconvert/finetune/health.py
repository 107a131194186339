"""Attention health: how the routers of the dynamic layers spread their weight over K kernels.

A routing hook on each dynamic layer (its router's ``(B, K)`` weights, e.g. the softmax of
Chen et al., CVPR 2020, eq. 3, read as each kernel's share of the mix by the router's
``kernel_shares``) accumulates the mean attention entropy and each kernel's mean share. A
kernel whose share falls far below ``1/K`` is effectively unused: its parameters cost memory
and time but add no capacity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import DynconvertError
from ..layers import DynamicConvNd

UNUSED_FRACTION = 0.1  # a kernel below 10% of the uniform share 1/K counts as unused


class AttentionMonitor:
    """Collects per-layer attention statistics while it is :meth:`attach`-ed."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, DynamicConvNd)}
        self._handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self._entropy = {name: 0.0 for name in self.layers}
        self._share = {name: None for name in self.layers}
        self._count = dict.fromkeys(self.layers, 0)

    def attach(self) -> AttentionMonitor:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_routing_hook(self._hook(name, layer)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> AttentionMonitor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _hook(self, name: str, layer: DynamicConvNd):
        def record(weights: torch.Tensor) -> None:
            attn = layer.router.kernel_shares(weights.detach().float())
            entropy = -(attn * attn.clamp_min(1e-12).log()).sum(dim=1)
            self._entropy[name] += entropy.sum().item()
            share = attn.sum(dim=0).cpu()
            self._share[name] = share if self._share[name] is None else self._share[name] + share
            self._count[name] += attn.shape[0]

        return record

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{layer: {"entropy", "max_entropy", "shares", "unused"}}`` (entropy in nats)."""
        out = {}
        for name, layer in self.layers.items():
            n = self._count[name]
            if n == 0:
                continue
            shares = (self._share[name] / n).tolist()
            out[name] = {
                "entropy": self._entropy[name] / n,
                "max_entropy": math.log(layer.k),
                "shares": shares,
                "unused": [i for i, s in enumerate(shares) if s < UNUSED_FRACTION / layer.k],
            }
        return out


def mean_entropy(summary: dict[str, dict[str, Any]]) -> float | None:
    if not summary:
        return None
    return sum(v["entropy"] for v in summary.values()) / len(summary)


def unused_warnings(summary: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"{name}: kernel(s) {', '.join(map(str, v['unused']))} unused "
        f"(share < {UNUSED_FRACTION:.0%} of 1/K)"
        for name, v in summary.items()
        if v["unused"]
    ]


def first_non_finite(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, else None (one host
    sync for the whole model)."""
    named = list(model.named_parameters())
    if not named:
        return None
    finite = torch.stack([torch.isfinite(p).all() for _, p in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def non_finite_error(
    what: str, epoch: int, iteration: int, last_checkpoint: str | None
) -> DynconvertError:
    """The one line that stops a run whose loss or weights went non-finite."""
    kept = (
        f"last good checkpoint kept: {last_checkpoint}"
        if last_checkpoint
        else "no checkpoint was written"
    )
    return DynconvertError(
        f"{what} at epoch {epoch + 1}, iteration {iteration}; stopped ({kept}). "
        "Lower the lr or set clip_grad_norm"
    )
