"""Weight-standardized convs (timm's StdConv2d family): exact conversion, every path, the files.

``DynamicStdConv2d`` mixes each sample's kernel from K kernels and standardizes it as timm's
layer does. The float64 reference below is timm's own module, run per sample with the mixed
kernel in place of its weight (``torch.func.functional_call``), so the standardization formula
(``F.batch_norm`` over the kernel, biased variance, ``eps``, ``gain · scale``) is timm's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err
from finetune_helpers import QUIET, tensor_data
from test_strategies import check_every_strategy, strategies
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn
from torch.func import functional_call

import dynconvert
from dynconvert.export import TOLERANCE
from dynconvert.layers import DynamicStdConv2d
from dynconvert.sources import build_timm_model

TYPES = {
    "std": StdConv2d,
    "std_same": StdConv2dSame,
    "scaled": ScaledStdConv2d,
    "scaled_same": ScaledStdConv2dSame,
}
GEOMETRIES = {
    "3x3": dict(in_channels=6, out_channels=8, kernel_size=3, bias=True),
    "grouped": dict(in_channels=6, out_channels=4, kernel_size=3, groups=2, bias=False),
    "strided": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, dilation=2),
    "even": dict(in_channels=4, out_channels=6, kernel_size=4, stride=2, bias=False),
    "pointwise": dict(in_channels=6, out_channels=6, kernel_size=1, bias=True, eps=1e-2),
    "depthwise": dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, stride=2),
}
CASES = [
    pytest.param(kind, geometry, id=f"{kind}-{geometry}")
    for kind in TYPES
    for geometry in GEOMETRIES
]


def make_conv(kind: str, geometry: str) -> nn.Conv2d:
    opts = dict(GEOMETRIES[geometry])
    channels = opts.pop("in_channels")
    conv = TYPES[kind](channels, **opts)
    if kind.startswith("scaled"):
        with torch.no_grad():
            conv.gain.uniform_(0.5, 1.5)  # not all 1: gain must be carried per channel
            if conv.bias is not None:
                conv.bias.normal_()
    return conv


def make_input(conv: nn.Conv2d, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, conv.in_channels, 11, 13)  # odd sizes: 'SAME' pads unevenly


def std_reference(layer: DynamicStdConv2d, x: torch.Tensor) -> torch.Tensor:
    """Per sample: timm's layer with the kernel and bias mixed by the layer's attention."""
    attn = layer.attention(x)
    source = layer.to_conv()
    outs = []
    for b in range(x.shape[0]):
        params = {"weight": torch.einsum("k,k...->...", attn[b], layer.weight)}
        if layer.bias is not None:
            params["bias"] = attn[b] @ layer.bias
        if layer.gain is not None:
            params["gain"] = layer.gain
        outs.append(functional_call(source, params, (x[b : b + 1],)))
    return torch.cat(outs)


def randomize_router(layer: nn.Module) -> None:
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, dynconvert.DynamicConvNd):
                module.attention.fc2.weight.normal_(0, 1.0)
                module.attention.fc2.bias.normal_(0, 1.0)


# -- exact at conversion ---------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "geometry"), CASES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_from_conv_equals_the_timm_layer(kind, geometry, training):
    conv = make_conv(kind, geometry).train(training)
    layer = DynamicStdConv2d.from_conv(conv, k=4, noise=0.05)
    assert layer.training == training and layer.eps == conv.eps
    assert layer.same_pad == bool(getattr(conv, "same_pad", False))
    x = make_input(conv)
    expected = conv(x)
    for strategy in strategies(x.shape[0]):
        layer.strategy = strategy
        out = layer(x)
        assert out.shape == expected.shape, strategy
        assert rel_err(out, expected) <= 1e-5, strategy


def test_eps_is_the_source_layers():
    """With a large eps the standardized kernel differs visibly: eps must be the source's."""
    conv = StdConv2d(4, 6, 3, eps=0.5)
    with torch.no_grad():
        conv.weight.mul_(0.3)  # variance comparable to eps
    layer = DynamicStdConv2d.from_conv(conv)
    x = make_input(conv)
    assert rel_err(layer(x), conv(x)) <= 1e-5
    layer.eps = 1e-6
    assert rel_err(layer(x), conv(x)) > 1e-2


@pytest.mark.parametrize("kind", TYPES)
def test_to_conv_is_the_inverse_of_from_conv(kind):
    conv = make_conv(kind, "even").double()
    layer = DynamicStdConv2d.from_conv(conv, noise=0.3)
    back = layer.to_conv()
    assert type(back) is type(conv)
    assert back.eps == conv.eps and back.padding == conv.padding
    assert getattr(back, "same_pad", None) == getattr(conv, "same_pad", None)
    assert getattr(back, "scale", None) == getattr(conv, "scale", None)
    for name, param in conv.named_parameters():
        assert rel_err(back.get_parameter(name), param) < 1e-12, name
    x = make_input(conv).double()
    assert rel_err(back(x), conv(x)) < 1e-12


def test_subclasses_are_refused_with_a_reason():
    """Conv subclasses timm adds later, or a user's, are never swapped silently."""

    class MyStdConv(StdConv2d):
        def forward(self, x):
            return super().forward(x) * 2

    class LaterScaled(ScaledStdConv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), MyStdConv(8, 8, 3), LaterScaled(8, 8, 3),
                          StdConv2d(8, 8, 3))  # fmt: skip
    _, report = dynconvert.convert(model, input_size=(3, 16, 16))
    reasons = {row.name: row.reason for row in report.rows}
    assert reasons["1"] == "MyStdConv overrides forward(); no exact converter registered"
    assert reasons["2"] == "LaterScaled overrides forward(); no exact converter registered"
    assert reasons["3"] is None and type(model[3]) is DynamicStdConv2d
    assert type(model[1]) is MyStdConv and type(model[2]) is LaterScaled
    with pytest.raises(TypeError, match="keeps its forward"):
        DynamicStdConv2d.from_conv(MyStdConv(4, 4, 3))
    with pytest.raises(TypeError, match="expected one of timm's StdConv2d"):
        DynamicStdConv2d.from_conv(nn.Conv2d(4, 4, 3))


# -- every strategy against the float64 reference, forward and backward -------------------------


@pytest.mark.parametrize(("kind", "geometry"), CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_every_strategy_matches_float64_forward_and_backward(kind, geometry, batch):
    layer = DynamicStdConv2d.from_conv(make_conv(kind, geometry), k=3, noise=0.3)
    randomize_router(layer)
    check_every_strategy(layer, make_input(layer, batch), reference=std_reference)


@pytest.mark.parametrize("kind", ["std", "scaled_same"])
def test_autocast_gives_the_timm_layers_dtype_and_a_float32_scale(kind):
    """Under bf16 autocast the output has the dtype timm's layer gives; the variance is still
    computed in float32 (a bf16 Gram matrix would lose its leading digits)."""
    conv = make_conv(kind, "3x3")
    layer = DynamicStdConv2d.from_conv(conv, noise=0.3)
    randomize_router(layer)
    x = make_input(conv)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = conv(x).dtype
        for strategy in strategies(x.shape[0]):
            layer.strategy = strategy
            out = layer(x)
            assert out.dtype == expected_dtype == torch.bfloat16, strategy
            assert rel_err(out, want) <= 3e-2, strategy
    attn = layer.attention(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        factor = layer.output_scale(layer.centred_kernels(), attn)
    assert factor.dtype == torch.float32
    assert rel_err(factor, layer.output_scale(layer.centred_kernels(), attn)) < 1e-6


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_autotune_measures_the_centred_kernels(fresh_autotune, training):
    """Timing every candidate (each layer measured, whatever its size) on the strategies' view."""
    from dynconvert.engine import autotune

    layer = DynamicStdConv2d.from_conv(make_conv("scaled", "3x3"), k=3, noise=0.3)
    randomize_router(layer)
    x = make_input(layer).requires_grad_(training)
    ref_layer = copy.deepcopy(layer).double()
    want = std_reference(ref_layer, x.detach().double())
    with torch.set_grad_enabled(training):
        out = layer.train(training)(x)
    assert autotune.stats()["measurements"] > 0
    assert rel_err(out, want) <= 1e-5
    if training:
        out.square().sum().backward()
        want.square().sum().backward()
        assert rel_err(layer.gain.grad, ref_layer.gain.grad) <= 1e-5
        assert rel_err(layer.weight.grad, ref_layer.weight.grad) <= 1e-5


def test_router_gets_a_gradient_at_the_start():
    conv = make_conv("scaled", "3x3")
    layer = DynamicStdConv2d.from_conv(conv, k=4)
    assert not layer.attention.fc2.weight.any()  # uniform attention: exact start
    x = make_input(conv)
    out = layer(x)
    assert rel_err(out, conv(x)) <= 1e-5
    out.square().sum().backward()
    assert layer.attention.fc2.weight.grad.abs().max() > 1e-6
    assert layer.gain.grad.abs().max() > 0 and layer.weight.grad.abs().max() > 0


def test_packed_runs_as_loop_on_the_centred_kernels():
    """The centred kernels are computed in each forward: nothing may be packed per parameter."""
    from dynconvert.engine import prepacked

    layer = DynamicStdConv2d.from_conv(make_conv("std", "3x3"), strategy="packed").eval()
    randomize_router(layer)
    x = make_input(layer)
    before = prepacked.stats()["packs"]
    with torch.no_grad():
        assert rel_err(layer(x), std_reference(copy.deepcopy(layer).double(), x.double())) < 1e-5
    assert prepacked.stats()["packs"] == before


# -- timm models: convert, save/load, export, fine-tune --------------------------------------


class FourKinds(nn.Module):
    """All four timm types, a BatchNorm after one (never folded into a standardized conv)."""

    input_size = (3, 17, 19)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.std = StdConv2d(8, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.std_same = StdConv2dSame(8, 12, 3, stride=2)
        self.scaled = ScaledStdConv2d(12, 12, 1, groups=2)
        self.scaled_same = ScaledStdConv2dSame(12, 16, 4, stride=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.std(torch.relu(self.stem(x)))))
        x = torch.relu(self.scaled(torch.relu(self.std_same(x))))
        return self.head(self.scaled_same(x).mean((2, 3)))


def converted_four_kinds() -> nn.Module:
    model = FourKinds()
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(4, *FourKinds.input_size)
    before = model.eval()(x)
    _, report = dynconvert.convert(model, input_size=FourKinds.input_size)
    assert report.converted_names == ["std", "std_same", "scaled", "scaled_same"]
    assert rel_err(model(x), before) <= 1e-5
    randomize_router(model)
    return model


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("fold_bn", [False, True], ids=["plain", "fold_bn"])
def test_export_verifies_at_batch_1_3_8(tmp_path, fmt, fold_bn):
    model = converted_four_kinds()
    path = tmp_path / f"model.{fmt}"
    result = dynconvert.export(
        model, path, fmt, input_size=FourKinds.input_size, fold_bn=fold_bn, show=False
    )
    assert result.folded == []  # the BatchNorm after `std` stays: its scale would be undone
    assert [row["batch"] for row in result.rows] == [1, 3, 8]
    for row in result.rows:
        assert row["ok"] and row["max_abs_error"] <= TOLERANCE * row["max_abs_output"], row


def test_one_fine_tuning_step_moves_kernels_gains_and_routers():
    model = converted_four_kinds().train()
    before = copy.deepcopy(model.state_dict())
    data = tensor_data(8, classes=5)  # 8x8 images
    dynconvert.finetune(model, data, epochs=1, batch_size=8, lr=0.05, **QUIET)
    after = model.state_dict()
    for name in (
        "std.weight",
        "scaled.gain",
        "scaled_same.weight",
        "std_same.attention.fc2.weight",
    ):
        assert not torch.equal(before[name], after[name]), name
    assert all(torch.isfinite(t).all() for t in after.values() if t.is_floating_point())


TIMM_MODELS = {  # narrowed (create_model kwargs, recorded in the file) to keep the files small
    "resnetv2_50x1_bit": {"channels": [128, 128, 256, 256], "stem_chs": 32},  # BiT: StdConv2d
    "nf_resnet26": {"depths": [1, 1, 1, 1], "channels": [32, 64, 96, 128], "stem_chs": 16},
}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_converts_exactly_and_round_trips_through_save_and_load(name, tmp_path):
    torch.manual_seed(0)
    model = build_timm_model(name, pretrained=False, **TIMM_MODELS[name]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        _, report = dynconvert.convert(model, input_size=(3, 64, 64))
        assert rel_err(model(x), before) <= 1e-5
    totals = report.totals
    assert totals["converted"] == totals["convs"] - 1  # all but the stem
    assert report.skip_reasons() == {"stem (reads the model input); skip_stem=True": 1}
    assert any(isinstance(m, DynamicStdConv2d) for m in model.modules())
    randomize_router(model)
    dynconvert.save(model, tmp_path / "model.pt", report=report)
    loaded = dynconvert.load(tmp_path / "model.pt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
