"""dynconvert.finetune precision and layout: AMP (bf16/fp16) and its scaler, channels_last."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import rel_err
from finetune_helpers import QUIET, tensor_data, tiny_model
from torch import nn

import dynconvert
from dynconvert import DynamicConv2d, DynconvertError


def test_a_step_the_fp16_scaler_skips_does_not_warn_about_the_schedule(monkeypatch):
    class SkipsFirstStep(torch.amp.GradScaler):  # as after an overflow at the start scale
        calls = 0

        def step(self, optimizer, *args, **kwargs):
            SkipsFirstStep.calls += 1
            if SkipsFirstStep.calls > 1:
                return super().step(optimizer, *args, **kwargs)
            return None

    monkeypatch.setattr(torch.amp, "GradScaler", SkipsFirstStep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dynconvert.finetune(tiny_model(), tensor_data(), epochs=1, batch_size=8, **QUIET)
    assert SkipsFirstStep.calls == 3
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu_autocasts_and_keeps_float32_weights(tmp_path, amp):
    from dynconvert.finetune.precision import AMP_DTYPES, autocast_supported

    dtype = AMP_DTYPES[amp]
    if not autocast_supported(torch.device("cpu"), dtype):  # older torch: fp16 is CPU-less
        with pytest.raises(DynconvertError, match=f"amp: {amp} autocast is not supported"):
            dynconvert.finetune(tiny_model(), tensor_data(), amp=amp, device="cpu", **QUIET)
        return
    model = tiny_model()
    seen: list[torch.dtype] = []
    hook = model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    result = dynconvert.finetune(
        model, tensor_data(), epochs=2, batch_size=8, lr=0.05, amp=amp, device="cpu", **QUIET
    )
    hook.remove()
    assert seen and set(seen) == {dtype}  # the dynamic convs ran in the low precision
    losses = [row["train_loss"] for row in result.history]
    assert all(math.isfinite(loss) for loss in losses) and losses[1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    path = dynconvert.save(model, tmp_path / "amp.pt")
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float32 for t in saved.values() if t.is_floating_point())
    x = tensor_data().tensors[0][:4]
    with torch.no_grad():
        assert torch.equal(dynconvert.load(path, model=tiny_model()).eval()(x), model.eval()(x))


def test_amp_the_device_cannot_do_is_one_clear_error(monkeypatch):
    from dynconvert.finetune import precision

    monkeypatch.setattr(precision, "autocast_supported", lambda device, dtype: False)
    with pytest.raises(DynconvertError, match="amp: fp16 autocast is not supported on cpu") as e:
        dynconvert.finetune(tiny_model(), tensor_data(), amp="fp16", device="cpu", **QUIET)
    assert "use amp=bf16" in str(e.value) and "\n" not in str(e.value)


def test_channels_last_conversion_keeps_the_function():
    from dynconvert.finetune.models import to_channels_last

    model = nn.Sequential(
        DynamicConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1)), nn.Conv2d(8, 4, 3)
    )
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    to_channels_last(model)  # Module.to(memory_format=...) raises on the 5-D kernels
    assert model[1].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.dim() == 5
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert rel_err(model(x_cl), reference) < 1e-5
