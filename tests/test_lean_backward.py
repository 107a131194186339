"""The memory-lean backward: exact gradients (gradcheck in float64) and no saved mixed kernels."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from dynconvert import DynamicConv1d, DynamicConv2d, DynamicConv3d
from dynconvert.layers import STRATEGIES
from dynconvert.layers.lean_backward import LeanDynamicConv, lean_forward

DYNAMIC = {1: DynamicConv1d, 2: DynamicConv2d, 3: DynamicConv3d}
SPATIAL = {1: 6, 2: 4, 3: 3}
# (strategy, backward kind): every backward kind, each after the forward it pairs with.
PAIRS = [("grouped", "fold"), ("loop", "loop"), ("unfold", "unfold"), ("unfold", "fold")]
CASES = [
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=2, stride=2, dilation=1, bias=False),
    dict(in_channels=2, out_channels=2, kernel_size=3, dilation=2, padding=2, groups=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=2, out_channels=4, kernel_size=1, stride=2),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="circular"),
]


def _layer(n: int, case: dict) -> torch.nn.Module:
    layer = DYNAMIC[n](**case, k=3, dtype=torch.float64)
    with torch.no_grad():
        layer.attention.fc2.weight.normal_(0, 1.0)
        layer.attention.fc2.bias.normal_(0, 1.0)
    return layer


@pytest.mark.parametrize(
    ("n", "case"),
    [
        pytest.param(n, case, id=f"{n}d-case{i}")
        for n in (1, 2, 3)
        for i, case in enumerate(CASES)
        if n < 3 or i % 2 == 0  # 3-D is slow to gradcheck: every other case
    ],
)
def test_gradcheck_whole_layer(n, case):
    """Input, kernels, bias and router parameters, through padding modes, in float64."""
    layer = _layer(n, case)
    x = torch.randn(2, case["in_channels"], *(SPATIAL[n],) * n, dtype=torch.float64)
    x.requires_grad_()
    params = list(layer.parameters())
    for strategy in ("grouped", "loop", "unfold"):
        layer.strategy = strategy
        # The parameters are perturbed in place by gradcheck, so the layer sees them.
        assert torch.autograd.gradcheck(
            lambda x, *p: layer(x), (x, *params), atol=1e-7, fast_mode=True
        )


@pytest.mark.parametrize(("strategy", "kind"), PAIRS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_gradcheck_each_backward_kind(strategy, kind, n):
    """The Function on its own: x, the K kernels, bias and the attention as inputs."""
    if kind == "unfold" and n == 3:
        pytest.skip("unfold backward is 1-D/2-D (or 1×1) only; 3-D falls back to fold")
    layer = _layer(n, dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, groups=2))
    x = torch.randn(3, 4, *(SPATIAL[n] + 2,) * n, dtype=torch.float64, requires_grad=True)
    attn = torch.softmax(torch.randn(3, 3, dtype=torch.float64), 1).requires_grad_()

    def fn(x, weight, bias, attn):
        return LeanDynamicConv.apply(x, weight, bias, attn, layer, STRATEGIES[strategy], kind)

    inputs = (x, layer.weight, layer.bias, attn)
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-7, fast_mode=True)


def test_backward_kinds_agree_on_a_wider_layer():
    layer = DynamicConv2d(16, 24, 3, padding=1, stride=2, k=4)
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    attn = torch.softmax(torch.randn(4, 4), 1).requires_grad_()
    grads = {}
    for kind in ("fold", "loop", "unfold"):
        out = lean_forward(layer, x, attn, STRATEGIES["grouped"], kind)
        grads[kind] = torch.autograd.grad(out, [x, attn, layer.weight, layer.bias], out.detach())
    for kind in ("loop", "unfold"):
        for got, ref in zip(grads[kind], grads["fold"], strict=True):
            assert rel_err(got, ref) <= 1e-5, kind


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("strategy", ["grouped", "loop", "unfold"])
def test_no_mixed_kernels_saved_for_backward(strategy):
    """Autograd keeps x, the K kernels and (B, K) attention, not the B·|W| mixed kernels."""
    batch, k = 16, 4
    layer = DynamicConv2d(32, 32, 3, padding=1, k=k, bias=False, strategy=strategy)
    x = torch.randn(batch, 32, 6, 6, requires_grad=True)
    mixed_bytes = batch * layer.weight[0].numel() * 4

    lean = _saved_bytes(lambda: layer(x))

    def plain_autograd():  # the well-known way: autograd through mixing + grouped conv
        attn = layer.attention(x)
        w = (attn @ layer.weight.flatten(1)).view(-1, *layer.weight.shape[2:])
        torch.nn.functional.conv2d(x.reshape(1, -1, 6, 6), w, padding=1, groups=batch)

    plain = _saved_bytes(plain_autograd)
    assert plain - lean >= mixed_bytes
    # What lean does keep: x (twice: conv input and router), the K kernels, the router.
    router = sum(p.numel() * 4 for p in layer.attention.parameters())
    assert lean <= 2 * x.numel() * 4 + layer.weight.numel() * 4 + router + 64 * 1024
    out = layer(x)
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
