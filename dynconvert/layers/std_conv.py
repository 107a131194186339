"""Dynamic convolution over weight-standardized kernels (timm's StdConv2d family).

Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization
and Weight Standardization", arXiv:1903.10520, 2019) normalises each output channel's kernel
to zero mean and unit (biased) variance in every forward; the scaled form of the NFNets
(Brock et al., "Characterizing signal propagation to close the performance gap in
unnormalized ResNets", ICLR 2021) multiplies it by ``gain · gamma / sqrt(fan_in)``. Here each
sample's kernel is first mixed from K kernels (Chen et al., "Dynamic Convolution: Attention
over Convolution Kernels", CVPR 2020), then standardized as the source layer does.

Standardization ignores a constant added to one channel of the kernel, so every one of the K
kernels is centred per output channel first: the mix of centred kernels is the centred mixed
kernel. Its variance for sample b and channel o is ``a_bᵀ G_o a_b / n``, with ``G_o`` the K×K
Gram matrix of the centred kernels of channel o and ``n = in/groups · |kernel|``, so

    y_b,o = s_b,o · conv(x_b, Σ_k a_bk W'_k)_o + Σ_k a_bk c_k,o,
    s_b,o = gain_o · scale / sqrt(var_b,o + eps)   (StdConv: 1 / sqrt(var_b,o + eps)).

The conv part is that of a plain dynamic conv over the centred kernels, so every forward
strategy (and the memory-lean backward) runs it unchanged; only the per-(sample, channel)
factor and the mixed bias are applied afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import engine
from ..engine import mix_bias
from .conv2d_same import pad_tf_same
from .dynamic_conv import DynamicConv2d

_STD_TYPES = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def _timm_std_conv_types() -> dict[str, type[nn.Module]]:
    # timm on first use: it takes seconds to import, and `import dynconvert` loads the layers.
    from timm.layers import std_conv

    return {name: getattr(std_conv, name) for name in _STD_TYPES}


class _CentredKernels:
    """The layer as the engine sees it (``engine.DynamicConvSpec``): the centred kernels as
    ``weight`` and no bias.

    Everything else (geometry, strategy, conv function) is the layer's own. ``weight`` is a
    tensor computed in this forward, not a parameter, so ``packed`` (whose packed kernels are
    cached per parameter) runs as ``loop`` (see ``engine/prepacked.py``, ``usable``).
    """

    def __init__(self, layer: DynamicStdConv2d, weight: torch.Tensor) -> None:
        self.layer = layer
        self.weight = weight
        self.bias = None

    def __getattr__(self, name: str) -> Any:
        if name == "layer":  # a copy being built, before its __dict__ is set: no recursion
            raise AttributeError(name)
        return getattr(self.layer, name)


class DynamicStdConv2d(DynamicConv2d):
    """``DynamicConv2d`` whose per-sample kernels are weight-standardized, as timm's
    ``StdConv2d``/``StdConv2dSame`` (``gamma=None``) and ``ScaledStdConv2d``/
    ``ScaledStdConv2dSame`` (``gamma`` given: a ``gain`` parameter ``(out, 1, 1, 1)`` and
    ``scale = gamma / sqrt(fan_in)``) standardize their kernel.

    ``eps`` is added to the variance, as in ``F.batch_norm``. ``same_pad=True`` pads each input
    TF-'SAME' at run time (timm's ``same_pad``; ``padding`` must then be 0). The padding mode is
    always zeros: timm's forward ignores ``padding_mode``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        eps: float = 1e-6,
        gamma: float | None = None,
        same_pad: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            **kwargs,
        )  # fmt: skip
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
        if same_pad and self._resolved.conv_padding != (0, 0):
            raise ValueError("padding: same_pad=True computes its own padding; pass 0")
        self.eps = float(eps)
        self.same_pad = bool(same_pad)
        self.scale: float | None = None
        self.gain: nn.Parameter | None = None
        if gamma is not None:
            self.scale = float(gamma) * self.weight[0, 0].numel() ** -0.5
            factory = {"device": self.weight.device, "dtype": self.weight.dtype}
            self.gain = nn.Parameter(torch.ones((out_channels, 1, 1, 1), **factory))

    # -- construction -------------------------------------------------------------------

    @classmethod
    def _target_for(cls, conv: nn.Module) -> type[DynamicStdConv2d]:
        """One of timm's four weight-standardized convs, with its own forward: a subclass that
        overrides ``forward`` computes something else and is refused."""
        _std_kind(conv)
        return cls

    @classmethod
    def _arguments_of(cls, conv: nn.Module) -> dict[str, Any]:
        """The geometry plus ``eps``, the scaled form and the 'SAME' padding behaviour (timm's
        forward ignores ``padding_mode``, so it is not copied)."""
        kind = _std_kind(conv)
        return {
            **super()._arguments_of(conv),
            "padding_mode": "zeros",
            "eps": conv.eps,
            "gamma": 1.0 if kind.startswith("Scaled") else None,
            "same_pad": kind.endswith("Same") and bool(conv.same_pad),
        }

    @torch.no_grad()
    def _carry_from(self, conv: nn.Module) -> None:
        """The scaled form's exact ``scale`` and its trained ``gain``."""
        if self.gain is not None:
            self.scale = float(conv.scale)
            self.gain.copy_(conv.gain.detach().reshape(self.gain.shape))
            self.gain.requires_grad_(conv.gain.requires_grad)

    @torch.no_grad()
    def to_conv(self) -> nn.Module:
        """timm's conv that this layer computes under constant routing (the router's start).

        A ``*Same`` type when ``same_pad`` is set, else the plain type with this padding (a
        ``StdConv2dSame`` whose 'SAME' padding was static computes the same as a ``StdConv2d``).
        """
        types = _timm_std_conv_types()
        name = ("Scaled" if self.gain is not None else "") + "StdConv2d"
        name += "Same" if self.same_pad else ""
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        padding = "SAME" if self.same_pad else self.padding
        conv = types[name](
            self.in_channels, self.out_channels, self.kernel_size, self.stride, padding,
            self.dilation, self.groups, bias=self.bias is not None, eps=self.eps, **factory,
        )  # fmt: skip
        if self.same_pad:  # dynamic, whatever timm would decide from the geometry
            conv.same_pad, conv.padding = True, (0, 0)
        self.copy_constant_mix(conv)
        if self.gain is not None:
            conv.scale = self.scale
            conv.gain.copy_(self.gain)
        return conv.train(self.training)

    # -- forward ------------------------------------------------------------------------

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            return pad_tf_same(x, self.kernel_size, self.stride, self.dilation)
        return super().pad_input(x)

    def centred_kernels(self) -> torch.Tensor:
        """The K kernels, each output channel's mean removed: ``(K, out, in/groups, kh, kw)``."""
        return self.weight - self.weight.mean(dim=(2, 3, 4), keepdim=True)

    def output_scale(self, centred: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``(B, out)``: the factor that standardizes each sample's mixed kernel, per channel.

        Computed in the kernels' dtype even under autocast: a bf16 Gram matrix would lose
        the variance's leading digits.
        """
        device_type = centred.device.type
        with torch.autocast(device_type, enabled=False):
            flat = centred.flatten(2).transpose(0, 1)  # (out, K, n)
            gram = flat @ flat.transpose(1, 2)  # (out, K, K)
            a = attn.to(centred.dtype)
            # (out, B, K) · a summed over K: a_bᵀ G_o a_b for every sample and channel
            variance = (torch.matmul(a, gram) * a).sum(-1).t() / flat.shape[-1]
            factor = torch.rsqrt(variance + self.eps)
            if self.gain is not None:
                factor = factor * (self.gain * self.scale).view(1, -1)
        return factor

    def conv_output(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        centred = self.centred_kernels()
        out = engine.run(_CentredKernels(self, centred), x, attn)
        factor = self.output_scale(centred, attn).to(out.dtype)
        out = out * factor.view(*factor.shape, 1, 1)
        bias = mix_bias(self.bias, attn)
        if bias is not None:
            out = out + bias.to(out.dtype).view(*bias.shape, 1, 1)
        return out

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", eps={self.eps}"
        if self.gain is not None:
            s += f", scale={self.scale:.6g}"
        if self.same_pad:
            s += ", padding='tf_same'"
        return s


def _std_kind(conv: nn.Module) -> str:
    """Which of timm's four standardized convs ``conv`` computes as (its type name)."""
    for name, conv_type in _timm_std_conv_types().items():
        if isinstance(conv, conv_type) and type(conv).forward is conv_type.forward:
            return name
    raise TypeError(
        "conv: expected one of timm's StdConv2d, StdConv2dSame, ScaledStdConv2d, "
        f"ScaledStdConv2dSame (or a subclass that keeps its forward), got {type(conv).__name__}"
    )
