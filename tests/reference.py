"""The float64 reference of a dynamic conv, written once for every test that needs it.

Each sample's kernel is mixed explicitly from the layer's routing weights and applied by
PyTorch's own ``nn.ConvNd._conv_forward`` (its padding code, every padding mode), one sample at
a time. Differentiable w.r.t. the layer's parameters and ``x``; pass a float64 copy of the layer
(:func:`float64_reference`) for the reference numbers themselves.
"""

from __future__ import annotations

import copy

import torch

from dynconvert.layers import DynamicConvNd


def per_sample_reference(layer: DynamicConvNd, x: torch.Tensor) -> torch.Tensor:
    """``y_b = conv(x_b, Σ_k a_bk W_k) + Σ_k a_bk b_k``, computed sample by sample."""
    attn = layer.routing(x)
    conv = type(layer).conv_type(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        bias=False,
        padding_mode=layer.padding_mode,
        device=x.device,
        dtype=x.dtype,
    )
    outs = []
    for b in range(x.shape[0]):
        weight = torch.einsum("k,k...->...", attn[b], layer.weight)
        bias = None if layer.bias is None else attn[b] @ layer.bias
        outs.append(conv._conv_forward(x[b : b + 1], weight, bias))
    return torch.cat(outs)


def float64_reference(layer: DynamicConvNd, x: torch.Tensor) -> torch.Tensor:
    """:func:`per_sample_reference` of a float64 copy of ``layer`` (no autograd)."""
    with torch.no_grad():
        return per_sample_reference(copy.deepcopy(layer).double(), x.double())
