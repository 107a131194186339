"""The exact start of a dynamic layer: K kernels whose mix is a trained conv's kernel.

A variant's start function (:data:`StartFn`) sets a freshly built layer's kernels so that,
under its router's start weights, the layer computes exactly what the source conv computes.
:meth:`DynamicConvNd.start_from` is the start of a softmax router (uniform 1/K weights): K
zero-sum perturbed copies of the trained kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

#: ``start(layer, conv, noise, generator)``: make ``layer`` compute ``conv`` exactly, with its
#: K kernels perturbed by ``noise`` (relative) drawn from ``generator``.
StartFn = Callable[[nn.Module, nn.Module, float, "torch.Generator | None"], None]


def zero_sum_kernels(
    weight: torch.Tensor, k: int, noise: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """K copies of ``weight`` plus a perturbation that sums to zero over K.

    With a uniform router (its logit layer is zero-initialised), the mixed kernel
    ``Σ_k W_k / K`` is exactly ``weight``, so the converted layer computes the trained conv.
    The copies still differ, so ``∂loss/∂a_k = <∂loss/∂W_mixed, W_k>`` differs over k and the
    router gets a non-zero gradient; identical copies would leave it at exactly zero.

    ``noise`` is relative to the standard deviation of ``weight`` (or of a Kaiming init when
    ``weight`` is constant). The perturbation is drawn on the CPU (float32, or float64 for a
    float64 weight), so it is the same on every device for one generator seed; float32 keeps
    conversion of a ResNet-50 fast, and its rounding is far below the perturbation itself.
    """
    if not noise >= 0:
        raise ValueError(f"noise: must be >= 0, got {noise!r}")
    if weight.is_meta:  # a model built on the meta device to load weights into later
        return weight.detach().unsqueeze(0).expand(k, *weight.shape).clone()
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    base = weight.detach().to("cpu", work)
    std = base.std().item() if base.numel() > 1 else 0.0
    if not math.isfinite(std) or std == 0.0:
        std = 1.0 / math.sqrt(max(1, base[0].numel()))
    perturbation = torch.randn((k, *base.shape), generator=generator, dtype=work)
    perturbation -= perturbation.mean(dim=0, keepdim=True)
    kernels = base.unsqueeze(0) + noise * std * perturbation
    return kernels.to(weight.device, weight.dtype)
