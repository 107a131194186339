"""Dynamic layers inside the contexts users run them in: ``torch.inference_mode`` (Lightning's
validation), non-reentrant activation checkpointing (timm's ``set_grad_checkpointing``),
``torch.func`` transforms (per-sample gradients, forward-mode AD), ``torch.compile``, weights
edited through ``.data``, and ``from_conv`` of convs that must not be swapped."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from reference import float64_reference
from timm.layers import Conv2dSame, StdConv2dSame
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.checkpoint import checkpoint

from dynconvert import DynamicConv2d
from dynconvert.engine import SWITCHES, autotune, prepacked
from dynconvert.layers import DynamicConv2dSame, DynamicConvNd

# 128 -> 128 channels, 3x3, K=4: 2.4 MB of kernels, above the sizes where the strategies
# mix into reused scratch buffers and `packed` keeps its packed kernels.
CHANNELS = 128


def moved_router(layer: DynamicConv2d) -> DynamicConv2d:
    torch.nn.init.normal_(layer.attention.fc2.weight, std=1.0)  # non-uniform attention
    return layer


def large_layer_in_eval(strategy: str, batch: int):
    """(layer in eval mode with a moved router, input, float64 reference output)."""
    torch.manual_seed(0)
    layer = moved_router(DynamicConv2d(CHANNELS, CHANNELS, 3, padding=1, strategy=strategy))
    x = torch.randn(batch, CHANNELS, 8, 8)
    want = float64_reference(layer, x)
    return layer.eval(), x, want


@pytest.mark.parametrize("strategy", ["grouped", "unfold", "loop", "packed"])
def test_inference_mode_forward_then_eval_and_training_steps(strategy):
    """Buffers first made under inference_mode are reused by later calls outside it."""
    layer, x, want = large_layer_in_eval(strategy, batch=2)
    with torch.inference_mode():
        assert rel_err(layer(x), want) < 1e-5
    with torch.no_grad():
        assert rel_err(layer(x), want) < 1e-5
    layer.train()
    out = layer(x.requires_grad_())
    out.square().sum().backward()
    assert rel_err(out, want) < 1e-5
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_non_reentrant_checkpoint_with_the_autotuner_measuring():
    """The tuner's timed forward/backward must not be counted by the checkpoint's hooks,
    also when a smaller last batch brings a new shape."""
    torch.manual_seed(0)
    block = nn.Sequential(
        moved_router(DynamicConv2d(16, 16, 3, padding=1)), nn.ReLU(),
        moved_router(DynamicConv2d(16, 16, 1)),
    )  # fmt: skip
    was = SWITCHES.autotune, SWITCHES.min_macs
    autotune.set_autotune(True, min_macs=0)  # every call of a new shape is measured
    autotune.clear_cache()
    try:
        for batch in (4, 4, 3):
            x = torch.randn(batch, 16, 8, 8, requires_grad=True)
            checkpoint(block, x, use_reentrant=False).square().sum().backward()
            got = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
            block.zero_grad()
            x.grad = None
            block(x).square().sum().backward()
            want = [x.grad] + [p.grad for p in block.parameters()]
            block.zero_grad()
            assert all(rel_err(g, w) < 1e-5 for g, w in zip(got, want, strict=True)), batch
        assert autotune.stats()["measurements"] > 0
    finally:
        autotune.set_autotune(*was)
        autotune.clear_cache()


@pytest.mark.skipif(not prepacked.available(), reason="needs oneDNN's prepacked conv ops")
def test_packed_kernels_follow_an_edit_through_data():
    """`.data` edits do not bump the version counter; the packed copy must still follow."""
    torch.manual_seed(0)
    layer = moved_router(DynamicConv2d(CHANNELS, CHANNELS, 3, padding=1, strategy="packed"))
    layer.eval()
    x = torch.randn(2, CHANNELS, 8, 8)
    with torch.no_grad():
        layer(x)
        assert prepacked.stats()["packs"] >= 1
        layer.weight.data.mul_(2.0)
        assert rel_err(layer(x), float64_reference(layer, x)) < 1e-5


def test_conv2d_same_from_conv_takes_only_timms_conv2d_same():
    """Anything else pads otherwise or changes its kernel first: never swapped silently."""
    for conv in (nn.Conv2d(4, 4, 3, padding=2, padding_mode="reflect"), StdConv2dSame(4, 4, 3)):
        with pytest.raises(TypeError, match="expected timm's Conv2dSame"):
            DynamicConv2dSame.from_conv(conv)
    conv = Conv2dSame(4, 4, 3, stride=2)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert rel_err(DynamicConv2dSame.from_conv(conv)(x), conv(x)) < 1e-5


@pytest.mark.parametrize("strategy", ["auto", "grouped", "unfold", "loop", "packed", "static"])
def test_channels_last_in_channels_last_out_like_nn_conv2d(strategy):
    torch.manual_seed(0)
    layer = moved_router(DynamicConv2d(8, 16, 3, padding=1, strategy=strategy)).eval()
    x = torch.randn(3, 8, 7, 7)
    with torch.no_grad():
        out = layer(x.contiguous(memory_format=torch.channels_last))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(out, float64_reference(layer, x)) < 1e-5
        assert layer(x).is_contiguous()  # and contiguous stays contiguous


@pytest.mark.parametrize(
    ("conv", "shape", "layout"),
    [
        (nn.Conv1d(4, 4, 3, padding=1), (2, 4, 9), torch.channels_last),
        (nn.Conv2d(4, 4, 3, padding=1), (2, 4, 6, 6), torch.channels_last),
        (nn.Conv3d(4, 4, 3, padding=1), (2, 4, 4, 4, 4), torch.channels_last_3d),
    ],
)
def test_module_to_a_memory_format_and_dtype_works_where_it_does_for_the_conv(conv, shape, layout):
    """timm's train script calls model.to(memory_format=channels_last): K kernels are one
    dim more than a conv's weight and keep their layout; the rest converts as usual."""
    torch.manual_seed(0)
    conv.to(memory_format=layout)  # what torch accepts for the static conv
    layer = moved_router(DynamicConvNd.from_conv(conv)).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        before = layer(x)
        layer.to(memory_format=layout)
        layer.to(torch.float64)
        assert layer.weight.dtype == torch.float64 and layer.weight.is_contiguous()
        assert rel_err(layer(x.double()), before) < 1e-5


PADDINGS = [(0, 3, 1), (1, 3, 2), ((1, 2), 3, 1), ("same", 4, 1), ("valid", 3, 2)]


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(("padding", "kernel", "stride"), PADDINGS)
def test_output_memory_format_follows_nn_conv2d_for_every_padding(
    padding_mode, padding, kernel, stride
):
    """nn.Conv2d's own F.pad decides its output layout (circular padding drops channels_last)."""
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, padding_mode=padding_mode)
    layer = DynamicConvNd.from_conv(conv).eval()
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = conv(x), layer(x)
    for layout in (torch.channels_last, torch.contiguous_format):
        assert want.is_contiguous(memory_format=layout) == got.is_contiguous(memory_format=layout)
    assert rel_err(got, want) < 1e-5


FORCED = ["auto", "grouped", "unfold", "loop", "packed", "static"]


@pytest.mark.parametrize("strategy", FORCED)
def test_per_sample_gradients_with_torch_func_in_training_mode(strategy):
    """vmap(grad(...)) (Opacus-style per-sample gradients) equals one backward per sample,
    in float64, with the memory-lean backward switched on as by default."""
    torch.manual_seed(0)
    layer = moved_router(DynamicConv2d(6, 8, 3, padding=1, strategy=strategy)).double().train()
    x = torch.randn(4, 6, 7, 7, dtype=torch.float64)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(weights, sample):
        return functional_call(layer, weights, (sample.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for b in range(x.shape[0]):
        layer.zero_grad()
        layer(x[b : b + 1]).square().sum().backward()
        for name, p in layer.named_parameters():
            assert rel_err(per_sample[name][b], p.grad) < 1e-10, (name, b)


@pytest.mark.parametrize("strategy", FORCED)
def test_vmap_forward_in_eval_then_the_plain_call(strategy):
    """Under vmap every strategy runs as pure tensor ops; the reused buffers of the plain
    call (large layer) are not disturbed by it."""
    layer, x, want = large_layer_in_eval(strategy, batch=3)
    with torch.no_grad():
        assert rel_err(layer(x), want) < 1e-5
        assert rel_err(vmap(lambda sample: layer(sample.unsqueeze(0))[0])(x), want) < 1e-5
        assert rel_err(layer(x), want) < 1e-5


@pytest.mark.parametrize("strategy", ["auto", "loop", "unfold"])
def test_forward_mode_jvp_matches_a_central_difference(strategy):
    torch.manual_seed(0)
    layer = moved_router(DynamicConv2d(6, 8, 3, padding=1, strategy=strategy)).double().train()
    x, direction = torch.randn(2, 3, 6, 7, 7, dtype=torch.float64).unbind(0)
    out, tangent = jvp(layer, (x,), (direction,))
    eps = 1e-6
    with torch.no_grad():
        central = (layer(x + eps * direction) - layer(x - eps * direction)) / (2 * eps)
        assert rel_err(out, layer(x)) < 1e-12
    assert rel_err(tangent, central) < 1e-7


def test_torch_compile_matches_eager_in_training_and_eval():
    """aot_eager runs dynamo and AOTAutograd (what inductor starts from) without a C++
    compiler; the strategy choice then comes from the cost model."""
    torch.manual_seed(0)
    layer = moved_router(DynamicConv2d(16, 16, 3, padding=1))
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    want = layer(x)
    want.square().sum().backward()
    want_grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, backend="aot_eager")
        got = compiled(x)
        got.square().sum().backward()
        assert rel_err(got, want) < 1e-6
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        for have, expected in zip(grads, want_grads, strict=True):
            assert rel_err(have, expected) < 1e-5
        layer.eval()
        with torch.no_grad():
            assert rel_err(compiled(x), float64_reference(layer, x)) < 1e-5
    finally:
        torch._dynamo.reset()
