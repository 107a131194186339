"""Every forward strategy against a float64 reference, forward and backward (issue 6).

Covers the strategies added for speed (``unfold``: im2col + batched GEMM, 1×1 as a plain
batched GEMM, its channels_last variant) and the reuse of scratch buffers: a buffer is shared
by consecutive calls, so outputs must never alias it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err
from reference import per_sample_reference as reference

from dynconvert import DynamicConv1d, DynamicConv2d, DynamicConv3d, DynamicConvNd
from dynconvert.engine import STRATEGIES, DynamicConvSpec, direct, tuning, workspace
from dynconvert.layers import DynamicConv2dSame, DynamicStdConv2d
from dynconvert.layers.std_conv import _CentredKernels

DYNAMIC = {1: DynamicConv1d, 2: DynamicConv2d, 3: DynamicConv3d}
SPATIAL = {1: 13, 2: 8, 3: 5}

CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, dilation=2, padding=2),
    dict(in_channels=6, out_channels=4, kernel_size=2, groups=2, bias=False),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4),  # depthwise ×2
    dict(in_channels=4, out_channels=6, kernel_size=1),
    dict(in_channels=4, out_channels=6, kernel_size=1, stride=2, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=1, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular"),
]
GRID = [pytest.param(n, case, id=f"{n}d-{i}") for n in (1, 2, 3) for i, case in enumerate(CASES)]


def make_layer(n: int, case: dict, strategy: str, dtype=torch.float32) -> DynamicConvNd:
    layer = DYNAMIC[n](**case, k=3, strategy=strategy, dtype=dtype)
    with torch.no_grad():
        layer.attention.fc2.weight.normal_(0, 1.0)
        layer.attention.fc2.bias.normal_(0, 1.0)
    return layer


def strategies(batch: int) -> list[str]:
    return [s for s in STRATEGIES if not (s == "dense" and batch != 1)] + ["auto"]


def check_every_strategy(
    layer: DynamicConvNd, x: torch.Tensor, device: str = "cpu", reference=reference
) -> None:
    """Every strategy of ``layer`` on ``device``, forward and backward, against the float64
    per-sample ``reference`` computed on CPU (also used by test_cuda.py, test_std_conv.py)."""
    ref_layer = copy.deepcopy(layer).double()
    x64 = x.double().requires_grad_()
    ref = reference(ref_layer, x64)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    layer.to(device)
    for name in strategies(x.shape[0]):
        layer.strategy = name
        layer.zero_grad(set_to_none=True)
        xg = x.to(device, copy=True).requires_grad_()
        out = layer(xg)
        assert out.device.type == device and out.shape == ref.shape, name
        assert rel_err(out.cpu(), ref) <= 1e-5, name
        out.backward(grad.float().to(device))
        assert rel_err(xg.grad.cpu(), x64.grad) <= 1e-5, (name, "input")
        for (pname, p), p64 in zip(layer.named_parameters(), ref_layer.parameters(), strict=True):
            # The router's gradient is a softmax Jacobian product: a difference of nearly
            # equal float32 terms, so it carries a few more ulps of rounding.
            tol = 1e-4 if pname.startswith("attention") else 1e-5
            assert p.grad.device.type == device, (name, pname)
            assert rel_err(p.grad.cpu(), p64.grad) <= tol, (name, pname)


def test_every_layer_and_the_std_conv_view_is_what_the_engine_reads():
    """engine.DynamicConvSpec names everything the engine reads from a layer."""
    std = DynamicStdConv2d(4, 6, 3)
    for layer in (
        DynamicConv1d(4, 6, 3),
        DynamicConv2d(4, 6, 3),
        DynamicConv3d(4, 6, 3),
        DynamicConv2dSame(4, 6, 3),
        std,
        _CentredKernels(std, std.centred_kernels()),
    ):
        assert isinstance(layer, DynamicConvSpec), type(layer).__name__


@pytest.mark.parametrize(("n", "case"), GRID)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_and_backward_match_float64(n, case, batch):
    x = torch.randn(batch, case["in_channels"], *(SPATIAL[n],) * n)
    check_every_strategy(make_layer(n, case, "auto"), x)


@pytest.mark.parametrize(("n", "case"), GRID)
@pytest.mark.parametrize("batch", [1, 3])
def test_eval_forward_matches_float64(n, case, batch, monkeypatch):
    """Without autograd, and for kernels big enough, the CPU loop mixes each sample's kernel
    into one reused buffer just before its conv."""
    streamed = []
    mix_one = direct.mix_one_into
    monkeypatch.setattr(
        direct,
        "mix_one_into",
        lambda *args: streamed.append(1) or mix_one(*args),
    )
    x = torch.randn(batch, case["in_channels"], *(SPATIAL[n],) * n)
    layer = make_layer(n, case, "auto")
    with torch.no_grad():
        ref = reference(copy.deepcopy(layer).double(), x.double())
        for name in strategies(batch):
            layer.strategy = name
            assert rel_err(layer(x), ref) <= 1e-5, name
            if name == "packed":  # always streams, into oneDNN's kernel (test_prepacked.py)
                streamed.clear()
    assert not streamed  # kernels this small are mixed by one GEMM
    monkeypatch.setattr(tuning, "STREAM_MIX_MIN_BYTES", 0)
    layer.strategy = "loop"
    with torch.no_grad():
        first = layer(x)
        assert len(streamed) == batch
        assert rel_err(first, ref) <= 1e-5
        assert torch.equal(layer(x), first)  # the shared buffer left no trace


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_channels_last_inputs(groups, stride, kernel_size):
    layer = make_layer(
        2, dict(in_channels=8, out_channels=6, kernel_size=kernel_size, stride=stride,
                groups=groups), "unfold",
    )  # fmt: skip
    x = torch.randn(3, 8, 9, 9)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = reference(copy.deepcopy(layer).double(), x.double())
        for name in strategies(3):
            layer.strategy = name
            assert rel_err(layer(x_cl), expected) <= 1e-5, name
    xg = x_cl.clone().requires_grad_()
    layer.strategy = "unfold"
    layer(xg).sum().backward()
    x64 = x.double().requires_grad_()
    reference(copy.deepcopy(layer).double(), x64).sum().backward()
    assert rel_err(xg.grad, x64.grad) <= 1e-5


@pytest.mark.parametrize("name", ["grouped", "loop", "unfold"])
@pytest.mark.parametrize("stream", [False, True])
def test_scratch_buffers_never_alias_outputs(name, stream, monkeypatch):
    """Consecutive calls share scratch memory; earlier outputs must stay what they were."""
    # Kernels this small skip the buffers unless told otherwise.
    monkeypatch.setattr(tuning, "SCRATCH_MIN_BYTES", 0)
    monkeypatch.setattr(tuning, "STREAM_MIX_MIN_BYTES", 0 if stream else 2**62)
    layer = make_layer(2, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), name)
    x1, x2 = torch.randn(2, 4, 7, 7), torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        y1 = layer(x1)
        kept = y1.clone()
        layer(x2)
        assert torch.equal(y1, kept)
        assert workspace.held_bytes() > 0
    # With autograd recording, two forwards then two backwards: saved tensors are intact.
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    ya, yb = layer(a), layer(b)
    (ya.sum() + yb.sum()).backward()
    ref_layer = copy.deepcopy(layer).double()
    a64, b64 = x1.double().requires_grad_(), x2.double().requires_grad_()
    (reference(ref_layer, a64).sum() + reference(ref_layer, b64).sum()).backward()
    assert rel_err(a.grad, a64.grad) <= 1e-5
    assert rel_err(b.grad, b64.grad) <= 1e-5
    workspace.release()
    assert workspace.held_bytes() == 0


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stream", [False, True])
def test_bfloat16_runs_every_strategy(n, stream, monkeypatch):
    monkeypatch.setattr(tuning, "STREAM_MIX_MIN_BYTES", 0 if stream else 2**62)
    layer = make_layer(n, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), "auto")
    x = torch.randn(2, 4, *(SPATIAL[n],) * n)
    expected = reference(copy.deepcopy(layer).double(), x.double())
    layer = layer.to(torch.bfloat16)
    with torch.no_grad():
        for name in strategies(2):
            layer.strategy = name
            out = layer(x.bfloat16())
            assert out.dtype == torch.bfloat16
            assert rel_err(out, expected) <= 3e-2, name


@pytest.mark.parametrize("n", [1, 2])
def test_autocast_forward_and_backward(n):
    """Under bf16 autocast no scratch buffer of the wrong dtype is used; grads stay float32."""
    layer = make_layer(n, dict(in_channels=8, out_channels=8, kernel_size=3, padding=1), "auto")
    x = torch.randn(2, 8, *(SPATIAL[n],) * n)
    x64 = x.double().requires_grad_()
    ref_layer = copy.deepcopy(layer).double()
    reference(ref_layer, x64).sum().backward()
    for name in strategies(2):
        layer.strategy = name
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(xg)
        out.float().sum().backward()
        assert xg.grad.dtype == layer.weight.grad.dtype == torch.float32
        assert rel_err(xg.grad, x64.grad) <= 3e-2, name
        assert rel_err(layer.weight.grad, ref_layer.weight.grad) <= 3e-2, name


@pytest.mark.parametrize(("n", "case"), GRID)
@pytest.mark.parametrize("name", [s for s in STRATEGIES if s != "dense"] + ["auto"])
def test_empty_batch_gives_the_convs_empty_output(n, case, name):
    layer = make_layer(n, case, name)
    conv = type(layer).conv_type(**case)
    x = torch.randn(0, case["in_channels"], *(SPATIAL[n],) * n, requires_grad=True)
    out = layer(x)
    assert out.shape == conv(x).shape
    out.sum().backward()  # a zero-size batch still trains (an uneven last shard)
    assert x.grad.shape == x.shape
    with torch.no_grad():
        assert layer.eval()(x).shape == conv(x).shape


def test_input_keyword_as_in_nn_conv():
    layer = make_layer(2, CASES[0], "auto")
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(layer(input=x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "value"), [(torch.float16, 1e-8), (torch.float16, 1e6),
                                              (torch.float32, 1e-46)])  # fmt: skip
def test_temperature_that_rounds_to_zero_or_inf_is_refused(dtype, value):
    layer = make_layer(2, CASES[0], "auto", dtype=dtype)
    with pytest.raises(ValueError, match="pick a value that dtype can hold"):
        layer.set_temperature(value)
    assert layer.temperature == 1.0


@pytest.mark.parametrize("name", [s for s in STRATEGIES if s != "dense"] + ["auto"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_a_sliced_channels_last_input_gives_the_convs_layout(name, kernel_size):
    case = dict(in_channels=4, out_channels=6, kernel_size=kernel_size, padding=kernel_size // 2)
    layer, conv = make_layer(2, case, name), torch.nn.Conv2d(**case)
    x = torch.randn(3, 4, 7, 7).contiguous(memory_format=torch.channels_last)[:, :, 1:]
    with torch.no_grad():
        got, want = layer(x), conv(x)
    assert got.stride() == want.stride() and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, reference(layer.double(), x.double())) <= 1e-5


@pytest.mark.parametrize("name", ["grouped", "unfold", "loop", "static"])
def test_a_one_channel_channels_last_input_gives_the_convs_layout(name):
    case = dict(in_channels=1, out_channels=4, kernel_size=3, padding=1)
    layer, conv = make_layer(2, case, name), torch.nn.Conv2d(**case)
    x = torch.randn(2, 1, 6, 6).contiguous(memory_format=torch.channels_last)  # a grey stem
    with torch.no_grad():
        assert layer(x).stride() == conv(x).stride()
