"""CIFAR-10 data and measurements shared by the CIFAR benchmarks (issue 4).

The JPEG archives of ``../shared`` are decoded once into a uint8 cache; augmentation (pad-4
random crop, horizontal flip) runs on tensors. The measurements are val correct counts, each
router's mean per-sample max attention, and multiply-adds per image.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dynconvert.layers import DynamicConvNd
from dynconvert.zoo import CIFAR_MEAN, CIFAR_STD

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_ARCHIVES = SHARED / "data" / "cifar10-jpeg"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
DEFAULT_CACHE = DEFAULT_CACHE / "dynconvert" / "data" / "cifar10-jpeg"


# -- data -------------------------------------------------------------------------------


def decoded_split(archives: Path, cache: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 3, 32, 32)`` uint8 images and labels, decoded from the tarball once and cached."""
    from PIL import Image

    target = cache / f"{split}_uint8.npz"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        images, labels = [], []
        with tarfile.open(archives / f"{split}.tar.gz") as tar:
            members = sorted(m.name for m in tar.getmembers() if m.name.endswith(".jpg"))
            classes = sorted({name.split("/")[-2] for name in members})
            for name in members:
                with Image.open(tar.extractfile(name)) as image:
                    images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
                labels.append(classes.index(name.split("/")[-2]))
        tmp = target.with_suffix(".tmp.npz")
        x = np.stack(images).transpose(0, 3, 1, 2)
        np.savez(tmp, x=x, y=np.asarray(labels, dtype=np.int64))
        tmp.replace(target)
    data = np.load(target)
    return torch.from_numpy(data["x"]), torch.from_numpy(data["y"])


class CifarTensors(Dataset):
    """Normalised CIFAR images from a uint8 tensor; ``augment`` adds pad-4 crop and flip.

    Randomness comes from the global torch RNG, which ``dynconvert.finetune`` seeds per
    sample, epoch and run seed.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            image = nn.functional.pad(image, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(2)
        return (image.float() / 255 - self.mean) / self.std, int(self.labels[index])


# -- measurement ------------------------------------------------------------------------


@torch.no_grad()
def correct_count(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    model.eval()
    device = next(model.parameters()).device  # fine-tuning on CUDA leaves the model there
    data = CifarTensors(images, labels, augment=False)
    correct = 0
    for start in range(0, len(labels), 500):
        batch = torch.stack([data[i][0] for i in range(start, min(start + 500, len(labels)))])
        predicted = model(batch.to(device)).argmax(1).cpu()
        correct += (predicted == labels[start : start + 500]).sum().item()
    return correct


@torch.no_grad()
def max_attention_range(model: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """Lowest and highest, over the dynamic layers, of the per-sample max attention (mean)."""
    peaks: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        return lambda _module, _inputs, attn: peaks.setdefault(name, []).append(attn.amax(1))

    handles = [
        module.attention.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, DynamicConvNd)
    ]
    try:
        correct_count(model, images, torch.zeros(len(images), dtype=torch.long))  # hooks only
    finally:
        for handle in handles:
            handle.remove()
    means = [torch.cat(v).mean().item() for v in peaks.values()]
    return min(means), max(means)


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one 32×32 image: convs, linears and the dynamic routers."""
    total = 0

    def conv_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        weight = module.weight
        kernel = weight[0, 0] if isinstance(module, DynamicConvNd) else weight[0]
        total += output[0].numel() * kernel.numel()
        if isinstance(module, DynamicConvNd):
            hidden = module.attention.fc1.out_features
            total += inputs[0][0].numel()  # global average pool
            total += module.in_channels * hidden + hidden * module.k  # router
            total += module.k * weight[0].numel()  # mixing the K kernels

    def linear_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, DynamicConvNd)):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear) and not any(
            module is m.attention.fc1 or module is m.attention.fc2
            for m in model.modules()
            if isinstance(m, DynamicConvNd)
        ):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return total
