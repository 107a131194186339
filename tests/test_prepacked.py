"""The ``packed`` strategy: kernels mixed in oneDNN's blocked layout (issue 6).

Its numbers against the float64 reference, its cache of packed kernels (built once per
weight version, rebuilt when the weights change, never saved with the model), and its
fallback to ``loop`` wherever oneDNN cannot take it.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import rel_err
from reference import per_sample_reference as reference
from test_strategies import make_layer

from dynconvert import DynamicConv1d, DynamicConv2d
from dynconvert.engine import STRATEGIES, SWITCHES, autotune, prepacked, tuning

needs_onednn = pytest.mark.skipif(
    not prepacked.available(), reason="this PyTorch build has no oneDNN (mkldnn) ops"
)

CASES = [
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=12, kernel_size=(3, 1), stride=2, padding=(1, 0), bias=False),
    dict(in_channels=8, out_channels=8, kernel_size=3, groups=8, padding="same"),  # depthwise
    dict(in_channels=8, out_channels=12, kernel_size=3, groups=4, dilation=2, padding=2),
    dict(in_channels=8, out_channels=16, kernel_size=1),
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=8, out_channels=16, kernel_size=3, padding="same", padding_mode="circular"),
]


@pytest.fixture(autouse=True)
def no_packs_left():
    yield
    prepacked.forget()


@needs_onednn
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_float64_and_nn_conv2d_memory_format(case, batch, channels_last):
    layer = make_layer(2, case, "packed")
    x = torch.randn(batch, 8, 9, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = prepacked.stats()["packs"]
    with torch.no_grad():
        expected = reference(copy.deepcopy(layer).double(), x.double())
        out = layer(x)
    assert prepacked.stats()["packs"] == before + 1  # the packed path ran, not its fallback
    assert out.shape == expected.shape
    assert rel_err(out, expected) <= 1e-5
    static = torch.nn.Conv2d(**case)  # the memory format nn.Conv2d returns for this input
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert static(x).is_contiguous(memory_format=fmt) == out.is_contiguous(memory_format=fmt)


@needs_onednn
def test_packs_once_and_repacks_when_the_weights_change():
    layer = make_layer(2, CASES[0], "packed")
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        first = layer(x)
        packs = prepacked.stats()["packs"]
        assert torch.equal(layer(x), first)
        assert prepacked.stats()["packs"] == packs  # cached
        assert prepacked.held_bytes() >= layer.weight.numel() * 4
        layer(torch.randn(2, 8, 5, 5))  # another input shape: its own pack
        assert prepacked.stats()["packs"] == packs + 1
        one_pack = prepacked.held_bytes() // 2
        for size in (6, 8, 9):  # more shapes: at most MAX_PACKS_PER_LAYER packs are kept
            layer(torch.randn(2, 8, size, size))
        assert prepacked.held_bytes() <= tuning.MAX_PACKS_PER_LAYER * one_pack
        layer(x)  # its pack was dropped for newer shapes: packed again
        packs = prepacked.stats()["packs"]
        layer.weight.mul_(2)  # an in-place edit (an optimizer step, load_state_dict)
        edited = layer(x)
    assert prepacked.stats()["packs"] == packs + 1
    with torch.no_grad():
        expected = reference(copy.deepcopy(layer).double(), x.double())
    assert rel_err(edited, expected) <= 1e-5
    layer.weight = torch.nn.Parameter(layer.weight.detach() * -1)  # a new tensor
    with torch.no_grad():
        replaced = layer(x)
    assert prepacked.stats()["packs"] == packs + 2
    assert rel_err(replaced, reference(copy.deepcopy(layer).double(), x.double())) <= 1e-5
    other = make_layer(2, CASES[0], "packed")
    other.load_state_dict(layer.state_dict())
    expected = reference(copy.deepcopy(layer).double(), x.double())
    with torch.no_grad():
        assert rel_err(other(x), expected) <= 1e-5
    prepacked.forget(layer)
    prepacked.forget(other)
    assert prepacked.held_bytes() == 0


@needs_onednn
def test_layers_of_one_geometry_share_the_target_but_not_their_kernels():
    a, b = make_layer(2, CASES[0], "packed"), make_layer(2, CASES[0], "packed")
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        ya, yb, ya2 = a(x), b(x), a(x)
        assert torch.equal(ya, ya2)
        assert not torch.allclose(ya, yb)
        assert rel_err(yb, reference(copy.deepcopy(b).double(), x.double())) <= 1e-5


def test_training_runs_loop_with_its_gradients():
    """With autograd recording, ``packed`` is the same per-sample computation as ``loop``."""
    layer = make_layer(2, CASES[0], "packed")
    x = torch.randn(3, 8, 7, 7)
    ref_layer = copy.deepcopy(layer).double()
    x64 = x.double().requires_grad_()
    reference(ref_layer, x64).square().sum().backward()
    before = prepacked.stats()["packs"]
    xg = x.clone().requires_grad_()
    out = layer(xg)
    assert type(out.grad_fn).__name__ == "LeanDynamicConvBackward"
    out.square().sum().backward()
    assert prepacked.stats()["packs"] == before  # nothing packed for a changing weight
    assert rel_err(xg.grad, x64.grad) <= 1e-5
    assert rel_err(layer.weight.grad, ref_layer.weight.grad) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_and_1d_fall_back_to_loop(dtype):
    layer = make_layer(2, CASES[0], "packed").to(dtype)
    conv1d = DynamicConv1d(8, 16, 3, padding=1, k=3, strategy="packed")
    x = torch.randn(2, 8, 7, 7)
    before = prepacked.stats()["packs"]
    with torch.no_grad():
        expected = reference(copy.deepcopy(layer).double(), x.double())
        tol = 1e-12 if dtype == torch.float64 else 3e-2
        assert rel_err(layer(x.to(dtype)), expected) <= tol
        x1 = torch.randn(2, 8, 11)
        assert rel_err(conv1d(x1), reference(copy.deepcopy(conv1d).double(), x1.double())) <= 1e-5
    assert prepacked.stats()["packs"] == before


@needs_onednn
def test_saved_weights_and_copies_hold_no_packs():
    layer = make_layer(2, CASES[0], "packed")
    x = torch.randn(2, 8, 7, 7)
    keys = set(layer.state_dict())
    with torch.no_grad():
        expected = layer(x)
    assert set(layer.state_dict()) == keys
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    loaded = make_layer(2, CASES[0], "packed")
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(clone(x), expected)


@needs_onednn
def test_autotune_times_packed_in_eval_only_and_frees_a_loser(monkeypatch):
    enabled, min_macs = SWITCHES.autotune, SWITCHES.min_macs
    autotune.clear_cache()
    autotune.set_autotune(True, min_macs=0)

    def packed_loses(layer, x, attn, candidates):
        for fn in candidates.values():
            fn(layer, x, attn)  # packs this layer's kernels
        assert prepacked.held_bytes() > 0
        return {name: 2.0 if name == "packed" else 1.0 for name in candidates}

    monkeypatch.setattr(autotune, "measure", packed_loses)
    try:
        layer = DynamicConv2d(8, 8, 3, padding=1, k=4)
        x = torch.randn(3, 8, 10, 10)
        with torch.no_grad():
            assert "packed" in autotune.eligible(layer, x, STRATEGIES)
            layer(x)
        assert "packed" not in autotune.eligible(layer, x.requires_grad_(), STRATEGIES)
        assert list(autotune.cache().values()) == ["grouped"]  # the first of the equal ones
        assert prepacked.held_bytes() == 0
    finally:
        autotune.set_autotune(enabled, min_macs=min_macs)
        autotune.clear_cache()


@needs_onednn
def test_batch_one_eval_times_packed_against_dense_on_large_kernels_only():
    small = DynamicConv2d(8, 8, 3, padding=1, k=4)
    large = DynamicConv2d(256, 256, 3, padding=1, k=4)  # 4 x 2.25 MiB of kernels
    assert large.weight.numel() * 4 >= tuning.PACKED_MIN_BYTES_AT_BATCH_1
    with torch.no_grad():
        batched = {"dense", "grouped", "unfold", "loop"}
        assert set(autotune.eligible(small, torch.randn(1, 8, 7, 7), STRATEGIES)) == batched
        x = torch.randn(1, 256, 7, 7)
        assert set(autotune.eligible(large, x, STRATEGIES)) == batched | {"packed"}
    assert "packed" not in autotune.eligible(large, x.requires_grad_(), STRATEGIES)


def test_a_geometry_onednn_gets_wrong_falls_back_to_loop():
    """oneDNN's prepacked conv returns garbage here (torch 2.14.1; found by property tests)."""
    layer = DynamicConv2d(1, 1, (2, 4), stride=(1, 3), padding=1, bias=False, k=1,
                          strategy="packed")  # fmt: skip
    x = torch.randn(1, 1, 2, 4)
    with torch.no_grad():
        for _ in range(3):
            assert rel_err(layer(x), reference(copy.deepcopy(layer).double(), x.double())) <= 1e-5


@needs_onednn
def test_an_edit_through_data_that_misses_a_strided_sample_still_repacks():
    layer = make_layer(2, dict(in_channels=8, out_channels=8, kernel_size=3, padding=1), "packed")
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        layer(x)
        layer.weight.data[:, :, :, 1, 1] = 0  # every centre tap: no version bump
        edited = layer(x)
        expected = reference(copy.deepcopy(layer).double(), x.double())
    assert rel_err(edited, expected) <= 1e-5


_OUTPUTS_OF_PADDING_ONLY = """
import torch
from dynconvert.layers import DynamicConv2d
torch.manual_seed(0)
for kwargs, size in [
    (dict(in_channels=2, out_channels=6, kernel_size=(5, 2), stride=(1, 2), padding=(0, 3),
          dilation=(3, 2), groups=2), (2, 2, 15, 1)),
    (dict(in_channels=16, out_channels=1, kernel_size=1, stride=(1, 3), padding=(3, 2),
          dilation=2), (2, 16, 1, 1)),
]:
    layer = DynamicConv2d(**kwargs, strategy="packed").eval()
    x = torch.randn(size)
    with torch.no_grad():
        got = layer(x)
        layer.strategy = "loop"
        want = layer(x)
    print(float((got - want).abs().max() / want.abs().max()))
"""


@needs_onednn
def test_geometries_with_outputs_that_read_only_padding_do_not_crash():
    """oneDNN's prepacked conv with a bias segfaulted on these (a subprocess survives that)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _OUTPUTS_OF_PADDING_ONLY], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    errors = [float(line) for line in result.stdout.split()]
    assert len(errors) == 2 and max(errors) <= 1e-5
