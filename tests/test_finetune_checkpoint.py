"""dynconvert.finetune checkpoints: atomic, plain tensors, refused when foreign, resumed in process;
non-finite losses keep the last good one."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from finetune_helpers import (
    QUIET,
    tensor_data,
    tiny_model,
)

import dynconvert
from dynconvert import DynconvertError
from dynconvert.finetune.schedules import dynamic_layers


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
