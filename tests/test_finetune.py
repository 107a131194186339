"""dynconvert.finetune: the loop, schedules, groups, distillation, health, checkpoints.

Helpers defined here (synthetic ImageFolder data, tiny dynamic models) are imported by the
other test_finetune_*.py files.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynconvert
from dynconvert import DynamicConv2d, DynconvertError
from dynconvert.finetune import FinetuneOptions, static_teacher, static_twin
from dynconvert.finetune.health import AttentionMonitor, unused_warnings
from dynconvert.finetune.losses import kernel_difference_penalty, parameter_groups
from dynconvert.finetune.schedules import cosine_warmup_factor, dynamic_layers

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]

# A module file for subprocess tests (--model tinynet:tiny): a seeded tiny dynamic model.
TINYNET = """
import os, time
import torch
from torch import nn
from dynconvert import DynamicConv2d

class Slow(nn.Module):
    def forward(self, x):
        if self.training and os.environ.get("TINYNET_SLEEP"):
            time.sleep(float(os.environ["TINYNET_SLEEP"]))
        return x

def tiny(num_classes=3):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    c1, c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    return nn.Sequential(
        DynamicConv2d.from_conv(c1, generator=g), nn.BatchNorm2d(8), nn.ReLU(), Slow(),
        DynamicConv2d.from_conv(c2, noise=0.05, generator=g), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, num_classes),
    )
"""


def write_tinynet(folder: Path) -> Path:
    (folder / "tinynet.py").write_text(TINYNET)
    return folder


def make_image_folder(root: Path, classes=("a", "b", "c"), per_class=8, size=16, seed=0) -> Path:
    """PNG images whose dominant colour is the class, plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = torch.tensor(COLORS[c % len(COLORS)], dtype=torch.float32)
        for i in range(per_class):
            noise = torch.randint(-40, 40, (size, size, 3), generator=g).float()
            pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def make_data_dir(root: Path, classes=("a", "b", "c"), per_class=8) -> Path:
    make_image_folder(root / "train", classes, per_class, seed=0)
    make_image_folder(root / "val", classes, max(2, per_class // 2), seed=1)
    return root


def tiny_model(num_classes: int = 3, seed: int = 1, dropout: float = 0.0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c1, c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    return nn.Sequential(
        DynamicConv2d.from_conv(c1, generator=g),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        DynamicConv2d.from_conv(c2, noise=0.05, generator=g),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(8, num_classes),
    )


def tensor_data(n: int = 24, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[torch.arange(n), y % 3] += 1.5  # the class is the brightest channel
    return TensorDataset(x, y)


QUIET = {"progress": False}


def test_cosine_warmup_factor_matches_closed_form():
    total, warmup = 100, 10
    for it in range(warmup):
        assert cosine_warmup_factor(it, total, warmup) == pytest.approx((it + 1) / warmup)
    for it in (10, 35, 55, 99):
        expected = 0.5 * (1 + math.cos(math.pi * (it - warmup) / (total - warmup)))
        assert cosine_warmup_factor(it, total, warmup) == pytest.approx(expected)
    assert cosine_warmup_factor(total, total, warmup, 0.1) == pytest.approx(0.1)


def test_lr_and_temperature_follow_their_schedules_every_iteration():
    model = tiny_model()
    seen_temperature, lrs = [], []
    layer = model[0]
    layer.attention.register_forward_hook(
        lambda m, i, o: seen_temperature.append(float(m.temperature)) if m.training else None
    )
    data = tensor_data(24)
    result = dynconvert.finetune(
        model,
        data,
        epochs=2,
        batch_size=8,
        lr=0.1,
        warmup_epochs=1,
        temperature_start=10.0,
        temperature_end=2.0,
        temperature_epochs=1,
        callbacks=[lambda e: lrs.append(e.get("lr"))],
        **QUIET,
    )
    per_epoch = 3
    expected_t = [10.0 + (2.0 - 10.0) * min(1.0, i / per_epoch) for i in range(2 * per_epoch)]
    assert seen_temperature == pytest.approx(expected_t)
    step_lrs = [lr for lr in lrs[: 2 * per_epoch + 1] if lr is not None]
    # lr after each step: warm-up 1/3, 2/3, 1, then cosine over the last 3 iterations.
    expected_lr = [0.1 * cosine_warmup_factor(i + 1, 6, 3) for i in range(6)]
    assert step_lrs[:3] + step_lrs[4:7] == pytest.approx(expected_lr)
    assert result.history[-1]["temperature"] == pytest.approx(2.0)
    assert layer.temperature == pytest.approx(2.0)


def test_parameter_groups_router_lr_and_no_decay_on_biases_and_norms():
    model = tiny_model()
    groups = parameter_groups(model, 0.1, 5e-4, attention_lr=0.5, attention_weight_decay=None)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())  # each param exactly once
    for name, p in model.named_parameters():
        g = by_id[id(p)]
        assert g["lr"] == (0.5 if ".attention." in name else 0.1), name
        no_decay = name.endswith("bias") or p.ndim == 1
        assert g["weight_decay"] == (0.0 if no_decay else 5e-4), name
    assert by_id[id(model[0].bias)]["weight_decay"] == 0.0  # (K, out) dynamic bias


def test_kernel_lr_scale_and_kernel_difference_penalty():
    model = tiny_model()
    groups = parameter_groups(model, 0.1, 5e-4, None, None, kernel_lr_scale=4.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model[0].weight)] == lr_of[id(model[3].bias)] == pytest.approx(0.4)
    assert lr_of[id(model[0].attention.fc1.weight)] == lr_of[id(model[8].weight)] == 0.1
    w = [model[i].weight.detach().double() for i in (0, 3)]
    expected = sum(((x - x.mean(0)) ** 2).sum() for x in w)
    assert kernel_difference_penalty(model).item() == pytest.approx(expected.item(), rel=1e-5)
    before = kernel_difference_penalty(model).item()
    dynconvert.finetune(
        model,
        tensor_data(),
        epochs=2,
        batch_size=8,
        lr=0.05,
        weight_decay=0.0,
        kernel_diff_decay=5.0,
        **QUIET,
    )
    assert kernel_difference_penalty(model).item() < 0.5 * before  # kernels pulled together


def test_kernel_grad_scale_multiplies_only_the_kernel_updates():
    def first_step(scale):
        model = tiny_model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        dynconvert.finetune(
            model,
            tensor_data(8),
            epochs=1,
            batch_size=8,
            lr=0.1,
            momentum=0.0,
            weight_decay=0.0,
            kernel_grad_scale=scale,
            **QUIET,
        )
        return {k: v - before[k] for k, v in model.state_dict().items()}

    one, four = first_step(1.0), first_step(4.0)
    assert rel_err(four["0.weight"], 4 * one["0.weight"]) < 1e-5
    assert rel_err(four["3.bias"], 4 * one["3.bias"]) < 1e-5
    assert rel_err(four["8.weight"], one["8.weight"]) < 1e-5
    assert rel_err(four["0.attention.fc1.weight"], one["0.attention.fc1.weight"]) < 1e-5


def test_kernel_diff_grad_scale_speeds_up_only_the_kernels_differences():
    def first_step(diff_scale):
        model = tiny_model()
        with torch.no_grad():  # a non-uniform router, so that the K kernels' gradients differ
            for layer in (model[0], model[3]):
                layer.attention.fc2.weight.normal_(0, 1, generator=torch.Generator().manual_seed(3))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        dynconvert.finetune(
            model,
            tensor_data(8),
            epochs=1,
            batch_size=8,
            lr=0.1,
            momentum=0.0,
            weight_decay=0.0,
            kernel_grad_scale=2.0,
            kernel_diff_grad_scale=diff_scale,
            **QUIET,
        )
        return {k: v - before[k] for k, v in model.state_dict().items()}

    one, five = first_step(1.0), first_step(5.0)
    for key in ("0.weight", "3.weight", "3.bias"):
        mean = one[key].mean(0, keepdim=True)
        assert (one[key] - mean).abs().max() > 1e-6  # the kernels did move apart
        assert rel_err(five[key], mean + 5 * (one[key] - mean)) < 1e-5
    assert rel_err(five["8.weight"], one["8.weight"]) < 1e-5


def test_kernel_grad_options_leave_a_static_model_trainable():
    # The CIFAR benchmark fine-tunes the static baseline with the dynamic recipe's options.
    torch.manual_seed(0)
    static = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    static(torch.zeros(1, 3, 8, 8))
    before = [p.detach().clone() for p in static.parameters()]
    with pytest.warns(UserWarning, match="no dynamic layers"):
        dynconvert.finetune(
            static,
            tensor_data(8),
            epochs=1,
            batch_size=8,
            lr=0.1,
            kernel_grad_scale=4.0,
            kernel_diff_grad_scale=10.0,
            **QUIET,
        )
    assert all((p - b).abs().max() > 0 for p, b in zip(static.parameters(), before, strict=True))


def test_zero_attention_lr_freezes_the_routers_only():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dynconvert.finetune(
        model, tensor_data(), epochs=1, batch_size=8, attention_lr=0.0, weight_decay=0.0, **QUIET
    )
    after = model.state_dict()
    for key in before:
        if ".attention." in f".{key}" and not key.endswith("temperature"):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["0.weight"], after["0.weight"])
    assert not torch.equal(before["8.weight"], after["8.weight"])


def test_same_seed_same_weights_other_seed_other_weights():
    def run(seed):
        model = tiny_model(dropout=0.3)
        dynconvert.finetune(model, tensor_data(), epochs=2, batch_size=8, seed=seed, **QUIET)
        return model.state_dict()

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_learns_the_task_and_reports_before_and_after():
    model = tiny_model()
    original = static_teacher(model)
    data = tensor_data(48)
    result = dynconvert.finetune(
        model,
        DataLoader(data, batch_size=8),
        data,
        epochs=4,
        lr=0.1,
        batch_size=8,
        original=original,
        **QUIET,
    )
    assert result.model is model
    assert result.val_top1_original == result.val_top1_before  # conversion is exact
    assert result.val_top1_after > result.val_top1_before
    assert result.val_top1_after >= 90.0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert len(result.history) == 4


def test_result_reports_the_fine_tuned_model_with_uniform_routers():
    """``val_top1_uniform``: the same weights, every router forced to 1/K (mean kernels)."""
    model = tiny_model()
    data = tensor_data(48)
    result = dynconvert.finetune(
        model, data, data, epochs=2, lr=0.1, attention_lr=3.0, batch_size=8, **QUIET
    )
    assert model[3].attention.fc2.weight.count_nonzero() > 0  # the routers trained
    uniform = static_twin(model).eval()
    assert not any(isinstance(m, DynamicConv2d) for m in uniform.modules())
    assert isinstance(model[3], DynamicConv2d)  # the model is left alone
    x, y = data.tensors
    with torch.no_grad():
        want = 100.0 * (uniform(x).argmax(1) == y).float().mean().item()
    assert result.val_top1_uniform == pytest.approx(want)


def test_static_twin_of_a_trained_layer_is_its_mean_kernel_conv_against_float64():
    layer = DynamicConv2d(3, 5, 3, padding=1, k=4).double()
    for param in layer.attention.parameters():
        nn.init.normal_(param)  # a router far from uniform
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    want = torch.nn.functional.conv2d(x, layer.weight.mean(0), layer.bias.mean(0), padding=1)
    assert rel_err(static_twin(layer)(x), want) < 1e-12
    assert static_teacher(layer) is not layer and isinstance(static_teacher(layer), DynamicConv2d)
    assert rel_err(layer(x), want) > 1e-3  # and the layer itself routes


def test_static_teacher_of_a_tf_same_padded_layer_pads_like_it():
    """Regression: the teacher of a DynamicConv2dSame used a plain Conv2d without padding."""
    from timm.layers import Conv2dSame

    from dynconvert.layers import DynamicConv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2dSame.from_conv(Conv2dSame(3, 4, 3, stride=2), noise=0.3))
    x = torch.randn(2, 3, 9, 9)
    assert rel_err(static_teacher(model)(x), model(x)) < 1e-5  # (2, 4, 5, 5) both


def test_static_teacher_computes_the_converted_model_and_distillation_starts_at_zero():
    model = tiny_model().eval()
    model[1] = nn.Identity()  # BatchNorm would differ between train (student) and eval (teacher)
    teacher = static_teacher(model)
    assert not any(isinstance(m, DynamicConv2d) for m in teacher.modules())
    x = torch.randn(5, 3, 8, 8)
    assert rel_err(teacher(x), model(x)) < 1e-5
    losses = []
    log = [lambda e: losses.append(e["loss"]) if e["event"] == "step" else None]
    dynconvert.finetune(
        model.train(),
        tensor_data(),
        epochs=1,
        batch_size=8,
        teacher=True,
        distill_weight=1.0,
        callbacks=log,
        **QUIET,
    )
    assert max(losses) == pytest.approx(0.0, abs=1e-6)  # the student starts as the teacher
    other, losses[:] = tiny_model(seed=5), []
    other[1] = nn.Identity()
    dynconvert.finetune(
        model,
        tensor_data(),
        epochs=1,
        batch_size=8,
        teacher=other,
        distill_weight=1.0,
        callbacks=log,
        **QUIET,
    )
    assert losses[0] > 1e-3


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = []

    def explode_late(model):  # the regularizer seam: nan from the 5th step on
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) >= 5 else 0.0)

    model, ckpt = tiny_model(), tmp_path / "run.ckpt"
    with pytest.raises(DynconvertError, match=r"non-finite.*last good checkpoint kept"):
        dynconvert.finetune(
            model,
            tensor_data(),
            epochs=3,
            batch_size=8,
            checkpoint=ckpt,
            regularizers=[explode_late],
            **QUIET,
        )
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and state["iteration"] == 3  # the end of epoch 1, before the nan
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]  # no temp files left


def test_checkpoint_holds_plain_resumable_state(tmp_path):
    ckpt = tmp_path / "c.pt"
    model = tiny_model()
    dynconvert.finetune(
        model,
        tensor_data(),
        epochs=1,
        batch_size=8,
        checkpoint=ckpt,
        temperature_start=5.0,
        teacher=True,
        **QUIET,
    )
    state = torch.load(ckpt, weights_only=True)
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "iteration",
        "batch",
        "rng",
        "temperature",
        "teacher",
        "options",
        "history",
    ):
        assert key in state, key
    assert state["temperature"]["start"] == 5.0 and state["temperature"]["current"] == 1.0
    assert state["teacher"]["enabled"] and state["teacher"]["weight"] == 0.5
    assert len(state["rng"]) == 1  # one process: one RNG state, at index 0 = rank
    assert {"torch", "python", "numpy"} <= set(state["rng"][0])
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


def test_in_process_resume_mid_epoch_matches_uninterrupted(tmp_path):
    opts = dict(epochs=3, batch_size=4, lr=0.05, seed=7, checkpoint_every=1, **QUIET)
    reference = tiny_model(dropout=0.3)
    dynconvert.finetune(reference, tensor_data(20), checkpoint=tmp_path / "ref.pt", **opts)

    class Crash(Exception):
        pass

    def crash_at(event):
        if event["event"] == "step" and event["iteration"] == 8:  # epoch 2, batch 3 of 5
            raise Crash

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Crash):
        dynconvert.finetune(
            tiny_model(dropout=0.3), tensor_data(20), checkpoint=ckpt, callbacks=[crash_at], **opts
        )
    assert torch.load(ckpt, weights_only=True)["batch"] == 2  # saved mid-epoch, step 7
    resumed = tiny_model(dropout=0.3)
    result = dynconvert.finetune(resumed, tensor_data(20), checkpoint=ckpt, resume=ckpt, **opts)
    ref = reference.state_dict()
    for key, value in resumed.state_dict().items():
        assert (value.double() - ref[key].double()).abs().max() <= 1e-6, key
    assert len(result.history) == 3


def test_resume_refuses_another_models_checkpoint(tmp_path):
    ckpt = tmp_path / "c.pt"
    dynconvert.finetune(
        tiny_model(), tensor_data(), epochs=1, batch_size=8, checkpoint=ckpt, **QUIET
    )
    with pytest.raises(DynconvertError, match="another model"):
        dynconvert.finetune(
            tiny_model(num_classes=4),
            tensor_data(classes=4),
            epochs=1,
            batch_size=8,
            resume=ckpt,
            **QUIET,
        )


def _crash_at(iteration: int):
    class Crash(Exception):
        pass

    def callback(event):
        if event["event"] == "step" and event["iteration"] == iteration:
            raise Crash

    return Crash, callback


def test_resume_without_temperature_options_continues_the_saved_schedule(tmp_path):
    """The schedule is checkpointed state: a resume that leaves the temperature options out
    anneals to the same end as the uninterrupted run, with the same weights."""
    opts = dict(epochs=2, batch_size=4, lr=0.05, seed=3, checkpoint_every=1, **QUIET)
    schedule = dict(temperature_start=5.0, temperature_end=1.0)
    reference = tiny_model()
    dynconvert.finetune(reference, tensor_data(16), **schedule, **opts)
    ckpt = tmp_path / "run.pt"
    crash, callback = _crash_at(3)  # epoch 1 of 2, temperature still near 4
    with pytest.raises(crash):
        dynconvert.finetune(
            tiny_model(), tensor_data(16), checkpoint=ckpt, callbacks=[callback],
            **schedule, **opts,
        )  # fmt: skip
    assert torch.load(ckpt, weights_only=True)["temperature"]["current"] > 3.0
    resumed = tiny_model()
    dynconvert.finetune(resumed, tensor_data(16), checkpoint=ckpt, resume=ckpt, **opts)
    for layer, ref in zip(dynamic_layers(resumed), dynamic_layers(reference), strict=True):
        assert layer.temperature == pytest.approx(1.0) == ref.temperature
    ref = reference.state_dict()
    for key, value in resumed.state_dict().items():
        assert (value.double() - ref[key].double()).abs().max() <= 1e-6, key


def test_resume_with_another_temperature_schedule_follows_it_and_warns(tmp_path):
    ckpt = tmp_path / "run.pt"
    opts = dict(epochs=2, batch_size=4, checkpoint=ckpt, checkpoint_every=1, **QUIET)
    crash, callback = _crash_at(3)
    with pytest.raises(crash):
        dynconvert.finetune(
            tiny_model(), tensor_data(16), callbacks=[callback], temperature_start=5.0, **opts
        )
    model = tiny_model()
    with pytest.warns(UserWarning, match=r"temperature 5 -> 1 over 8 iterations; this run"):
        dynconvert.finetune(
            model, tensor_data(16), resume=ckpt, temperature_start=2.0, temperature_end=0.5,
            **opts,
        )  # fmt: skip
    assert all(layer.temperature == pytest.approx(0.5) for layer in dynamic_layers(model))


def test_resume_from_a_file_with_pickled_code_is_one_line_and_runs_nothing(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "x", "payload": Path("x")}, path)  # a class: weights-only refuses it
    with pytest.raises(DynconvertError) as info:
        dynconvert.finetune(tiny_model(), tensor_data(), epochs=1, resume=path, **QUIET)
    message = str(info.value)
    assert message.startswith("resume: ") and "pickled code" in message
    assert "\n" not in message and "\x1b" not in message


def test_checkpoint_is_written_with_a_normal_file_mode(tmp_path):
    ckpt = tmp_path / "c.pt"
    dynconvert.finetune(tiny_model(), tensor_data(8), epochs=1, batch_size=8, checkpoint=ckpt,
                        **QUIET)  # fmt: skip
    mask = os.umask(0o022)
    os.umask(mask)
    assert ckpt.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_resume_refuses_other_order_optimizer_or_data_and_returns_a_finished_run(tmp_path):
    ckpt = tmp_path / "c.pt"
    opts = dict(epochs=1, checkpoint=ckpt, **QUIET)
    trained = dynconvert.finetune(tiny_model(), tensor_data(), batch_size=8, **opts).model
    refused = [
        (dict(batch_size=4), tensor_data(), "batch_size=8, this run has 4"),
        (dict(lr=0.5), tensor_data(), "lr=0.01, this run has 0.5"),
        (dict(optimizer="adamw"), tensor_data(), "optimizer='sgd', this run has 'adamw'"),
        (dict(weight_decay=0.1), tensor_data(), "weight_decay=0.0005, this run has 0.1"),
        (dict(), tensor_data(48), "ran 3 batches per epoch, this data gives 6"),
    ]
    for changed, data, message in refused:
        kwargs = {"batch_size": 8, **opts, **changed}
        with pytest.raises(DynconvertError, match=re.escape(message)):
            dynconvert.finetune(tiny_model(), data, resume=ckpt, **kwargs)
    with pytest.warns(UserWarning, match="already finished 1 epochs, so nothing is trained"):
        again = dynconvert.finetune(tiny_model(), tensor_data(), batch_size=8, resume=ckpt, **opts)
    assert len(again.history) == 1
    for a, b in zip(again.model.parameters(), trained.parameters(), strict=True):
        assert torch.equal(a, b)


def test_attention_health_matches_direct_computation_and_flags_unused_kernels():
    model = tiny_model().eval()
    with torch.no_grad():
        model[0].attention.fc2.bias.copy_(torch.tensor([4.0, -8.0, -8.0, 4.0]))
        model[3].attention.fc2.weight.normal_()
    x = torch.randn(6, 3, 8, 8)
    with AttentionMonitor(model) as monitor, torch.no_grad():
        model(x)
    summary = monitor.summary()
    attn = model[0].attention(x).double()
    assert summary["0"]["shares"] == pytest.approx(attn.mean(0).tolist(), abs=1e-6)
    entropy = -(attn * attn.log()).sum(1).mean().item()
    assert summary["0"]["entropy"] == pytest.approx(entropy, abs=1e-5)
    assert summary["0"]["unused"] == [1, 2] and summary["3"]["unused"] == []
    assert unused_warnings(summary) == ["0: kernel(s) 1, 2 unused (share < 10% of 1/K)"]


def test_plot_is_written(tmp_path):
    plot = tmp_path / "curves.png"
    dynconvert.finetune(
        tiny_model(),
        tensor_data(),
        tensor_data(seed=1),
        epochs=2,
        batch_size=8,
        temperature_start=4.0,
        plot=plot,
        **QUIET,
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_mixup_and_label_smoothing_train(tmp_path):
    model = tiny_model()
    result = dynconvert.finetune(
        model,
        tensor_data(),
        epochs=1,
        batch_size=8,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        **QUIET,
    )
    assert math.isfinite(result.history[0]["train_loss"])


def test_mixup_stops_at_mixup_off_epoch():
    soft_targets = []  # per step: did the batch arrive mixed (soft float targets)?

    def record(inputs, targets):
        soft_targets.append(targets.is_floating_point())
        return inputs, targets

    dynconvert.finetune(
        tiny_model(),
        tensor_data(),
        epochs=3,
        batch_size=8,
        mixup_alpha=0.2,
        mixup_off_epoch=2,
        batch_hook=record,
        **QUIET,
    )
    per_epoch = len(soft_targets) // 3
    assert soft_targets == [True] * (2 * per_epoch) + [False] * per_epoch


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"amp": "int8"}, "amp"),
        ({"lr": -1.0}, "lr"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"mixup_off_epoch": -1.0}, "mixup_off_epoch"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(DynconvertError, match=message):
        FinetuneOptions(**options)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="'epoch'"):
        dynconvert.finetune(tiny_model(), tensor_data(), epoch=3)


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


def test_folder_data_augmentation_is_the_same_with_and_without_workers(tmp_path):
    """Each sample's random crop/flip is seeded by (seed, epoch, index), not by the worker."""
    data = make_data_dir(tmp_path / "data", per_class=4)

    def run(workers):
        model = tiny_model()
        result = dynconvert.finetune(
            model,
            data,
            epochs=2,
            batch_size=4,
            input_size=16,
            train_augment="crop-flip",
            num_workers=workers,
            **QUIET,
        )
        return model.state_dict(), result

    (a, result), (b, _) = run(0), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert result.classes == ["a", "b", "c"] and result.val_top1_after is not None


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
