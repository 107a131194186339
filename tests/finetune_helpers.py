"""Shared by the test_finetune*.py files: synthetic ImageFolder data, tiny dynamic models."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from dynconvert import DynamicConv2d

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]

# A module file for subprocess tests (--model tinynet:tiny): a seeded tiny dynamic model.
TINYNET = """
import os, time
import torch
from torch import nn
from dynconvert import DynamicConv2d

class Slow(nn.Module):
    def forward(self, x):
        if self.training and os.environ.get("TINYNET_SLEEP"):
            time.sleep(float(os.environ["TINYNET_SLEEP"]))
        return x

def tiny(num_classes=3):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    c1, c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    return nn.Sequential(
        DynamicConv2d.from_conv(c1, generator=g), nn.BatchNorm2d(8), nn.ReLU(), Slow(),
        DynamicConv2d.from_conv(c2, noise=0.05, generator=g), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, num_classes),
    )
"""


def write_tinynet(folder: Path) -> Path:
    (folder / "tinynet.py").write_text(TINYNET)
    return folder


def make_image_folder(root: Path, classes=("a", "b", "c"), per_class=8, size=16, seed=0) -> Path:
    """PNG images whose dominant colour is the class, plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = torch.tensor(COLORS[c % len(COLORS)], dtype=torch.float32)
        for i in range(per_class):
            noise = torch.randint(-40, 40, (size, size, 3), generator=g).float()
            pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def make_data_dir(root: Path, classes=("a", "b", "c"), per_class=8) -> Path:
    make_image_folder(root / "train", classes, per_class, seed=0)
    make_image_folder(root / "val", classes, max(2, per_class // 2), seed=1)
    return root


def tiny_model(num_classes: int = 3, seed: int = 1, dropout: float = 0.0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c1, c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    return nn.Sequential(
        DynamicConv2d.from_conv(c1, generator=g),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        DynamicConv2d.from_conv(c2, noise=0.05, generator=g),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(8, num_classes),
    )


def tensor_data(n: int = 24, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[torch.arange(n), y % 3] += 1.5  # the class is the brightest channel
    return TensorDataset(x, y)


QUIET = {"progress": False}
