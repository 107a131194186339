"""Models for the export tests: a hand-written net with 1d, 2d and depthwise convs, and timm nets.

Converted models get random routers and BatchNorm statistics: right after conversion the
attention is uniform and the K kernels nearly equal, which would let a wrong attention path
or a wrong fold pass unnoticed.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

import dynconvert

SMALL = (3, 64, 64)  # timm models at 64x64 keep the export tests fast
TIMM_MODELS = ("resnet18", "mobilenetv3_small_100", "efficientnet_b0")
MODELS = ("mixed", *TIMM_MODELS)


class Mixed(nn.Module):
    """Conv2d, depthwise Conv2d and Conv1d, each followed by a BatchNorm, plus a residual."""

    input_size = (3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # reads the input: stays static
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn_dw = nn.BatchNorm2d(16)
        self.conv1d = nn.Conv1d(16, 12, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn_dw(self.dw(x))) + x
        x = F.relu(self.bn1d(self.conv1d(x.flatten(2))))
        return self.head(x.mean(-1))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Input-dependent attention and non-trivial BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_(mean + std * torch.randn(t.shape, generator=generator, dtype=t.dtype))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, dynconvert.DynamicConvNd):
                normal(module.attention.fc2.weight, 0.0, 1.0)
                normal(module.attention.fc2.bias, 0.0, 0.5)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                normal(module.running_mean, 0.0, 0.2)
                module.running_var.copy_(
                    0.5 + 1.5 * torch.rand(module.running_var.shape, generator=generator)
                )
                normal(module.weight, 1.0, 0.2)
                normal(module.bias, 0.0, 0.2)
    return model


def input_size(name: str) -> tuple[int, ...]:
    return Mixed.input_size if name == "mixed" else SMALL


def build(name: str) -> nn.Module:
    """The model ``name``, random init, converted (k=4) and randomised, in training mode."""
    if name == "mixed":
        model = Mixed()
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10)
    model, report = dynconvert.convert(model, k=4, input_size=input_size(name), noise=0.5)
    assert report.to_dict()["rows"], name
    return randomise(model)
