"""Property test: random valid conv configurations and input shapes (issue 2)."""

from __future__ import annotations

import torch
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import float64_reference
from test_layers import CONVS, randomize_router, strategies_for

from dynconvert import DynamicConvNd


@st.composite
def conv_configs(draw):
    n = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1,) * n if kind == "same" else tuple(draw(st.integers(1, 3)) for _ in range(n))
    reach = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
    if kind == "int":
        padding = draw(st.integers(0, 2))
    elif kind == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
    else:
        padding = kind
    pads = (padding,) * n if isinstance(padding, int) else padding
    # Large enough for the kernel, and for reflect padding (pad < size).
    size = []
    for i in range(n):
        pad = pads[i] if isinstance(pads[i], int) else reach[i]
        size.append(
            draw(st.integers(max(reach[i] + 1, pad + 1, 2), max(reach[i] + 1, pad + 1) + 5))
        )
    batch = draw(st.integers(1, 4))
    opts = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
    )
    return n, opts, (batch, in_channels, *size), draw(st.integers(1, 4))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_random_configurations(config):
    n, opts, shape, k = config
    conv = CONVS[n](**opts)
    x = torch.randn(shape)
    layer = DynamicConvNd.from_conv(conv, k=k)
    with torch.no_grad():
        expected = conv(x)
        assert layer(x).shape == expected.shape
        assert rel_err(layer(x), expected) <= 1e-5
        randomize_router(layer)
        reference = float64_reference(layer, x)
        for strategy in strategies_for(shape[0]):
            layer.strategy = strategy
            assert rel_err(layer(x), reference) <= 1e-5, strategy
