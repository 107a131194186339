"""The shape of a conv's output, and its memory format decided the way ATen decides it for
``nn.ConvNd``."""

from __future__ import annotations

import torch

from .spec import DynamicConvSpec


def output_size(layer: DynamicConvSpec, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Output spatial size of the layer's conv for a (padded) input of size ``spatial``."""
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(
            spatial, layer.conv_padding, layer.dilation, layer.kernel_size, layer.stride,
            strict=True,
        )
    )  # fmt: skip


def _strides_like_channels_last(x: torch.Tensor) -> bool:
    """PyTorch's own test (``is_channels_last_strides_2d/3d``): channels innermost, then the
    spatial dims from last to first, then the batch, by stride order; dense or not."""
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for d in (1, *range(x.dim() - 1, 1, -1), 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:  # N and C share a stride: ambiguous
            return False
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout ``nn.Conv2d/3d`` gives its output: the one ``x.suggest_memory_format()``
    names in ATen (channels-last strides in, channels-last out; a slice of a channels-last
    tensor counts)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    last = formats.get(x.dim())
    if last is None or (x.is_contiguous() and x.stride(1) != 1):  # plain NCHW: the usual case
        return torch.contiguous_format
    if _strides_like_channels_last(x):
        return last
    return torch.contiguous_format
