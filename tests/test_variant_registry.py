"""A variant added from this file alone: a sigmoid router, registered here, then converted,
checked exact, saved, loaded and fine-tuned, with no change anywhere in the package.

The toy variant routes with a sigmoid (as CondConv does, Yang et al., NeurIPS 2019): its
zero-initialised logit layer gives every kernel the weight 0.5, so the weights sum to K/2,
not 1. Its exact start scales the K zero-sum perturbed copies of the trained kernel by 2/K:
``Σ_k 0.5 · (2/K)(W + P_k) = W``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from finetune_helpers import QUIET, tensor_data
from torch import nn

import dynconvert
from dynconvert.convert import ConvertConfig, Variant, register_variant
from dynconvert.engine import STRATEGIES
from dynconvert.export.fold_bn import fold_bn
from dynconvert.finetune.health import AttentionMonitor
from dynconvert.finetune.models import static_twin
from dynconvert.io import CONVERSION_ATTR
from dynconvert.layers import DynamicConv2d, DynamicConvNd, PooledRouter

K = 4


class SigmoidRouter(PooledRouter):
    """The paper's pooled branch with an independent sigmoid weight per kernel."""

    normaliser = "sigmoid"

    def normalise(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


@torch.no_grad()
def scaled_start(layer: DynamicConvNd, conv: nn.Module, noise: float, generator) -> None:
    """Zero-sum copies of the kernel, scaled so that weights of 0.5 each mix them to it."""
    layer.start_from(conv, noise, generator)
    scale = 1.0 / (layer.k * 0.5)
    layer.weight.mul_(scale)
    if layer.bias is not None:
        layer.bias.mul_(scale)


register_variant(Variant("toy", SigmoidRouter, scaled_start, summary="sigmoid routing"))


def small_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def toy_model() -> tuple[nn.Module, nn.Module]:
    """(original, converted with variant='toy'); the stem stays static (skip_stem)."""
    original = small_net()
    model, report = dynconvert.convert(
        copy.deepcopy(original), config=ConvertConfig(k=K, variant="toy", input_size=(3, 8, 8))
    )
    assert report.config["variant"] == "toy"
    return original, model


def dynamic_layers(model: nn.Module) -> list[DynamicConvNd]:
    return [m for m in model.modules() if isinstance(m, DynamicConvNd)]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_toy_variant_converts_exactly(training):
    original, model = toy_model()
    layers = dynamic_layers(model)
    assert len(layers) == 2 and all(type(m.router) is SigmoidRouter for m in layers)
    original.train(training), model.train(training)
    x = torch.randn(6, 3, 8, 8)
    for layer in layers:
        weights = layer.routing(torch.randn(2, layer.in_channels, 4, 4))
        assert torch.equal(weights, torch.full((2, K), 0.5))
    with torch.no_grad():
        assert rel_err(model(x), original(x)) <= 1e-5


def test_every_strategy_mixes_weights_that_do_not_sum_to_one():
    layer = DynamicConv2d(6, 8, 3, padding=1, k=K, router=SigmoidRouter).double()
    with torch.no_grad():
        layer.router.fc2.weight.normal_(0, 1.0)  # this test's own router: its layers are known
        layer.router.fc2.bias.normal_(0, 1.0)
    for batch in (1, 3):
        x = torch.randn(batch, 6, 7, 7, dtype=torch.float64)
        weights = layer.routing(x)
        assert (weights.sum(1) - 1).abs().max() > 0.1  # really not a distribution
        kernels = torch.einsum("bk,k...->b...", weights, layer.weight)
        biases = weights @ layer.bias
        want = torch.cat([F.conv2d(x[b : b + 1], kernels[b], biases[b], padding=1)
                          for b in range(batch)])  # fmt: skip
        for name in STRATEGIES:
            if name == "dense" and batch != 1:
                continue
            layer.strategy = name
            with torch.no_grad():
                assert rel_err(layer(x), want) <= 1e-10, (name, batch)


def test_toy_router_gets_a_gradient_and_has_no_temperature():
    _, model = toy_model()
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    for layer in dynamic_layers(model):
        grads = [p.grad for p in layer.router_parameters()]
        assert any(g is not None and g.abs().max() > 0 for g in grads)
        assert not layer.has_temperature
        with pytest.raises(TypeError, match=r"sigmoid router .* has no temperature"):
            layer.set_temperature(2.0)


def test_constant_routing_control_and_health_follow_the_router():
    original, model = toy_model()
    model.eval(), original.eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():  # the constant-routing twin of a fresh conversion is the original
        assert rel_err(static_twin(model)(x), original(x)) <= 1e-5
    with AttentionMonitor(model) as monitor, torch.no_grad():
        model(x)
    for stats in monitor.summary().values():
        assert stats["shares"] == pytest.approx([1 / K] * K)
        assert stats["entropy"] == pytest.approx(math.log(K)) and not stats["unused"]


def test_a_batchnorm_is_not_folded_into_a_router_whose_weights_do_not_sum_to_one():
    _, model = toy_model()
    assert fold_bn(model.eval()) == []


def test_toy_model_saves_and_loads_as_the_same_variant(tmp_path):
    _, model = toy_model()
    with torch.no_grad():
        for layer in dynamic_layers(model):
            layer.router.fc2.weight.normal_()  # trained routers: their values must come back
    path = dynconvert.save(model, tmp_path / "toy.pt")
    loaded = dynconvert.load(path, model=small_net())
    assert all(type(m.router) is SigmoidRouter for m in dynamic_layers(loaded))
    model.eval(), loaded.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # Saved without its report, the variant is read off the layers' routers.
    delattr(loaded, CONVERSION_ATTR)
    again = dynconvert.load(dynconvert.save(loaded, tmp_path / "again.pt"), model=small_net())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_toy_model_fine_tunes_one_step():
    _, model = toy_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = tensor_data(8)
    result = dynconvert.finetune(model, data, data, epochs=1, batch_size=8, lr=0.1, **QUIET)
    assert math.isfinite(result.history[-1]["train_loss"])
    moved = {id(p) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for layer in dynamic_layers(model):
        assert moved & {id(p) for p in layer.router_parameters()}  # the routers trained
        assert id(layer.weight) in moved  # and the kernels


def test_unknown_variant_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"variant: expected one of dy, .*toy.*, got 'nope'"):
        ConvertConfig(variant="nope")
    assert ConvertConfig.from_dict({"k": 4}).variant == "dy"  # files saved before variants
