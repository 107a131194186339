"""Dynamic convolution with TensorFlow-style 'SAME' padding, computed from each input's size.

timm's ``Conv2dSame`` (used by the ``tf_*`` ports of EfficientNet, MobileNetV3 ...) pads the
input asymmetrically at run time so that ``out = ceil(in / stride)``, then runs a conv with no
padding. :class:`DynamicConv2dSame` does the same before the dynamic conv (Chen et al.,
CVPR 2020), so converting a ``Conv2dSame`` is exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dynamic_conv import DynamicConv2d


def _timm_conv2d_same() -> type[nn.Conv2d]:
    # timm on first use: it takes seconds to import, and `import dynconvert` loads the layers.
    from timm.layers import Conv2dSame

    return Conv2dSame


def same_pad_amount(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding TF's 'SAME' adds to one dimension: ``out = ceil(size / stride)``."""
    out = -(-size // stride)
    return torch.sym_max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_tf_same(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Pad ``x`` as timm's ``pad_same`` does: TF 'SAME', the odd pixel on the bottom/right."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    pad_h = same_pad_amount(x.shape[-2], kh, sh, dh)
    pad_w = same_pad_amount(x.shape[-1], kw, sw, dw)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class DynamicConv2dSame(DynamicConv2d):
    """``DynamicConv2d`` that pads like timm's ``Conv2dSame`` (TF 'SAME', decided per input).

    The conv itself has no padding; the router pools the unpadded input, as it would for the
    static conv's input.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding != (0, 0) or self.padding_mode != "zeros":
            raise ValueError("padding: DynamicConv2dSame computes its own padding; pass 0")

    @classmethod
    def _target_for(cls, conv: nn.Module) -> type[DynamicConv2dSame]:
        """timm's ``Conv2dSame`` (or a subclass that keeps its forward) only: anything else
        pads otherwise (``nn.Conv2d``) or changes the kernel first (``StdConv2dSame``)."""
        if not isinstance(conv, nn.Conv2d) or type(conv).forward is not _timm_conv2d_same().forward:
            raise TypeError(
                f"conv: expected timm's Conv2dSame (or a subclass that keeps its forward), "
                f"got {type(conv).__name__}"
            )
        return cls

    @classmethod
    def _arguments_of(cls, conv: nn.Module) -> dict[str, Any]:
        """``Conv2dSame.forward`` ignores ``padding`` and ``padding_mode``: not copied."""
        return {**super()._arguments_of(conv), "padding": 0, "padding_mode": "zeros"}

    def _static_conv(self, **factory: Any) -> nn.Module:
        return _timm_conv2d_same()(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            0,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
            **factory,
        )

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """timm's dynamic 'same' padding, computed from this input's size."""
        return pad_tf_same(x, self.kernel_size, self.stride, self.dilation)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding='tf_same'"
