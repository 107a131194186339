"""Registry of source layers: conv type → the dynamic layer class that rebuilds it exactly.

Only *exact* types are looked up (``type(conv) is key``): a subclass may override
``forward`` and compute something else, so it is skipped unless registered here itself.
Which router and start the layer gets is the variant's business (``variants.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import (
    DynamicConv1d,
    DynamicConv2d,
    DynamicConv2dSame,
    DynamicConv3d,
    DynamicConvNd,
    DynamicStdConv2d,
)
from .config import ConvertConfig
from .variants import variant_named

Converter = Callable[[nn.Module, ConvertConfig, "torch.Generator | None"], DynamicConvNd]

PLAIN_CONV_PARAMETERS = ("weight", "bias")


@dataclass(frozen=True)
class SourceLayer:
    """A conv type and the dynamic layer class whose ``from_conv`` rebuilds it exactly.

    ``carries`` names the conv's parameters the dynamic layer takes over; a conv with any
    other parameter is left static.
    """

    conv_type: type[nn.Module]
    dynamic_type: type[DynamicConvNd]
    carries: tuple[str, ...] = PLAIN_CONV_PARAMETERS

    def build(
        self, conv: nn.Module, config: ConvertConfig, generator: torch.Generator | None
    ) -> DynamicConvNd:
        """The dynamic layer of ``config.variant`` that computes exactly what ``conv`` does.

        The kernels are drawn from ``generator`` first, then the router's non-final layers
        (``from_conv`` drew them from the global RNG), so a conversion depends on
        ``ConvertConfig.seed`` only.
        """
        variant = variant_named(config.variant)
        layer = self.dynamic_type.from_conv(
            conv,
            config.k,
            ratio=config.ratio,
            temperature=config.temperature,
            noise=config.noise,
            strategy=config.strategy,
            generator=generator,
            router=variant.router,
            start=variant.start,
        )
        layer.router.seed(generator)
        return layer


_SOURCE_LAYERS: dict[type[nn.Module], SourceLayer] = {}


def register_source_layer(
    conv_type: type[nn.Module],
    dynamic_type: type[DynamicConvNd],
    *,
    carries: tuple[str, ...] = PLAIN_CONV_PARAMETERS,
) -> None:
    """Convert modules whose type is exactly ``conv_type`` with ``dynamic_type.from_conv``.

    ``from_conv`` must return a layer that computes exactly what the conv computes (until it
    is trained); the equality tests rely on it.
    """
    _SOURCE_LAYERS[conv_type] = SourceLayer(conv_type, dynamic_type, tuple(carries))


def source_layer_for(module: nn.Module) -> SourceLayer | None:
    return _SOURCE_LAYERS.get(type(module))


def converter_for(module: nn.Module) -> Converter | None:
    """What builds the dynamic counterpart of ``module``, or None when nothing can."""
    source = source_layer_for(module)
    return None if source is None else source.build


def carried_parameters(module: nn.Module) -> tuple[str, ...]:
    """The parameter names the dynamic counterpart of ``module`` takes over."""
    source = source_layer_for(module)
    return PLAIN_CONV_PARAMETERS if source is None else source.carries


register_source_layer(nn.Conv1d, DynamicConv1d)
register_source_layer(nn.Conv2d, DynamicConv2d)
register_source_layer(nn.Conv3d, DynamicConv3d)

try:  # timm is a dependency, but the layers must not need it
    from timm.layers import Conv2dSame as _TimmConv2dSame
    from timm.layers import std_conv as _timm_std_conv
except ImportError:  # pragma: no cover
    _TimmConv2dSame = _timm_std_conv = None
if _TimmConv2dSame is not None:
    register_source_layer(_TimmConv2dSame, DynamicConv2dSame)
if _timm_std_conv is not None:
    # Weight-standardized convs (BiT ResNetV2, NF-ResNet, NFNet, ViT hybrids): exact types
    # only, as for every source layer; a later subclass stays static with its reason.
    register_source_layer(_timm_std_conv.StdConv2d, DynamicStdConv2d)
    register_source_layer(_timm_std_conv.StdConv2dSame, DynamicStdConv2d)
    for _scaled in (_timm_std_conv.ScaledStdConv2d, _timm_std_conv.ScaledStdConv2dSame):
        register_source_layer(_scaled, DynamicStdConv2d, carries=("weight", "bias", "gain"))
