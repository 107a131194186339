"""Registry of dynamic-conv variants: name → how to build its router and start it exactly.

A variant pairs a router class (:class:`~dynconvert.layers.Router`) with a start function
(:data:`~dynconvert.layers.StartFn`) that sets the K kernels so that, under the router's start
weights, the layer computes exactly the conv it replaces. ``ConvertConfig.variant`` names one;
saved files record it, and loading rebuilds the same variant. ``"dy"`` is Chen et al.'s
dynamic convolution (CVPR 2020): a softmax router, K zero-sum perturbed copies of the kernel.

A variant registered from outside the package (``register_variant(Variant(...))``) converts,
saves, loads and fine-tunes with no other change.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..layers import DynamicConvNd, Router, SoftmaxRouter, StartFn

DEFAULT_VARIANT = "dy"


@dataclass(frozen=True)
class Variant:
    """One kind of dynamic convolution.

    * ``router``: the router class, built as ``router(in_channels, k, ratio, temperature,
      device=, dtype=)``;
    * ``start``: the exact start, ``start(layer, conv, noise, generator)``; None is the layer's
      own :meth:`~dynconvert.layers.DynamicConvNd.start_from` (right for a softmax router).
    """

    name: str
    router: type[Router]
    start: StartFn | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        if not (isinstance(self.router, type) and issubclass(self.router, Router)):
            raise TypeError(f"router: expected a Router subclass, got {self.router!r}")


_VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> None:
    """Register ``variant`` under its name (a second registration of a name replaces it)."""
    if not isinstance(variant, Variant):
        raise TypeError(f"variant: expected a Variant, got {type(variant).__name__}")
    _VARIANTS[variant.name] = variant


def variant_names() -> tuple[str, ...]:
    return tuple(_VARIANTS)


def variant_named(name: str) -> Variant:
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"variant: expected one of {', '.join(_VARIANTS)}, got {name!r}") from None


def variant_of(layer: nn.Module) -> str | None:
    """The name of the registered variant whose router ``layer`` has, else None."""
    if not isinstance(layer, DynamicConvNd):
        return None
    return next((v.name for v in _VARIANTS.values() if type(layer.router) is v.router), None)


register_variant(
    Variant(
        DEFAULT_VARIANT,
        SoftmaxRouter,
        summary="softmax over K kernels at a temperature (Chen et al., CVPR 2020)",
    )
)
