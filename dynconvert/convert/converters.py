"""Registry of exact converters: conv type → function building its dynamic counterpart.

Only *exact* types are looked up (``type(conv) is key``): a subclass may override
``forward`` and compute something else, so it is skipped unless registered here itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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

Converter = Callable[[nn.Module, ConvertConfig, "torch.Generator | None"], DynamicConvNd]

_CONVERTERS: dict[type[nn.Module], Converter] = {}
_CARRIED: dict[type[nn.Module], tuple[str, ...]] = {}
PLAIN_CONV_PARAMETERS = ("weight", "bias")


def register_converter(
    conv_type: type[nn.Module],
    converter: Converter,
    *,
    carries: tuple[str, ...] = ("weight", "bias"),
) -> None:
    """Register ``converter`` for modules whose type is exactly ``conv_type``.

    The converter must return a module that computes exactly what the conv computes (until
    it is trained); the equality tests rely on it. ``carries`` names the parameters it
    takes over; a conv with any other parameter is left static.
    """
    _CONVERTERS[conv_type] = converter
    _CARRIED[conv_type] = tuple(carries)


def converter_for(module: nn.Module) -> Converter | None:
    return _CONVERTERS.get(type(module))


def carried_parameters(module: nn.Module) -> tuple[str, ...]:
    """The parameter names the registered converter of ``module`` takes over."""
    return _CARRIED.get(type(module), PLAIN_CONV_PARAMETERS)


@torch.no_grad()
def seed_router(layer: DynamicConvNd, generator: torch.Generator | None) -> None:
    """Redraw the router's first layer (``nn.Linear``'s init) from ``generator``.

    ``from_conv`` initialises it from the global RNG; drawing it here makes a conversion
    depend on ``ConvertConfig.seed`` only. The logit layer stays zero (uniform attention).
    """
    fc1 = layer.attention.fc1
    if fc1.weight.is_meta:
        return  # nothing to draw into; the real weights come with load_state_dict
    # Drawn on the generator's device (CPU) and copied: a CPU generator cannot fill a CUDA
    # tensor, and the same seed then gives the same router on every device.
    where = generator.device if generator is not None else torch.device("cpu")
    weight = torch.empty(fc1.weight.shape, dtype=fc1.weight.dtype, device=where)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    fc1.weight.copy_(weight)
    if fc1.bias is not None:
        bound = 1 / math.sqrt(fc1.in_features)
        bias = torch.empty(fc1.bias.shape, dtype=fc1.bias.dtype, device=where)
        fc1.bias.copy_(nn.init.uniform_(bias, -bound, bound, generator=generator))


def _from_conv(layer_type: type[DynamicConvNd]) -> Converter:
    def convert(conv: nn.Module, config: ConvertConfig, generator: torch.Generator | None):
        layer = layer_type.from_conv(
            conv,
            config.k,
            ratio=config.ratio,
            temperature=config.temperature,
            noise=config.noise,
            strategy=config.strategy,
            generator=generator,
        )
        seed_router(layer, generator)
        return layer

    convert.__name__ = f"to_{layer_type.__name__}"
    return convert


register_converter(nn.Conv1d, _from_conv(DynamicConv1d))
register_converter(nn.Conv2d, _from_conv(DynamicConv2d))
register_converter(nn.Conv3d, _from_conv(DynamicConv3d))

try:  # timm is a dependency, but the layers must not need it
    from timm.layers import Conv2dSame as _TimmConv2dSame
    from timm.layers import std_conv as _timm_std_conv
except ImportError:  # pragma: no cover
    _TimmConv2dSame = _timm_std_conv = None
if _TimmConv2dSame is not None:
    register_converter(_TimmConv2dSame, _from_conv(DynamicConv2dSame))
if _timm_std_conv is not None:
    # Weight-standardized convs (BiT ResNetV2, NF-ResNet, NFNet, ViT hybrids): exact types
    # only, as for every converter; a later subclass stays static with its reason.
    register_converter(_timm_std_conv.StdConv2d, _from_conv(DynamicStdConv2d))
    register_converter(_timm_std_conv.StdConv2dSame, _from_conv(DynamicStdConv2d))
    for _scaled in (_timm_std_conv.ScaledStdConv2d, _timm_std_conv.ScaledStdConv2dSame):
        register_converter(
            _scaled, _from_conv(DynamicStdConv2d), carries=("weight", "bias", "gain")
        )
