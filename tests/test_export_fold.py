"""`fold_bn`: BatchNorms after dynamic convs folded into the K kernels, exactly (float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import rel_err
from export_models import Mixed, build, randomise
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from dynconvert import DynamicConv2d
from dynconvert.export import fold_bn


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_fold_mixed_is_exact_and_creates_a_bias():
    model = build("mixed").double().eval()
    assert model.conv.bias is None
    x = torch.randn(4, *Mixed.input_size, dtype=torch.float64)
    before = _reference(model, x)
    pairs = fold_bn(model)
    assert [(p.conv, p.norm) for p in pairs] == [
        ("conv", "bn"),
        ("dw", "bn_dw"),
        ("conv1d", "bn1d"),
    ]
    assert all(isinstance(getattr(model, n), nn.Identity) for n in ("bn", "bn_dw", "bn1d"))
    assert model.conv.bias is not None and model.conv.bias.shape == (4, 16)
    assert rel_err(_reference(model, x), before) < 1e-12


class _Shapes(nn.Module):
    """timm's BatchNormAct2d (folds, keeps its activation) and two BatchNorms that must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)  # after a static conv
        self.a = DynamicConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1))
        self.bn_act = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.b = DynamicConv2d.from_conv(nn.Conv2d(8, 8, 1))
        self.bn_b = nn.BatchNorm2d(8)  # the conv's output is also used by the residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_stem(self.stem(x)))
        x = self.bn_act(self.a(x))
        y = self.b(x)
        return self.bn_b(y) + y


def test_fold_batchnorm_act_and_skip_what_is_not_foldable():
    model = randomise(_Shapes()).double().eval()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    before = _reference(model, x)
    pairs = fold_bn(model)
    assert [(p.conv, p.norm) for p in pairs] == [("a", "bn_act")]
    assert isinstance(model.bn_act, nn.Sequential) and isinstance(model.bn_act[1], nn.SiLU)
    assert isinstance(model.bn_stem, nn.BatchNorm2d) and isinstance(model.bn_b, nn.BatchNorm2d)
    assert rel_err(_reference(model, x), before) < 1e-12
