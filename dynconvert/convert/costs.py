"""Parameter and MAC counts of a static conv and of its dynamic replacement, per sample.

Conventions (Chen et al., CVPR 2020, §4 count the same terms):

* conv: ``prod(output shape) · in_channels/groups · prod(kernel)`` multiply-accumulates;
* router: global average pool (one add per input element, counted as one MAC), then
  ``C·H`` and ``H·K`` MACs for its two linear layers of width ``H``;
* kernel aggregation: ``K · numel(weight)`` MACs to mix the kernels, plus ``K · out`` for the
  bias when there is one.

Bias additions, ReLU and softmax are not counted.
"""

from __future__ import annotations

import math

from ..layers.routers import router_width


def conv_macs(
    output_shape: tuple[int, ...], in_channels: int, groups: int, kernel: tuple[int, ...]
) -> int:
    """MACs of one conv call; ``output_shape`` is per sample ``(out, *spatial)``."""
    return math.prod(output_shape) * (in_channels // groups) * math.prod(kernel)


def dynamic_overhead_macs(
    input_shape: tuple[int, ...],
    out_channels: int,
    groups: int,
    kernel: tuple[int, ...],
    k: int,
    ratio: float,
    bias: bool,
) -> int:
    """MACs a dynamic conv adds to the static conv for one call on ``input_shape`` (per sample)."""
    in_channels = input_shape[0]
    hidden = router_width(in_channels, ratio)
    pool = math.prod(input_shape)
    router = in_channels * hidden + hidden * k
    weight_numel = out_channels * (in_channels // groups) * math.prod(kernel)
    mixing = k * weight_numel + (k * out_channels if bias else 0)
    return pool + router + mixing
