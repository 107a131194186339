"""The ``unfold`` strategy: im2col plus one batched matrix product per sample.

``y_b = W_b · cols(x_b)`` with the mixed kernel ``W_b`` as an ``(out, in/groups·|k|)``
matrix. A 1×1 conv needs no im2col at all (``cols(x_b)`` is ``x_b`` itself, subsampled by
the stride), and a channels_last input is multiplied from the other side, so that the
output comes out channels_last without a copy. On small maps (ResNet stage 4: 7×7) this
beats the batch-folded grouped conv by up to 2×, because the GEMM has a long inner
dimension instead of B small convolutions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .context import recording
from .layout import output_size
from .mixing import mix_bias, mix_kernels
from .spec import DynamicConvSpec
from .workspace import scratch


def _is_pointwise(layer: DynamicConvSpec) -> bool:
    return all(k == 1 for k in layer.kernel_size) and not any(layer.conv_padding)


def im2col(layer: DynamicConvSpec, x: torch.Tensor, reuse: bool) -> torch.Tensor:
    """``(B, C, *S)`` → ``(B, C·|k|, L)`` columns, channel-major like ``F.unfold``."""
    batch, channels = x.shape[:2]
    n = layer.dims
    if _is_pointwise(layer):
        strided = x[(..., *(slice(None, None, s) for s in layer.stride))]
        return strided.reshape(batch, channels, -1)
    if n == 2 and not reuse:
        return F.unfold(x, layer.kernel_size, layer.dilation, layer.conv_padding, layer.stride)
    if any(layer.conv_padding):
        x = F.pad(x, [p for p in reversed(layer.conv_padding) for _ in range(2)])
    windows = x
    geometry = zip(layer.kernel_size, layer.stride, layer.dilation, strict=True)
    for d, (k, s, dil) in enumerate(geometry):
        windows = windows.unfold(2 + d, dil * (k - 1) + 1, s)  # window appended as last dim
        if dil > 1:
            windows = windows[..., ::dil]
    # (B, C, *L, *k) → (B, C, *k, *L): the column order of F.unfold.
    windows = windows.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    rows = channels * math.prod(layer.kernel_size)
    length = math.prod(windows.shape[2 + n :])
    if reuse:
        cols = scratch("cols", (batch, rows, length), x)
    else:
        cols = x.new_empty((batch, rows, length))
    cols.view(windows.shape).copy_(windows)
    return cols


def supports_col2im(layer: DynamicConvSpec) -> bool:
    return layer.dims <= 2 or _is_pointwise(layer)


def col2im(layer: DynamicConvSpec, cols: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Adjoint of :func:`im2col`: ``(B, C·|k|, L)`` columns summed back into an input ``shape``."""
    if _is_pointwise(layer):
        out_spatial = output_size(layer, tuple(shape[2:]))
        cols = cols.view(*shape[:2], *out_spatial)
        if all(s == 1 for s in layer.stride):
            return cols
        grad = cols.new_zeros(shape)
        grad[(..., *(slice(None, None, s) for s in layer.stride))] = cols
        return grad
    if layer.dims == 1:  # a 1-D conv is a 2-D one on a map of height 1
        (k,), (d,), (p,), (s,) = layer.kernel_size, layer.dilation, layer.conv_padding, layer.stride
        return F.fold(cols, (1, shape[2]), (1, k), (1, d), (0, p), (1, s)).view(shape)
    if layer.dims != 2:
        raise NotImplementedError("col2im: only 1-D, 2-D and 1×1 convolutions")
    return F.fold(
        cols, tuple(shape[2:]), layer.kernel_size, layer.dilation, layer.conv_padding, layer.stride
    )


def unfold_conv(layer: DynamicConvSpec, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    batch, groups = x.shape[0], layer.groups
    out_spatial = output_size(layer, tuple(x.shape[2:]))
    reuse = not recording(x, layer.weight, attn, layer.bias)
    weight = mix_kernels(layer.weight, attn, reuse=reuse)  # (B, O, I/g, *k)
    bias = mix_bias(layer.bias, attn)

    if (
        groups == 1
        and layer.dims == 2
        and _is_pointwise(layer)
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    ):
        # channels_last: (B, L, C) @ (B, C, O) = (B, L, O), i.e. a channels_last output.
        strided = x[:, :, :: layer.stride[0], :: layer.stride[1]]
        rows = strided.permute(0, 2, 3, 1).reshape(batch, -1, layer.in_channels)
        kernel_t = weight.view(batch, layer.out_channels, -1).transpose(1, 2)
        if bias is None:
            out = torch.bmm(rows, kernel_t)
        else:
            out = torch.baddbmm(bias.unsqueeze(1), rows, kernel_t)
        return out.view(batch, *out_spatial, layer.out_channels).permute(0, 3, 1, 2)

    cols = im2col(layer, x, reuse)  # (B, C·|k|, L)
    if groups == 1:
        kernel = weight.view(batch, layer.out_channels, -1)
        if bias is None:
            out = torch.bmm(kernel, cols)
        else:
            out = torch.baddbmm(bias.unsqueeze(-1), kernel, cols)
    else:
        kernel = weight.view(batch, groups, layer.out_channels // groups, -1)
        out = torch.matmul(kernel, cols.view(batch, groups, -1, cols.shape[-1]))
        if bias is not None:
            out = out + bias.view(batch, groups, -1, 1)
    return out.view(batch, layer.out_channels, *out_spatial)
