"""convert never swaps a conv whose use it cannot reproduce: each guard, and the model after.

Each case is a user model where a swap would break or silently change the model: a weight
read outside the conv's forward that fx cannot see (untraceable model, a training-only
branch), a forward replaced on the instance, a conv also kept in a plain list, a gradient
hook on the weight. The conv must be skipped with its reason and the model must compute the
same function in eval and train mode. Also: lazy and meta-device models, a raw ``_ConvNd``
subclass, and ``config=`` with a keyword equal to its default.
"""

import pytest
import torch
import torch.nn.functional as F
from test_convert_models import assert_same_function, row
from torch import nn

import dynconvert
from dynconvert import DynamicConvNd, DynconvertError
from dynconvert.convert import ConvertConfig


class ReadsWeightUntraceable(nn.Module):
    """Data-dependent control flow (no fx graph) plus reads of two convs' weights."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.scaled = nn.Conv2d(8, 8, 3, padding=1)
        self.reused = nn.Conv2d(8, 8, 3, padding=1)
        self.plain = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.mean() > -100:
            x = self.scaled(x) / self.scaled.weight.shape[0]  # K after a swap: 16% off
        x = x + F.conv2d(x, self.reused.weight, self.reused.bias, padding=1)  # 5-D: an error
        return self.plain(self.reused(x))


def test_weight_reads_in_an_untraceable_model_are_seen_by_the_probe():
    model = ReadsWeightUntraceable()
    report = assert_same_function(model, torch.randn(2, 3, 8, 8), input_size=(3, 8, 8))
    assert not report.traced
    assert row(report, "scaled").reason == "its weight is read outside its forward (weight.shape)"
    assert row(report, "reused").reason.startswith("its weight is read outside its forward")
    assert report.converted_names == ["plain"]


def test_untraceable_without_an_input_says_reads_were_not_checked():
    _, report = dynconvert.convert(ReadsWeightUntraceable())
    assert any("parameter reads outside the convs' forwards were not checked" in n
               for n in report.notes)  # fmt: skip


class TrainingOnlyRead(nn.Module):
    """A weight penalty only in training mode: invisible in an eval-mode trace."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.penalised = nn.Conv2d(8, 8, 3, padding=1)
        self.plain = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.penalised(self.stem(x))
        if self.training:
            x = x * self.penalised.weight.norm()
        return self.plain(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_read_under_self_training_is_found_in_either_mode(mode):
    model = TrainingOnlyRead().train(mode == "train")
    report = assert_same_function(model, torch.randn(2, 3, 8, 8), input_size=(3, 8, 8))
    assert row(report, "penalised").reason == "its weight is read outside its forward"
    assert report.converted_names == ["plain"]
    assert model.training == (mode == "train")


def _three_convs() -> nn.Sequential:
    return nn.Sequential(*(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(3)))


def test_forward_replaced_on_the_instance_is_kept():
    model = _three_convs()
    original = model[1].forward
    model[1].forward = lambda x: original(x) * 2.0  # what monkey-patching and wrappers do
    report = assert_same_function(model, torch.randn(2, 3, 8, 8))
    assert row(report, "1").reason.startswith("its forward() was replaced on the instance")
    assert report.converted_names == ["2"]


class PlainListHolder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.order = [self.a]  # a plain list: not part of the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for conv in self.order:
            x = conv(x)
        return self.b(x)


def test_a_conv_also_held_in_a_plain_list_is_skipped():
    model = PlainListHolder()
    report = assert_same_function(model, torch.randn(2, 3, 8, 8))
    assert row(report, "a").reason == "also held in 'order', which a swap would not update"
    assert report.converted_names == ["b"]
    assert isinstance(model.b, DynamicConvNd)
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # every parameter in use gets a gradient
    assert all(p.grad is not None for p in model.parameters())


def test_a_gradient_hook_on_the_weight_is_kept():
    model = _three_convs()
    mask = (torch.rand_like(model[1].weight) > 0.5).float()
    model[1].weight.register_hook(lambda grad: grad * mask)  # pruning-style masking
    report = assert_same_function(model, torch.randn(2, 3, 8, 8))
    assert row(report, "1").reason == "its weight has a gradient hook that a swap would drop"
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.all(model[1].weight.grad[mask == 0] == 0)


def test_lazy_conv_is_skipped_and_not_initialised_by_the_probe():
    for input_size in (None, (3, 8, 8)):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyConv2d(8, 3), nn.Conv2d(8, 4, 1))
        _, report = dynconvert.convert(model, input_size=input_size)
        assert row(report, "1").reason == "lazy conv not initialised; run one forward first"
        assert isinstance(model[1], nn.LazyConv2d)  # still lazy: nothing ran through it
        assert report.converted_names == ["2"]
    assert any("no probe forward: it would initialise lazy modules" in n for n in report.notes)


def test_raw_convnd_subclass_is_skipped_with_its_reason():
    class RawConv(nn.modules.conv._ConvNd):
        def __init__(self) -> None:
            super().__init__(8, 8, (1, 1), (1, 1), (0, 0), (1, 1), False, (0, 0), 1, True, "zeros")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.weight, self.bias)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), RawConv(), nn.Conv2d(8, 4, 1))
    report = assert_same_function(model, torch.randn(2, 3, 8, 8))
    assert row(report, "1").reason == (
        "RawConv is a custom nn.modules.conv._ConvNd; no exact converter registered"
    )


def test_meta_model_converts_to_meta_kernels_that_load_real_weights():
    real = _three_convs()
    with torch.device("meta"):
        skeleton = _three_convs()
    dynconvert.convert(real, seed=3)
    dynconvert.convert(skeleton, seed=3)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton[1].weight.shape == real[1].weight.shape
    skeleton.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(skeleton(x), real(x), rtol=0, atol=0)


def test_config_with_a_keyword_equal_to_its_default_is_refused():
    model = _three_convs()
    with pytest.raises(DynconvertError, match=r"not both \(got config and k\)"):
        dynconvert.convert(model, k=4, config=ConvertConfig(k=2))
    assert not any(isinstance(m, DynamicConvNd) for m in model.modules())
    _, report = dynconvert.convert(model, config=ConvertConfig(k=2))
    assert model[1].k == 2 and report.converted_names == ["1", "2"]


def test_temperature_the_dtype_cannot_hold_is_refused_before_the_swap():
    model = _three_convs().half()
    before = [p.clone() for p in model.parameters()]
    for temperature in (1e-8, 1e6):  # 0 and inf in float16
        with pytest.raises(
            ValueError, match=r"in torch\.float16; pick a value that dtype can hold"
        ):
            dynconvert.convert(model, temperature=temperature)
    assert not any(isinstance(m, DynamicConvNd) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_lazy_module_with_only_buffers_is_not_initialised_by_the_probe():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d(affine=False), nn.Conv2d(8, 4, 1))
    _, report = dynconvert.convert(model, input_size=(3, 8, 8))
    assert isinstance(model[1], nn.LazyBatchNorm2d) and report.converted_names == ["2"]
