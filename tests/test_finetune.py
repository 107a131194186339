"""dynconvert.finetune: the loop, schedules, parameter groups, distillation, health, options."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err
from finetune_helpers import (
    QUIET,
    make_data_dir,
    tensor_data,
    tiny_model,
)
from torch import nn
from torch.utils.data import DataLoader

import dynconvert
from dynconvert import DynamicConv2d, DynconvertError
from dynconvert.finetune import FinetuneOptions, static_teacher, static_twin
from dynconvert.finetune.health import AttentionMonitor, unused_warnings
from dynconvert.finetune.losses import kernel_difference_penalty, parameter_groups
from dynconvert.finetune.schedules import cosine_warmup_factor


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
