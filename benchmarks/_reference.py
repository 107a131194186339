"""A plain batch-folded dynamic conv: the well-known way, written here as the baseline.

Each sample's kernel ``Σ_k a_bk W_k`` is mixed explicitly, and the batch is folded into the
channel axis so that one grouped conv with ``groups = B·groups`` applies every sample's own
kernel (the trick of CondConv and of most dynamic-conv code). Autograd keeps the B mixed
kernels for backward. The router is the same as dynconvert's (pool → FC → ReLU → FC →
softmax / T), so the same parameters give the same function. Padding follows the layer it
copies: symmetric zero padding inside the conv, an explicit ``F.pad`` for other modes and
asymmetric pads, and TF 'SAME' (timm's ``Conv2dSame``, the ``tf_*`` models) per input size.
Depthwise layers need nothing special: ``groups = B·C`` with one input channel per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.layers import DynamicConv2d, DynamicConv2dSame
from dynconvert.layers.conv2d_same import same_pad_amount


class BatchFoldedConv2d(nn.Module):
    """Reference dynamic 2-D conv: explicit mixing plus one batch-folded grouped conv."""

    def __init__(self, layer: DynamicConv2d) -> None:
        super().__init__()
        self.tf_same = isinstance(layer, DynamicConv2dSame)
        self.pad, self.pad_mode = layer._resolved.pad, layer._resolved.pad_mode
        self.kernel_size = layer.kernel_size
        self.stride, self.padding = layer.stride, layer.conv_padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.out_channels = layer.out_channels
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        router = layer.attention
        self.fc1 = nn.Linear(router.fc1.in_features, router.fc1.out_features)
        self.fc2 = nn.Linear(router.fc2.in_features, router.fc2.out_features)
        self.fc1.load_state_dict(router.fc1.state_dict())
        self.fc2.load_state_dict(router.fc2.state_dict())
        self.register_buffer("temperature", router.temperature.detach().clone())
        self.to(layer.weight.device, layer.weight.dtype)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))
        return torch.softmax(logits / self.temperature, dim=1)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the padding the conv itself does not apply (the router sees ``x``)."""
        if self.tf_same:
            pads = [
                same_pad_amount(size, k, s, d)
                for size, k, s, d in zip(
                    x.shape[2:], self.kernel_size, self.stride, self.dilation, strict=True
                )
            ]
            return F.pad(
                x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2)
            )
        if self.pad is not None:
            return F.pad(x, self.pad, mode=self.pad_mode)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.routing(x)
        x = self.padded(x)
        batch, channels = x.shape[:2]
        k = self.weight.shape[0]
        kernels = (attn @ self.weight.view(k, -1)).view(-1, *self.weight.shape[2:])
        bias = None if self.bias is None else (attn @ self.bias).flatten()
        out = F.conv2d(
            x.reshape(1, batch * channels, *x.shape[2:]),
            kernels,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups * batch,
        )
        return out.view(batch, self.out_channels, *out.shape[2:])


class TimmCondConv(nn.Module):
    """timm's ``CondConv2d`` driven by the same router as the dynconvert layer."""

    def __init__(self, layer: DynamicConv2d) -> None:
        super().__init__()
        from timm.layers import CondConv2d

        self.conv = CondConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.conv_padding,
            layer.dilation,
            layer.groups,
            bias=layer.bias is not None,
            num_experts=layer.k,
        )
        with torch.no_grad():
            self.conv.weight.copy_(layer.weight.detach().flatten(1))
            if layer.bias is not None:
                self.conv.bias.copy_(layer.bias.detach())
        self.reference = BatchFoldedConv2d(layer)  # only its router is used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.reference.padded(x), self.reference.routing(x))


def swap_convs(model: nn.Module, factory, skip: set[str] = frozenset()) -> nn.Module:
    """Replace each ``DynamicConv2d`` of ``model`` (but those in ``skip``) by ``factory(layer)``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, DynamicConv2d) and name not in skip:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, factory(module))
    return model
