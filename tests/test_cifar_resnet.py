"""The CIFAR ResNet-20 of the benchmark: shared weights, a float64 reference, exact conversion."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from PIL import Image

from dynconvert import DynamicConv2d
from dynconvert.errors import DynconvertError
from dynconvert.zoo import CIFAR_MEAN, CIFAR_STD, CifarResNet, cifar_resnet20
from dynconvert.zoo.cifar_resnet import load_cifar_state_dict

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "models" / "cifar10-resnet20-12fca82f.th"
VAL = SHARED / "data" / "cifar10-jpeg" / "val.tar.gz"
PER_CLASS = 30

needs_shared = pytest.mark.skipif(
    not (WEIGHTS.is_file() and VAL.is_file()), reason="../shared weights or data missing"
)


@pytest.fixture(scope="module")
def val_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The first PER_CLASS images of every class, normalised as shared/README.md says."""
    images, labels = [], []
    with tarfile.open(VAL) as tar:
        members = sorted(m.name for m in tar.getmembers() if m.name.endswith(".jpg"))
        classes = sorted({name.split("/")[1] for name in members})
        for name in members:
            _, cls, file = name.split("/")
            if int(file.removesuffix(".jpg")) >= PER_CLASS:
                continue
            data = tar.extractfile(name).read()
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            labels.append(classes.index(cls))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(labels)


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """He et al.'s ResNet-20 written out with functional ops in float64, from the raw keys."""
    s = {k: v.double() for k, v in state.items()}

    def bn(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(
            h, s[f"{name}.running_mean"], s[f"{name}.running_var"],
            s[f"{name}.weight"], s[f"{name}.bias"], training=False, eps=1e-5,
        )  # fmt: skip

    h = F.relu(bn(F.conv2d(x.double(), s["conv1.weight"], padding=1), "bn1"))
    for stage, planes in ((1, 16), (2, 32), (3, 64)):
        for block in range(3):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            out = F.relu(
                bn(F.conv2d(h, s[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1")
            )
            out = bn(F.conv2d(out, s[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if h.shape[1] != planes:
                pad = planes // 4
                h = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))
            h = F.relu(out + h)
    return F.linear(h.mean(dim=(2, 3)), s["linear.weight"], s["linear.bias"])


def convert_all_but_stem(model: CifarResNet, noise: float = 0.01) -> CifarResNet:
    generator = torch.Generator().manual_seed(0)
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            for name in ("conv1", "conv2"):
                conv = getattr(block, name)
                setattr(
                    block, name, DynamicConv2d.from_conv(conv, 4, noise=noise, generator=generator)
                )
    return model


def test_architecture_matches_keys_and_param_count():
    model = CifarResNet()
    assert sum(p.numel() for p in model.parameters()) == 269_722  # He et al.: 0.27M
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)


@needs_shared
def test_shared_weights_load_strictly_and_match_float64_reference(val_batch):
    x, _ = val_batch
    state = load_cifar_state_dict(WEIGHTS)
    model = cifar_resnet20(WEIGHTS).eval()
    with torch.no_grad():
        out = model(x[:64])
    assert rel_err(out, reference_forward(state, x[:64])) < 1e-5


@needs_shared
def test_shared_weights_classify_val_images(val_batch):
    x, y = val_batch
    model = cifar_resnet20(WEIGHTS).eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).sum().item()
    # 81.02% on the whole val set (shared/README.md); a broken model is near 10%
    assert correct >= 0.7 * len(y)


@needs_shared
def test_conversion_keeps_predictions_identical(val_batch):
    x = val_batch[0][::5]  # 60 images, 6 per class: keeps the dynamic forward fast
    model = cifar_resnet20(WEIGHTS).eval()
    with torch.no_grad():
        before = model(x)
        converted = convert_all_but_stem(model, noise=0.3).eval()
        after = converted(x)
    assert sum(isinstance(m, DynamicConv2d) for m in converted.modules()) == 18
    assert rel_err(after, before) < 1e-4
    assert torch.equal(after.argmax(1), before.argmax(1))


def test_bad_weights_path_is_a_clear_error(tmp_path):
    with pytest.raises(DynconvertError, match="does not exist"):
        cifar_resnet20(tmp_path / "missing.th")
