"""CUDA correctness and mixed precision: layers, conversion, autotune, finetune and export on a GPU.

Everything is skipped without CUDA. TF32 is switched off (it rounds float32 matmuls and convs
to a 10-bit mantissa), so float32 results are held to the float64 reference as on CPU.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import timm
import torch
from conftest import rel_err
from export_models import Mixed, build
from finetune_helpers import QUIET, tensor_data, tiny_model
from reference import per_sample_reference as reference
from test_strategies import GRID, SPATIAL, check_every_strategy, make_layer, strategies
from torch import nn

import dynconvert
from dynconvert import DynamicConv2d, DynamicConvNd
from dynconvert.engine import autotune, lean_backward
from dynconvert.finetune.precision import AMP_DTYPES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timm_coverage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(params=[True, False], ids=["lean", "plain"])
def lean(request):
    enabled = lean_backward.lean_backward_enabled()
    lean_backward.set_lean_backward(request.param)
    yield request.param
    lean_backward.set_lean_backward(enabled)


def err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rel_err across devices (the reference lives on CPU)."""
    return rel_err(out.detach().cpu(), ref.detach().cpu())


def on_device(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == DEVICE for t in tensors)


# -- 1. every strategy against the float64 CPU reference -------------------------------------


@pytest.mark.parametrize(("n", "case"), GRID)
@pytest.mark.parametrize("batch", [1, 3])
def test_every_strategy_matches_float64_forward_and_backward(n, case, batch, lean):
    x = torch.randn(batch, case["in_channels"], *(SPATIAL[n],) * n)
    layer = make_layer(n, case, "auto")
    check_every_strategy(layer, x, DEVICE)
    assert on_device(layer)


# -- 2. channels_last inputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        dict(in_channels=8, out_channels=6, kernel_size=3, padding=1),
        dict(in_channels=8, out_channels=6, kernel_size=3, stride=2, groups=2),
        dict(in_channels=8, out_channels=6, kernel_size=1),
    ],
    ids=["3x3", "3x3s2g2", "1x1"],
)
def test_channels_last_input_matches_contiguous_and_the_convs_layout(case):
    layer = make_layer(2, case, "auto")
    x = torch.randn(3, 8, 9, 9)
    expected = reference(copy.deepcopy(layer).double(), x.double()).detach()
    layer.to(DEVICE)
    conv = nn.Conv2d(**case).to(DEVICE)
    x = x.to(DEVICE)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, want_cl = conv(x), conv(x_cl)
        for name in strategies(3):
            layer.strategy = name
            out, out_cl = layer(x), layer(x_cl)
            assert err(out_cl, out) <= 1e-5 and err(out_cl, expected) <= 1e-5, name
            assert out.stride() == want.stride(), name
            assert out_cl.stride() == want_cl.stride(), name
    assert want_cl.is_contiguous(memory_format=torch.channels_last)  # cuDNN's own choice
    xg = x_cl.clone().requires_grad_()
    layer.strategy = "auto"
    layer(xg).square().sum().backward()
    x64 = x.cpu().double().requires_grad_()
    reference(copy.deepcopy(layer).cpu().double(), x64).square().sum().backward()
    assert err(xg.grad, x64.grad) <= 1e-5


@pytest.mark.parametrize("kind", ["std", "std_same", "scaled", "scaled_same"])
@pytest.mark.parametrize("batch", [1, 3])
def test_weight_standardized_layers_match_float64_every_strategy(kind, batch, lean):
    from test_std_conv import make_conv, make_input, randomize_router, std_reference

    from dynconvert.layers import DynamicStdConv2d

    layer = DynamicStdConv2d.from_conv(make_conv(kind, "strided"), k=3, noise=0.3)
    randomize_router(layer)
    check_every_strategy(layer, make_input(layer, batch), DEVICE, reference=std_reference)
    assert on_device(layer)


# -- 3. autocast --------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_forward_and_backward_every_strategy(amp):
    dtype = AMP_DTYPES[amp]
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), fp16 11 (2^-11 = 4.9e-4).
    # Inputs, kernels, router logits and output are each rounded once, errors are measured
    # against max |output| (about 2 roundoffs seen): 8 roundoffs for bf16, 10 for fp16. The
    # router's gradient, a softmax Jacobian product (a difference of nearly equal terms),
    # loses more: up to 2.9e-2 for bf16 (an H200) and 7.1e-3 for fp16 (CPU) were seen.
    tol, router_tol = {torch.bfloat16: (3e-2, 6e-2), torch.float16: (5e-3, 2e-2)}[dtype]
    case = dict(in_channels=8, out_channels=8, kernel_size=3, padding=1)
    layer = make_layer(2, case, "auto").to(DEVICE)
    conv = nn.Conv2d(**case).to(DEVICE)
    x = torch.randn(2, 8, 9, 9, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        conv_dtype = conv(x).dtype
    assert conv_dtype == dtype
    dtypes = {}
    for name in strategies(1):
        layer.strategy = name
        xb = x[:1] if name == "dense" else x
        results = []
        for autocast in (False, True):
            layer.zero_grad(set_to_none=True)
            xg = xb.clone().requires_grad_()
            with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
                out = layer(xg)
            out.float().square().sum().backward()
            grads = [xg.grad, layer.weight.grad, layer.attention.fc2.weight.grad]
            results.append((out, grads))
        (ref, ref_grads), (out, grads) = results
        dtypes[name] = out.dtype
        assert ref.dtype == torch.float32 and torch.isfinite(out).all(), name
        assert err(out, ref) <= tol, name
        for what, got, want in zip(("input", "weight", "router"), grads, ref_grads, strict=True):
            assert got.dtype == torch.float32 and torch.isfinite(got).all(), (name, what)
            assert err(got, want) <= (router_tol if what == "router" else tol), (name, what)
    assert dtypes == dict.fromkeys(dtypes, conv_dtype)  # every strategy gives nn.Conv2d's dtype


# -- 4. conversion on the GPU ---------------------------------------------------------------


def test_convert_timm_model_on_cuda_keeps_the_function():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    timm_coverage.randomise_norms(model)
    model.to(DEVICE)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    before = timm_coverage.outputs(model, x)
    converted, report = dynconvert.convert(model, k=4, example_input=x)
    assert converted is model and report.totals["converted"] >= 10
    layers = [m for m in model.modules() if isinstance(m, DynamicConvNd)]
    assert len(layers) == report.totals["converted"]
    assert on_device(model) and all(on_device(layer) for layer in layers)
    after = timm_coverage.outputs(model, x)
    for mode in ("eval", "train"):
        assert after[mode].device.type == DEVICE
        assert err(after[mode], before[mode]) <= timm_coverage.TOLERANCE, mode


# -- 5. the autotune cache ------------------------------------------------------------------


def test_autotune_measures_once_per_device(fresh_autotune):
    layer = DynamicConv2d(8, 8, 3, padding=1, k=4)
    with torch.no_grad():
        layer.attention.fc2.weight.normal_(0, 1.0)
    x = torch.randn(3, 8, 10, 10)
    expected = reference(copy.deepcopy(layer).double(), x.double()).detach()
    with torch.no_grad():
        layer(x)  # on CPU first: its entry must not answer for CUDA
        on_cpu = autotune.stats()["measurements"]
        assert on_cpu > 0 and len(autotune.cache()) == 1
        gpu_layer, x_gpu = copy.deepcopy(layer).to(DEVICE), x.to(DEVICE)
        out = gpu_layer(x_gpu)
        measured = autotune.stats()["measurements"]
        assert measured > on_cpu and len(autotune.cache()) == 2
        lookups = autotune.stats()["lookups"]
        assert torch.equal(gpu_layer(x_gpu), out)
        gpu_layer(x_gpu + 1)
        assert autotune.stats() == {"measurements": measured, "lookups": lookups + 2}
    devices = [{e.type for e in key if isinstance(e, torch.device)} for key in autotune.cache()]
    assert sorted(map(sorted, devices)) == [["cpu"], [DEVICE]]
    assert err(out, expected) <= 1e-5


# -- 6. fine-tuning -----------------------------------------------------------------------------


class RecordingScaler(torch.amp.GradScaler):
    steps: ClassVar[list[bool]] = []

    def step(self, optimizer, *args, **kwargs):
        RecordingScaler.steps.append(self.is_enabled())
        return super().step(optimizer, *args, **kwargs)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_finetune_with_amp_and_channels_last(amp, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    monkeypatch.setattr(RecordingScaler, "steps", [])
    model = tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model[0].register_forward_hook(
        lambda m, args, out: seen.append(
            (args[0].is_contiguous(memory_format=torch.channels_last), out.dtype)
        )
    )
    result = dynconvert.finetune(
        model, tensor_data(48), epochs=1, batch_size=8, lr=0.05, amp=amp, device=DEVICE,
        channels_last=True, temperature_start=4.0, temperature_end=2.0, **QUIET,
    )  # fmt: skip
    assert result.model is model
    assert math.isfinite(result.history[0]["train_loss"])
    # 6 steps through the scaler; it scales only for fp16 (bf16 needs no loss scaling).
    assert RecordingScaler.steps == [amp == "fp16"] * 6
    # channels_last input, low-precision conv
    assert seen and set(seen) == {(True, AMP_DTYPES[amp])}
    state = model.state_dict()
    assert all(t.device.type == DEVICE for t in state.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name in ("0.weight", "0.attention.fc2.weight", "3.weight", "8.weight"):
        assert not torch.equal(state[name].cpu(), start[name]), name
        assert torch.isfinite(state[name]).all(), name
    for layer in (model[0], model[3]):
        buffer = layer.attention.temperature
        assert buffer.device.type == DEVICE and buffer.dtype == torch.float32
        assert layer.temperature == pytest.approx(2.0)  # the schedule's end after 1 epoch


# -- 7. ONNX export of a model on the GPU ---------------------------------------------------


def test_onnx_export_of_a_cuda_model_has_a_dynamic_batch(tmp_path):
    for module in ("onnx", "onnxscript"):
        pytest.importorskip(module)
    ort = pytest.importorskip("onnxruntime")
    model = build("mixed").to(DEVICE)  # converted, random routers and BatchNorm statistics
    path = tmp_path / "mixed.onnx"
    result = dynconvert.export(
        model, path, "onnx", input_size=Mixed.input_size, batch_sizes=(1, 3), show=False
    )
    assert result.verified and [row["batch"] for row in result.rows] == [1, 3]
    assert model.training and on_device(model)  # left as it was
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    model.eval()
    for batch in (2, 5):
        x = torch.randn(batch, *Mixed.input_size, device=DEVICE)
        with torch.no_grad():
            want = model(x)
        (got,) = session.run(None, {name: x.cpu().numpy()})
        assert got.shape == tuple(want.shape)
        assert err(torch.from_numpy(got), want) <= 1e-4, batch
