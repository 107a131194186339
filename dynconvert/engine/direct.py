"""The strategies that hand plain kernels to the conv function: ``grouped``, ``loop``,
``dense`` and ``static`` (see ``strategies.py`` for what each is good for)."""

from __future__ import annotations

import torch

from . import tuning
from .context import recording
from .mixing import mix_bias, mix_kernels, mix_one_into
from .spec import DynamicConvSpec
from .workspace import scratch


def _streams(layer: DynamicConvSpec, x: torch.Tensor, attn: torch.Tensor, reuse: bool) -> bool:
    """Whether :func:`loop` mixes each sample's kernel just before its conv (CPU only)."""
    weight = layer.weight
    size = weight.numel() * weight.element_size()
    return (
        reuse
        and x.device.type == "cpu"
        and size >= tuning.STREAM_MIX_MIN_BYTES
        and (x.shape[0] == 1 or size <= tuning.STREAM_MIX_MAX_BYTES)
        and attn.dtype == weight.dtype
        and not torch.is_autocast_enabled("cpu")
    )


def grouped(layer: DynamicConvSpec, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Batch-folded: the B mixed kernels become one conv with ``groups = B·groups``."""
    batch = x.shape[0]
    reuse = not recording(x, layer.weight, attn, layer.bias)
    weight = mix_kernels(layer.weight, attn, reuse=reuse).flatten(0, 1)
    bias = mix_bias(layer.bias, attn)
    out = layer.conv_fn(
        x.reshape(1, batch * x.shape[1], *x.shape[2:]),
        weight,
        None if bias is None else bias.flatten(),
        layer.stride,
        layer.conv_padding,
        layer.dilation,
        layer.groups * batch,
    )
    return out.view(batch, layer.out_channels, *out.shape[2:])


def loop(layer: DynamicConvSpec, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """One dense conv per sample with its own mixed kernel."""
    reuse = not recording(x, layer.weight, attn, layer.bias)
    bias = mix_bias(layer.bias, attn)
    if _streams(layer, x, attn, reuse):
        # Mix each sample's kernel right before its conv (the generator runs in step with
        # the convs): the B mixed kernels never reach memory, and the mixing runs at the
        # bandwidth (see mix_one_into).
        buffer = scratch("kernel", tuple(layer.weight.shape[1:]), layer.weight)
        kernels = (mix_one_into(layer.weight, coeffs, buffer) for coeffs in attn.tolist())
    else:
        kernels = iter(mix_kernels(layer.weight, attn, reuse=reuse))
    single = x.shape[0] == 1
    outs = [
        layer.conv_fn(
            x if single else x[i : i + 1],
            kernel,
            None if bias is None else bias[i],
            layer.stride,
            layer.conv_padding,
            layer.dilation,
            layer.groups,
        )
        for i, kernel in enumerate(kernels)
    ]
    return outs[0] if single else torch.cat(outs)


def dense(layer: DynamicConvSpec, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Batch size 1 only: mix once and run one plain conv."""
    if x.shape[0] != 1:
        raise ValueError(f"strategy: 'dense' needs batch size 1, got {x.shape[0]}")
    return loop(layer, x, attn)


def static(layer: DynamicConvSpec, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """One conv with the K kernels stacked on the output axis, then a weighted sum of outputs."""
    k, out_channels, groups = layer.k, layer.out_channels, layer.groups
    per_group = out_channels // groups
    # Stack the K kernels inside each group, (g, K, O/g) on the output axis, so that the
    # conv's own `groups` (not the batch) keeps input and output channels paired.
    stacked = (
        layer.weight.view(k, groups, per_group, *layer.weight.shape[2:])
        .transpose(0, 1)
        .reshape(groups * k * per_group, *layer.weight.shape[2:])
    )
    y = layer.conv_fn(x, stacked, None, layer.stride, layer.conv_padding, layer.dilation, groups)
    y = y.unflatten(1, (groups, k, per_group))
    spatial_ones = (1,) * (y.dim() - 4)
    # Under CUDA autocast the conv gives bf16/fp16 but the router's softmax float32: mixed in
    # the conv's dtype, the output has the dtype nn.Conv2d and the other strategies give.
    conv_dtype = y.dtype  # CUDA autocast runs `sum` in float32
    y = (y * attn.to(y.dtype).view(-1, 1, k, 1, *spatial_ones)).sum(dim=2).flatten(1, 2)
    y = y.to(conv_dtype)
    bias = mix_bias(layer.bias, attn)
    if bias is not None:
        y = y + bias.to(y.dtype).view(*bias.shape, *spatial_ones)
    return y
