"""The checked shape arguments of a dynamic conv: what ``nn.ConvNd`` accepts, refused early
with a message that names the argument (``padding`` is resolved in ``padding.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .padding import ntuple


def check_k(k: int) -> int:
    """The number of kernels K: an int >= 1 (a bool is refused, although it is an int)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k}")
    return k


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def conv_geometry(
    dims: int,
    in_channels: int,
    out_channels: int,
    groups: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    dilation: int | Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(kernel_size, stride, dilation)`` as ``dims``-tuples, after checking every argument."""
    _positive_int("in_channels", in_channels)
    _positive_int("out_channels", out_channels)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    if in_channels % groups:
        raise ValueError(f"in_channels: {in_channels} is not divisible by groups={groups}")
    if out_channels % groups:
        raise ValueError(f"out_channels: {out_channels} is not divisible by groups={groups}")
    shapes = {
        "kernel_size": ntuple(kernel_size, dims, "kernel_size"),
        "stride": ntuple(stride, dims, "stride"),
        "dilation": ntuple(dilation, dims, "dilation"),
    }
    for name, value in shapes.items():
        if any(v < 1 for v in value):
            raise ValueError(f"{name}: must be positive, got {value}")
    return shapes["kernel_size"], shapes["stride"], shapes["dilation"]


def is_unbatched(x: torch.Tensor, dims: int, in_channels: int, layer_name: str) -> bool:
    """Whether ``x`` is one unbatched sample, after checking its rank and channels."""
    if x.dim() not in (dims + 1, dims + 2):
        raise ValueError(
            f"input: {layer_name} expects a {dims + 2}-D (batched) or {dims + 1}-D "
            f"(unbatched) tensor, got shape {tuple(x.shape)}"
        )
    unbatched = x.dim() == dims + 1
    channels = x.shape[0] if unbatched else x.shape[1]
    if channels != in_channels:
        raise ValueError(
            f"input: expected {in_channels} channels, got {channels} (shape {tuple(x.shape)})"
        )
    return unbatched
