"""dynconvert.convert on hand-written user models: every discovery, selection and swap case."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from timm.layers import Conv2dSame, StdConv2d
from torch import nn

import dynconvert
from dynconvert import DynamicConvNd, DynconvertError
from dynconvert.convert import ConvertConfig, swap_named
from dynconvert.layers import DynamicConv2dSame, DynamicStdConv2d

TOL = 1e-4


def randomise_norms(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval and train outputs; BatchNorm statistics are restored after the train forward."""
    state = copy.deepcopy(model.state_dict())
    training = model.training
    with torch.no_grad():
        model.eval()
        out_eval = model(x)
        model.train()
        torch.manual_seed(123)
        out_train = model(x)
    model.load_state_dict(state)
    model.train(training)
    return {"eval": out_eval, "train": out_train}


def assert_same_function(model: nn.Module, x: torch.Tensor, **kwargs):
    before = outputs(model, x)
    model_out, report = dynconvert.convert(model, **kwargs)
    assert model_out is model
    after = outputs(model, x)
    for mode in ("eval", "train"):
        assert rel_err(after[mode], before[mode]) <= TOL, mode
    return report


def row(report, name):
    return next(r for r in report.rows if r.name == name)


class Net2d(nn.Module):
    """Plain, grouped, depthwise, 'same', dilated, padding modes, bias/no bias, Conv/BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 5, padding=2, groups=32, bias=False)
        self.same_even = nn.Conv2d(32, 16, 4, padding="same", dilation=2)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(16, 16, (3, 1), padding=(1, 0), padding_mode="circular")
        self.replicate = nn.Conv2d(16, 8, 3, stride=(2, 1), padding=2, padding_mode="replicate")
        self.valid = nn.Conv2d(8, 8, 1, padding="valid")
        self.tiny = nn.Conv2d(8, 2, 1)
        self.deconv = nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.extra_attribute = "kept"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.depthwise(self.grouped(x))
        x = self.circular(self.reflect(self.same_even(x)))
        return self.tiny(self.valid(self.replicate(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.features(x))


def test_2d_cases_convert_exactly_and_keep_the_model_object():
    model = Net2d()
    randomise_norms(model)
    report = assert_same_function(model, torch.randn(2, 3, 20, 18), input_size=(3, 20, 18))
    assert type(model) is Net2d and model.extra_attribute == "kept"
    assert callable(model.features)
    assert report.traced and report.notes == []
    assert row(report, "stem").reason.startswith("stem")
    assert isinstance(model.stem, nn.Conv2d) and not isinstance(model.stem, DynamicConvNd)
    assert row(report, "deconv").reason == "transposed conv: not a target"
    converted = {"grouped", "depthwise", "same_even", "reflect", "circular", "replicate"}
    assert converted | {"valid", "tiny"} == set(report.converted_names)
    for name in report.converted_names:
        layer = model.get_submodule(name)
        assert type(layer).__name__ == "DynamicConv2d" and layer.k == 4
    assert model.depthwise.groups == 32 and model.depthwise.bias is None


def test_1d_and_3d():
    net1 = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(8, 8, 5, padding="same", padding_mode="reflect", bias=False),
        nn.Conv1d(8, 8, 3, groups=8),
    )
    report = assert_same_function(net1, torch.randn(3, 4, 17), input_size=(4, 17))
    assert report.converted_names == ["2", "3"]
    net3 = nn.Sequential(nn.Conv3d(2, 4, 3), nn.GELU(), nn.Conv3d(4, 6, (1, 3, 3), stride=2))
    report = assert_same_function(net3, torch.randn(2, 2, 7, 8, 9), input_size=(2, 7, 8, 9))
    assert report.converted_names == ["2"]
    assert type(net3[2]).__name__ == "DynamicConv3d"


class SharedModule(nn.Module):
    """One conv called twice, and one conv registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.twice = nn.Conv2d(8, 8, 3, padding=1)
        self.alias_a = nn.Conv2d(8, 8, 1)
        self.alias_b = self.alias_a

    def forward(self, x):
        x = self.stem(x)
        x = self.twice(torch.relu(self.twice(x)))
        return self.alias_b(self.alias_a(x))


def test_module_called_twice_and_aliased_module_stay_shared():
    model = SharedModule()
    report = assert_same_function(model, torch.randn(2, 3, 12, 12), input_size=(3, 12, 12))
    assert isinstance(model.twice, DynamicConvNd)
    assert model.alias_a is model.alias_b and isinstance(model.alias_a, DynamicConvNd)
    assert row(report, "twice").calls == 2
    alias = row(report, "alias_a")
    assert alias.aliases == ["alias_b"] and alias.calls == 2
    assert sorted(report.converted_names) == ["alias_a", "twice"]
    # a fresh copy rebuilt by name loads the converted state dict strictly
    fresh = SharedModule()
    swap_named(fresh, report.converted_names, ConvertConfig.from_dict(report.config))
    assert fresh.alias_a is fresh.alias_b
    fresh.load_state_dict(model.state_dict(), strict=True)


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.c = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.c(self.b(self.a(self.stem(x))))


def test_convs_sharing_a_weight_are_skipped_and_keep_sharing():
    model = TiedWeights()
    report = assert_same_function(model, torch.randn(2, 3, 8, 8), input_size=(3, 8, 8))
    assert row(report, "a").reason == "shares its weight with 'b'"
    assert row(report, "b").reason == "shares its weight with 'a'"
    assert model.a.weight is model.b.weight
    assert report.converted_names == ["c"]


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.kernel = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.conv = nn.Conv2d(8, 8, 1)
        self.last = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.conv2d(self.stem(x), self.kernel, padding=1)
        x = self.conv(x) + F.conv2d(x, self.conv.weight)  # weight read outside the module
        return self.last(x)


def test_functional_conv_is_reported_and_its_weight_users_are_skipped():
    model = Functional()
    report = assert_same_function(model, torch.randn(2, 3, 10, 10), input_size=(3, 10, 10))
    functional = [r for r in report.rows if r.kind == "functional"]
    assert len(functional) == 2
    kernel_row = next(r for r in functional if r.name.startswith("kernel"))
    assert kernel_row.reason == "functional conv: no module to swap"
    assert (kernel_row.in_channels, kernel_row.out_channels) == (8, 8)
    assert kernel_row.macs_before == 8 * 8 * 8 * 8 * 9  # 8×8 output, 8 out, 8·3·3 per output
    assert row(report, "conv").reason == "its weight is read outside its forward"
    assert report.converted_names == ["last"]


class TimmConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.same = Conv2dSame(8, 16, 3, stride=2)
        self.same_dw = Conv2dSame(16, 16, 4, stride=2, groups=16, bias=False)
        self.std = StdConv2d(16, 16, 3, padding=1)
        self.std_sub = _DoubledStdConv(16, 16, 3, padding=1)

    def forward(self, x):
        return self.std_sub(self.std(self.same_dw(self.same(self.stem(x)))))


class _DoubledStdConv(StdConv2d):
    """A subclass with its own forward: computes something else, so it must stay static."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("size", [(3, 17, 17), (3, 18, 21)])
def test_conv2d_same_and_std_conv_convert_exactly_and_a_std_conv_subclass_is_skipped(size):
    model = TimmConvs()
    report = assert_same_function(model, torch.randn(2, *size), input_size=size)
    assert type(model.same) is DynamicConv2dSame and type(model.same_dw) is DynamicConv2dSame
    assert type(model.std) is DynamicStdConv2d
    assert row(report, "std_sub").reason == (
        "_DoubledStdConv overrides forward(); no exact converter registered"
    )
    assert type(model.std_sub) is _DoubledStdConv
    fresh = TimmConvs()  # rebuilt by name, as dynconvert.load does
    swap_named(fresh, report.converted_names, ConvertConfig.from_dict(report.config))
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, *size)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Conv2d(8, 8, 3, padding=1)
        self.neg = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > 0:  # data-dependent control flow: fx cannot trace this
            return self.pos(x)
        return self.neg(x)


def test_untraceable_model_converts_by_walking_the_tree():
    model = Untraceable()
    report = assert_same_function(model, torch.randn(2, 3, 8, 8), input_size=(3, 8, 8))
    assert not report.traced
    assert any(n.startswith("fx tracing failed: ") and "walked the module tree" in n
               for n in report.notes)  # fmt: skip
    assert row(report, "stem").reason.startswith("stem")
    assert sorted(report.converted_names) == ["neg", "pos"]
    ran = [r for r in report.rows if r.calls]  # shapes come from the probe forward
    assert all(r.macs_before is not None for r in ran)


def test_untraceable_without_input_size_still_converts_and_says_so():
    model = Untraceable()
    _, report = dynconvert.convert(model)
    assert any("no input size known" in n for n in report.notes)
    assert any("stem assumed" in n for n in report.notes)
    assert row(report, "pos").macs_before is None and report.totals["macs_before"] is None


def test_selection_options():
    def run(**kwargs):
        return dynconvert.convert(Net2d(), input_size=(3, 16, 16), **kwargs)[1]

    report = run(include=["*re*"], exclude="reflect")
    assert sorted(report.converted_names) == ["replicate"]
    assert row(report, "reflect").reason == "excluded by 'reflect'"
    assert row(report, "valid").reason == "not matched by include"
    report = run(skip_stem=False, min_channels=16, depthwise="skip")
    assert "stem" not in report.converted_names  # 3 input channels < 16
    assert row(report, "stem").reason == "fewer than min_channels=16 channels"
    assert row(report, "depthwise").reason == "depthwise; depthwise='skip'"
    assert row(report, "tiny").reason.startswith("fewer than min_channels")
    assert "grouped" in report.converted_names  # grouped but not depthwise
    report = run(skip_stem=False)
    assert "stem" in report.converted_names
    net = nn.Sequential(
        nn.Conv1d(2, 4, 1), nn.Conv1d(4, 4, 1), nn.Unflatten(2, (1, 3)), nn.Conv2d(4, 4, 1)
    )
    _, report = dynconvert.convert(net, dims=(2,), input_size=(2, 3))
    assert report.converted_names == ["3"]
    assert row(report, "1").reason == "1d excluded by dims=[2]"


def test_config_object_equals_keywords():
    a, b = Net2d(), Net2d()
    b.load_state_dict(a.state_dict())
    cfg = ConvertConfig(k=3, ratio=0.5, temperature=2.0, exclude=("tiny",), seed=7)
    _, rep_a = dynconvert.convert(a, config=cfg)
    _, rep_b = dynconvert.convert(b, k=3, ratio=0.5, temperature=2.0, exclude=["tiny"], seed=7)
    assert rep_a.to_dict() == rep_b.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.grouped.k == 3 and a.grouped.temperature == 2.0
    assert ConvertConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DynconvertError, match="not both"):
        dynconvert.convert(Net2d(), k=2, config=cfg)


def test_same_seed_same_kernels_and_swap_named_reproduces_them():
    a, b, c = Net2d(), Net2d(), Net2d()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    _, report = dynconvert.convert(a, seed=3)
    dynconvert.convert(b, seed=4)
    swap_named(c, report.converted_names, ConvertConfig.from_dict(report.config))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not torch.equal(sa["grouped.weight"], sb["grouped.weight"])


def test_swap_named_rejects_unknown_or_unconvertible_names():
    cfg = ConvertConfig()
    with pytest.raises(DynconvertError, match="not found"):
        swap_named(Net2d(), ["nope"], cfg)
    with pytest.raises(DynconvertError, match="cannot be converted"):
        swap_named(Net2d(), ["deconv"], cfg)


def _snapshot(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": ["stem", "nothing*"]}, "include pattern 'nothing\\*' matches no convolution"),
        ({"include": "stem"}, "no convolution matched"),
        ({"dims": (3,)}, "no convolution matched"),
        ({"k": 0}, "k: expected an int >= 1"),
        ({"depthwise": "maybe"}, "depthwise"),
        ({"ratio": -1.0}, "ratio"),
    ],
)
def test_validation_errors_leave_the_model_unchanged(kwargs, match):
    model = Net2d()
    state, types = _snapshot(model)
    with pytest.raises(DynconvertError, match=match):
        dynconvert.convert(model, input_size=(3, 16, 16), **kwargs)
    after_state, after_types = _snapshot(model)
    assert types == after_types
    assert all(torch.equal(state[k], after_state[k]) for k in state)


def test_already_converted_model_has_nothing_left_to_convert():
    model = Net2d()
    dynconvert.convert(model, skip_stem=False)
    with pytest.raises(DynconvertError, match="already dynamic"):
        dynconvert.convert(model)


def test_exclude_that_excludes_nothing_warns():
    with pytest.warns(UserWarning, match="exclude pattern 'zzz' matches no convolution"):
        dynconvert.convert(Net2d(), exclude=["zzz"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynconvert.convert(Net2d(), exclude=["tiny"])


def test_training_flags_and_requires_grad_follow_the_original():
    model = Net2d()
    model.train()
    model.grouped.eval()
    model.reflect.requires_grad_(False)
    dynconvert.convert(model, input_size=(3, 16, 16))
    assert model.training and not model.grouped.training and model.reflect.training
    assert not any(p.requires_grad for p in model.reflect.parameters())
    assert all(p.requires_grad for p in model.grouped.parameters())
    assert model.bn.training  # the probe forward ran in eval mode, then restored the flags


def test_module_level_api_is_callable_after_subpackage_import():
    import dynconvert.convert.discover

    _, report = dynconvert.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)))
    assert report.converted_names == ["1"]
