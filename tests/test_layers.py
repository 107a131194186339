"""Parity of DynamicConv1d/2d/3d with nn.ConvNd and with a float64 reference (issue 2)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import rel_err
from reference import float64_reference, per_sample_reference
from timm.layers import Conv2dSame
from torch import nn

from dynconvert import DynamicConv1d, DynamicConv2d, DynamicConv3d, DynamicConvNd
from dynconvert.engine import STRATEGIES
from dynconvert.layers import DynamicConv2dSame

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
DYNAMIC = {1: DynamicConv1d, 2: DynamicConv2d, 3: DynamicConv3d}
SPATIAL = {1: 11, 2: 9, 3: 6}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def _t(n: int, *values: int) -> tuple[int, ...]:
    return tuple(values[i % len(values)] for i in range(n))


def option_grid(n: int) -> list[dict]:
    """One entry per nn.ConvNd option, each with in/out channels."""
    return [
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
        dict(
            in_channels=4,
            out_channels=6,
            kernel_size=_t(n, 3, 1, 2),
            stride=_t(n, 1, 2),
            padding=_t(n, 1, 0, 2),
            dilation=_t(n, 2, 1),
        ),
        dict(in_channels=4, out_channels=6, kernel_size=4, padding="same"),
        dict(in_channels=4, out_channels=6, kernel_size=_t(n, 2, 3), padding="same", dilation=2),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid"),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
        dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4),  # depthwise ×2
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False),
        dict(in_channels=4, out_channels=6, kernel_size=1, bias=False),
    ]


GRID = [
    pytest.param(n, opts, mode, id=f"{n}d-{i}-{mode}")
    for n in (1, 2, 3)
    for i, opts in enumerate(option_grid(n))
    for mode in PADDING_MODES
]


def make_input(n: int, channels: int, batch: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, channels, *(SPATIAL[n],) * n, dtype=dtype)


def randomize_router(layer: DynamicConvNd) -> None:
    """A non-uniform router, so that the mixing itself is exercised."""
    with torch.no_grad():
        layer.attention.fc2.weight.normal_(0, 1.0)
        layer.attention.fc2.bias.normal_(0, 1.0)


def strategies_for(batch: int) -> list[str]:
    return [s for s in STRATEGIES if not (s == "dense" and batch != 1)] + ["auto"]


# -- from_conv starts exactly where the conv was -------------------------------------------


@pytest.mark.parametrize(("n", "opts", "mode"), GRID)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_from_conv_equals_source_conv(n, opts, mode, training):
    conv = CONVS[n](**opts, padding_mode=mode).train(training)
    layer = DynamicConvNd.from_conv(conv, k=4)
    assert type(layer) is DYNAMIC[n]
    assert layer.training == training
    x = make_input(n, opts["in_channels"])
    with torch.no_grad():
        expected = conv(x)
        for strategy in strategies_for(x.shape[0]):
            layer.strategy = strategy
            assert rel_err(layer(x), expected) <= 1e-5, strategy


# -- every strategy equals the float64 reference, forward and backward ---------------------


@pytest.mark.parametrize(("n", "opts", "mode"), GRID)
def test_strategies_match_float64_reference(n, opts, mode):
    layer = DYNAMIC[n](**opts, padding_mode=mode, k=3, temperature=0.7)
    randomize_router(layer)
    x = make_input(n, opts["in_channels"])
    expected = float64_reference(layer, x)
    with torch.no_grad():
        for strategy in strategies_for(x.shape[0]):
            layer.strategy = strategy
            assert rel_err(layer(x), expected) <= 1e-5, strategy


def _grads(module: nn.Module, x: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor):
    names = [name for name, p in module.named_parameters()]
    params = [p for name, p in module.named_parameters()]
    grads = torch.autograd.grad(out, [x, *params], grad_out.to(out.dtype))
    return dict(zip(["input", *names], grads, strict=True))


@pytest.mark.parametrize(("n", "opts", "mode"), [p for i, p in enumerate(GRID) if i % 3 == 0])
@pytest.mark.parametrize("batch", [1, 3])
def test_gradients_match_float64_reference(n, opts, mode, batch):
    layer = DYNAMIC[n](**opts, padding_mode=mode, k=3)
    randomize_router(layer)
    x = make_input(n, opts["in_channels"], batch=batch).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ref_layer = copy.deepcopy(layer).double()
    ref_out = per_sample_reference(ref_layer, x64)
    grad_out = torch.randn_like(ref_out)
    expected = _grads(ref_layer, x64, ref_out, grad_out)
    assert set(expected) >= {"input", "weight", "attention.fc1.weight", "attention.fc2.weight"}
    for strategy in strategies_for(batch):
        layer.strategy = strategy
        got = _grads(layer, x, layer(x), grad_out)
        for name, g in got.items():
            assert rel_err(g, expected[name]) <= 1e-5, (strategy, name)


# -- dtypes, memory formats, devices ---------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_channels_last_and_non_contiguous_inputs(n, mode):
    conv = CONVS[n](8, 8, 3, padding=1, groups=2, padding_mode=mode)
    layer = DynamicConvNd.from_conv(conv)
    randomize_router(layer)
    fmt = torch.channels_last if n == 2 else torch.channels_last_3d
    x = make_input(n, 8, batch=4)
    x_cl = x.contiguous(memory_format=fmt)
    x_strided = torch.randn(4, 16, *(SPATIAL[n],) * n)[:, ::2]  # non-contiguous view
    assert not x_strided.is_contiguous()
    with torch.no_grad():
        for strategy in strategies_for(4):
            layer.strategy = strategy
            assert rel_err(layer(x_cl), layer(x)) <= 1e-6, strategy
            assert rel_err(layer(x_strided), float64_reference(layer, x_strided)) <= 1e-5


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_dtypes(dtype, tol, n):
    conv = CONVS[n](4, 6, 3, padding=1, dtype=dtype)
    layer = DynamicConvNd.from_conv(conv)
    assert layer.weight.dtype == dtype and layer.attention.temperature.dtype == dtype
    x = make_input(n, 4, dtype=dtype)
    with torch.no_grad():
        assert rel_err(layer(x), conv(x)) <= tol
        randomize_router(layer)
        for strategy in strategies_for(x.shape[0]):
            layer.strategy = strategy
            out = layer(x)
            assert out.dtype == dtype
            assert rel_err(out, float64_reference(layer, x)) <= tol, strategy


def test_factory_kwargs():
    layer = DynamicConv2d(4, 8, 3, device="meta", dtype=torch.float16)
    assert all(t.device.type == "meta" for t in layer.state_dict().values())
    assert all(t.dtype == torch.float16 for t in layer.state_dict().values())
    assert layer.weight.shape == (4, 8, 4, 3, 3) and layer.bias.shape == (4, 8)


def test_unbatched_input_matches_conv():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = DynamicConvNd.from_conv(conv)
    x = torch.randn(3, 8, 8)
    with torch.no_grad():
        assert rel_err(layer(x), conv(x)) <= 1e-5
        assert layer(x).shape == conv(x).shape


# -- from_conv: distinct kernels, a live router, carried properties -------------------------


def test_from_conv_kernels_differ_and_router_learns():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = DynamicConvNd.from_conv(conv, k=4)
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.equal(layer.weight[a], layer.weight[b])
    torch.testing.assert_close(layer.weight.mean(0), conv.weight, rtol=0, atol=1e-6)

    before = {n: p.detach().clone() for n, p in layer.attention.named_parameters()}
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 8, 10, 10)
    loss = (layer(x) * torch.randn(4, 16, 10, 10)).sum()
    loss.backward()
    assert layer.attention.fc2.weight.grad.abs().max() > 0
    optimizer.step()
    changed = [n for n, p in layer.attention.named_parameters() if not torch.equal(p, before[n])]
    assert "fc2.weight" in changed


def test_identical_kernels_give_router_no_gradient():
    """Why the perturbation exists: without it the router cannot learn."""
    layer = DynamicConvNd.from_conv(nn.Conv2d(8, 16, 3, padding=1), k=4, noise=0.0)
    layer(torch.randn(4, 8, 10, 10)).square().sum().backward()
    assert layer.attention.fc2.weight.grad.abs().max() <= 1e-5 * layer.weight.grad.abs().max()


def test_from_conv_carries_requires_grad_dtype_device():
    conv = nn.Conv1d(4, 4, 3, dtype=torch.float64).requires_grad_(False)
    layer = DynamicConvNd.from_conv(conv)
    assert layer.weight.dtype == torch.float64 and layer.weight.device == conv.weight.device
    assert not any(p.requires_grad for p in layer.parameters())
    conv = nn.Conv2d(4, 4, 3)
    conv.bias.requires_grad_(False)
    layer = DynamicConvNd.from_conv(conv)
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_from_conv_is_deterministic_for_a_generator():
    conv = nn.Conv2d(4, 4, 3)
    a = DynamicConvNd.from_conv(conv, generator=torch.Generator().manual_seed(1))
    b = DynamicConvNd.from_conv(conv, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.weight, b.weight)


def test_k_equal_one_is_the_conv():
    conv = nn.Conv2d(4, 4, 3)
    layer = DynamicConvNd.from_conv(conv, k=1)
    assert torch.equal(layer.weight[0], conv.weight)


# -- training at batch size 1, state, tracing ------------------------------------------------


def test_batch_size_one_trains():
    layer = DynamicConvNd.from_conv(nn.Conv2d(3, 8, 3, padding=1)).train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.attention.fc2.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        loss = layer(torch.randn(1, 3, 8, 8)).square().mean()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(layer.attention.fc2.weight, before)


def test_state_dict_round_trip_with_temperature(tmp_path):
    layer = DynamicConv2d(4, 8, 3, padding=1, k=3)
    randomize_router(layer)
    layer.set_temperature(12.5)
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert float(state["attention.temperature"]) == 12.5
    fresh = DynamicConv2d(4, 8, 3, padding=1, k=3)
    fresh.load_state_dict(state)
    assert fresh.temperature == 12.5
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(fresh(x), layer(x))


def test_temperature_changes_attention():
    layer = DynamicConv2d(4, 8, 3, k=4)
    randomize_router(layer)
    x = torch.randn(2, 4, 6, 6)
    sharp = layer.attention(x)
    layer.set_temperature(30.0)
    soft = layer.attention(x)
    assert (soft.max(1).values < sharp.max(1).values).all()
    torch.testing.assert_close(soft.sum(1), torch.ones(2))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dyn = DynamicConvNd.from_conv(nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.dyn(torch.relu(self.stem(x))).mean((2, 3)))


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, DynamicConvNd) or super().is_leaf_module(m, qualname)


def test_fx_symbolic_trace_with_dynamic_layer_as_leaf():
    net = _Net().eval()
    graph = _LeafTracer().trace(net)
    traced = torch.fx.GraphModule(net, graph)
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    assert "dyn" in targets
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(traced(x), net(x))


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1])
def test_bad_k_value(k):
    with pytest.raises(ValueError, match="k"):
        DynamicConv2d(4, 4, 3, k=k)
    with pytest.raises(ValueError, match="k"):
        DynamicConvNd.from_conv(nn.Conv2d(4, 4, 3), k=k)


@pytest.mark.parametrize("k", [1.5, "4", True])
def test_bad_k_type(k):
    with pytest.raises(TypeError, match="k"):
        DynamicConv2d(4, 4, 3, k=k)


@pytest.mark.parametrize(
    "module",
    [nn.Linear(4, 4), nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d(4)],
    ids=["linear", "conv_transpose", "batchnorm"],
)
def test_from_conv_rejects_non_convs(module):
    with pytest.raises(TypeError, match="conv"):
        DynamicConvNd.from_conv(module)


def test_from_conv_rejects_wrong_dimensionality():
    with pytest.raises(TypeError, match="Conv2d"):
        DynamicConv2d.from_conv(nn.Conv1d(4, 4, 3))


def test_from_conv_rejects_subclass_with_own_forward():
    class StandardizedConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return self._conv_forward(x, w, self.bias)

    with pytest.raises(TypeError, match="overrides forward"):
        DynamicConvNd.from_conv(StandardizedConv(4, 4, 3))


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="in_channels"):
        DynamicConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match="out_channels"):
        DynamicConv2d(4, 6, 3, groups=4)


def test_bad_input_channels_and_rank():
    layer = DynamicConv2d(4, 8, 3)
    with pytest.raises(ValueError, match="input: expected 4 channels, got 3"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"input: .*4-D"):
        layer(torch.randn(2, 4, 8, 8, 8))
    with pytest.raises(ValueError, match=r"input: .*4-D"):
        layer(torch.randn(4, 8))


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        DynamicConv2d(4, 4, 3, temperature=t)
    with pytest.raises(ValueError, match="temperature"):
        DynamicConv2d(4, 4, 3).set_temperature(t)
    with pytest.raises(ValueError, match="temperature"):
        DynamicConvNd.from_conv(nn.Conv2d(4, 4, 3), temperature=t)


def test_bad_options():
    with pytest.raises(ValueError, match="padding_mode"):
        DynamicConv2d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="padding"):
        DynamicConv2d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="strategy"):
        DynamicConv2d(4, 4, 3, strategy="fastest")
    with pytest.raises(TypeError, match="kernel_size"):
        DynamicConv2d(4, 4, (3, 3, 3))
    with pytest.raises(ValueError, match="ratio"):
        DynamicConv2d(4, 4, 3, ratio=0)
    with pytest.raises(ValueError, match="strategy: 'dense' needs batch size 1"):
        DynamicConv2d(4, 4, 3, strategy="dense")(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect"),
        lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False),
        lambda: nn.Conv2d(3, 5, (3, 2), padding=(1, 2), padding_mode="circular"),
        lambda: nn.Conv3d(2, 4, (1, 3, 3), dilation=(1, 2, 1), padding=1),
        lambda: Conv2dSame(3, 4, 3, stride=2),
    ],
)
def test_to_conv_inverts_from_conv_in_float64(make):
    """The mean of the K zero-sum-perturbed kernels is the original conv again, same type."""
    torch.manual_seed(0)
    conv = make().double().eval()
    dynamic = DynamicConv2dSame if isinstance(conv, Conv2dSame) else DynamicConvNd
    layer = dynamic.from_conv(conv, k=4, noise=0.5)
    back = layer.to_conv()
    assert type(back) is type(conv) and not back.training
    assert back.weight.dtype == torch.float64 and back.weight.device == conv.weight.device
    x = torch.randn(2, conv.in_channels, *[9] * (conv.weight.dim() - 2), dtype=torch.float64)
    assert rel_err(back(x), conv(x)) < 1e-12
    assert rel_err(back(x), layer(x)) < 1e-12
