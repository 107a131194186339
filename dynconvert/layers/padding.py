"""Turn ``nn.ConvNd`` padding arguments into an explicit pad plus a conv padding.

``nn.ConvNd`` accepts ints, tuples, ``'same'``/``'valid'`` and four padding modes. Dynamic
convolution runs the conv functionally (sometimes with a batch-folded ``groups``), so every
combination is reduced here once, at construction, to:

* ``conv_padding``: symmetric zero padding handed to ``F.convNd``;
* ``pad``: an explicit ``F.pad`` tuple, used for non-zero modes and for the asymmetric
  padding that ``'same'`` needs with even kernels; ``None`` when not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def ntuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """Expand an int to an ``n``-tuple, or check that a sequence has length ``n``."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a tuple of {n} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * n
    values = tuple(value)
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name}: expected an int or a tuple of {n} ints, got {value!r}")
    return values


@dataclass(frozen=True)
class ResolvedPadding:
    conv_padding: tuple[int, ...]
    pad: tuple[int, ...] | None
    pad_mode: str


def resolve_padding(
    padding: str | int | Sequence[int],
    padding_mode: str,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> ResolvedPadding:
    """Reduce ``padding``/``padding_mode`` to what ``F.pad`` and ``F.convNd`` take."""
    n = len(kernel_size)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding == "valid":
            left = right = (0,) * n
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding: 'same' is not supported for strided convolutions")
            total = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
            # Like PyTorch: the odd pixel of an even kernel goes on the right.
            left = tuple(t // 2 for t in total)
            right = tuple(t - t // 2 for t in total)
        else:
            raise ValueError(
                f"padding: expected 'same', 'valid', an int or a tuple, got {padding!r}"
            )
    else:
        left = right = ntuple(padding, n, "padding")
        if any(p < 0 for p in left):
            raise ValueError(f"padding: must be non-negative, got {padding!r}")

    if padding_mode == "zeros" and left == right:
        return ResolvedPadding(conv_padding=left, pad=None, pad_mode="constant")
    # F.pad lists the last dimension first.
    pad = tuple(p for lr in zip(reversed(left), reversed(right), strict=True) for p in lr)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return ResolvedPadding(conv_padding=(0,) * n, pad=pad, pad_mode=mode)
