"""The memory-lean backward: exact gradients (gradcheck in float64) and no saved mixed kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from reference import per_sample_reference

from dynconvert import DynamicConv1d, DynamicConv2d, DynamicConv3d
from dynconvert.engine import STRATEGIES, lean_backward
from dynconvert.engine.lean_backward import LeanDynamicConv, lean_forward

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


# -- the switch: DYNCONVERT_LEAN_BACKWARD=0 / set_lean_backward(False) ----------------------


@pytest.fixture
def lean_switch():
    """Yields ``set_lean_backward`` and restores the setting the session started with."""
    enabled = lean_backward.lean_backward_enabled()
    yield lean_backward.set_lean_backward
    lean_backward.set_lean_backward(enabled)


SWITCH_CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, stride=2),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),  # depthwise
    dict(in_channels=4, out_channels=6, kernel_size=1, bias=False),
]


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "plain"])
@pytest.mark.parametrize("case", SWITCH_CASES, ids=["3x3s2", "dw", "1x1"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gradients_match_float64_with_the_switch_either_way(lean_switch, lean, case, batch):
    lean_switch(lean)
    layer = _layer(2, case).float()
    ref_layer = _layer(2, case)
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(batch, case["in_channels"], 7, 7)
    x64 = x.double().requires_grad_()
    ref = per_sample_reference(ref_layer, x64)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    names = [s for s in STRATEGIES if batch == 1 or s != "dense"] + ["auto"]
    for name in names:
        layer.strategy = name
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = layer(xg)
        assert rel_err(out, ref) <= 1e-5, name
        out.backward(grad.float())
        assert rel_err(xg.grad, x64.grad) <= 1e-5, (name, "input")
        for (pname, p), p64 in zip(layer.named_parameters(), ref_layer.parameters(), strict=True):
            tol = 1e-4 if pname.startswith("attention") else 1e-5  # softmax Jacobian rounding
            assert rel_err(p.grad, p64.grad) <= tol, (name, pname)


@pytest.mark.parametrize("strategy", ["grouped", "loop", "unfold", "auto"])
def test_switch_changes_which_path_runs(lean_switch, strategy):
    """On: a LeanDynamicConv node saving no mixed kernels. Off: autograd keeps B·|W| more."""
    batch = 16
    layer = DynamicConv2d(32, 32, 3, padding=1, k=4, bias=False, strategy=strategy)
    # 15×15 outputs: above tuning.STATIC_MAX_OUTPUTS, so `auto` never picks `static`
    # (which has no lean backward) however the timing falls.
    x = torch.randn(batch, 32, 15, 15, requires_grad=True)
    mixed_bytes = batch * layer.weight[0].numel() * 4
    lean_switch(True)
    assert type(layer(x).grad_fn).__name__ == "LeanDynamicConvBackward"
    lean = _saved_bytes(lambda: layer(x))
    lean_switch(False)
    assert type(layer(x).grad_fn).__name__ != "LeanDynamicConvBackward"
    plain = _saved_bytes(lambda: layer(x))
    assert plain - lean >= mixed_bytes
    with torch.no_grad():  # where autograd does not record the switch changes nothing
        lean_switch(True)
        on = layer(x)
        lean_switch(False)
        assert torch.equal(layer(x), on)


def test_environment_variable_switches_it_off():
    code = "from dynconvert.engine import lean_backward as m; print(m.lean_backward_enabled())"
    env = {**os.environ, "DYNCONVERT_LEAN_BACKWARD": "0"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "False", run.stderr


def test_autotune_times_the_backward_that_will_run(lean_switch):
    """Training-mode choices are cached apart for the lean and the plain backward."""
    from dynconvert.engine import SWITCHES, autotune

    enabled, min_macs = SWITCHES.autotune, SWITCHES.min_macs
    autotune.set_autotune(True, min_macs=0)
    autotune.clear_cache()
    try:
        layer = DynamicConv2d(8, 8, 3, padding=1, k=4)
        x = torch.randn(2, 8, 6, 6, requires_grad=True)
        for lean in (True, False):
            lean_switch(lean)
            before = autotune.stats()["measurements"]
            layer(x).sum().backward()
            assert autotune.stats()["measurements"] > before, lean
        assert len(autotune.cache()) == 2
    finally:
        autotune.set_autotune(enabled, min_macs=min_macs)
        autotune.clear_cache()


@pytest.mark.parametrize("strategy", ["grouped", "loop", "unfold", "dense"])
def test_in_place_activation_after_the_layer(strategy):
    """timm's SE blocks run ``SiLU(inplace=True)`` on a conv output; the gradient stays exact."""
    layer = _layer(2, dict(in_channels=4, out_channels=6, kernel_size=1)).float()
    layer.strategy = strategy
    batch = 1 if strategy == "dense" else 3
    x = torch.randn(batch, 4, 1, 1, requires_grad=True)
    grads = []
    for inplace in (True, False):
        out = torch.nn.functional.silu(layer(x), inplace=inplace)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *layer.parameters()]))
    for got, ref in zip(*grads, strict=True):
        assert rel_err(got, ref) <= 1e-6
