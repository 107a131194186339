"""What the engine reads from a dynamic conv layer, and the signature of a strategy.

The engine never imports the layers: a layer (``DynamicConvNd``) or a stand-in for one (the
centred-kernel view of ``DynamicStdConv2d``) is anything with these attributes. The engine
only reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DynamicConvSpec(Protocol):
    """A conv with K kernels, mixed per sample: ``y_b = conv(x_b, Σ_k a_bk W_k) + Σ_k a_bk c_k``."""

    @property
    def weight(self) -> torch.Tensor:
        """The K kernels ``(K, out, in/groups, *kernel_size)``."""

    @property
    def bias(self) -> torch.Tensor | None:
        """The K biases ``(K, out)``, or None."""

    @property
    def k(self) -> int: ...

    @property
    def dims(self) -> int:
        """Spatial dimensions: 1, 2 or 3."""

    @property
    def in_channels(self) -> int: ...

    @property
    def out_channels(self) -> int: ...

    @property
    def groups(self) -> int: ...

    @property
    def kernel_size(self) -> tuple[int, ...]: ...

    @property
    def stride(self) -> tuple[int, ...]: ...

    @property
    def conv_padding(self) -> tuple[int, ...]:
        """The symmetric zero padding the conv itself applies (the input comes padded otherwise)."""

    @property
    def dilation(self) -> tuple[int, ...]: ...

    @property
    def conv_fn(self) -> Callable[..., torch.Tensor]:
        """``F.conv1d/2d/3d``: ``conv_fn(x, weight, bias, stride, padding, dilation, groups)``."""

    @property
    def strategy(self) -> str:
        """``'auto'`` or a name in ``STRATEGIES``: the forced strategy."""


#: A strategy: the layer, its padded input ``(B, C, *S)`` and the attention ``(B, K)`` → the
#: conv output ``(B, out, *S')``.
Strategy = Callable[[DynamicConvSpec, torch.Tensor, torch.Tensor], torch.Tensor]
