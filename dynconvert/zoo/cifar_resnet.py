"""CIFAR ResNet-20 of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2.

The layout follows the shared trained weights (``../shared/models/cifar10-resnet20-*.th``):
a 3×3 stem, three stages of three BasicBlocks (16, 32, 64 channels) and a parameter-free
"option A" shortcut that subsamples and zero-pads channels when the shape changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DynconvertError

#: Input normalisation the shared weights were trained with (pixels in [0, 1] first).
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


class OptionAShortcut(nn.Module):
    """He et al.'s option A: ``x[:, :, ::2, ::2]`` and ``pad`` zero channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the shortcut, then ReLU."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False, **factory)
        self.bn1 = nn.BatchNorm2d(planes, **factory)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False, **factory)
        self.bn2 = nn.BatchNorm2d(planes, **factory)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``3 * len(stages) * 2 + 2`` layers (ResNet-20 for 3 blocks a stage)."""

    def __init__(
        self,
        blocks_per_stage: int = 3,
        num_classes: int = 10,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False, **factory)
        self.bn1 = nn.BatchNorm2d(16, **factory)
        in_planes = 16
        for index, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if block == 0 else 1, **factory))
                in_planes = planes
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def load_cifar_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint, with a nested ``state_dict`` and ``module.`` handled."""
    path = Path(path)
    if not path.is_file():
        raise DynconvertError(f"weights file {path} does not exist; pass an existing file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DynconvertError(f"{path} holds no state dict; pass a file saved from a state_dict()")
    return {key.removeprefix("module."): value for key, value in state.items()}


def cifar_resnet20(
    weights: str | Path | None = None,
    num_classes: int = 10,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CifarResNet:
    """ResNet-20 for 32×32 inputs; ``weights`` (optional) is loaded strictly."""
    model = CifarResNet(3, num_classes, device=device, dtype=dtype)
    if weights is not None:
        model.load_state_dict(load_cifar_state_dict(weights), strict=True)
    return model
