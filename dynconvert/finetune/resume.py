"""A trainer's complete state as a checkpoint, and back: what makes ``--resume`` exact.

The position is ``(epoch, batch within the epoch, global iteration)``. Together with the
seeded sampler and per-sample augmentation seeds (``data.py``), the restored RNG states
(dropout, mixup) and the per-iteration schedules, a run resumed from any iteration boundary
continues with exactly the batches, randomness and learning rates of the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import DynconvertError
from ..interrupts import STOP_SIGNALS, interrupt_for
from . import checkpoint as ckpt
from .schedules import TemperatureSchedule


class Trainer(Protocol):
    """What checkpointing reads and restores of ``loop.Trainer`` (a protocol, so that this
    module, which ``loop`` imports, need not import ``loop`` back)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    temperature: TemperatureSchedule
    opts: Any  # FinetuneOptions
    ctx: Any  # the distributed context: rank, world
    sampler: Any
    fingerprint: Any
    classes: list[str] | None
    history: list[Any]
    teacher_config: Any
    epoch: int
    batch: int
    iteration: int
    iters_per_epoch: int
    epoch_sums: Any
    top1_original: float | None
    top1_before: float | None
    _stop_requested: bool
    _stop_signal: int | None


# Options that fix the sample order: a resumed run must use the same ones.
ORDER_OPTIONS = ("batch_size", "seed", "train_subset")
# Options held in the restored optimizer and scheduler state (per-group lr and weight decay,
# the optimizer's kind and buffers): a changed value would be silently overwritten.
OPTIMIZER_OPTIONS = (
    "optimizer", "lr", "weight_decay", "attention_lr", "attention_weight_decay", "kernel_lr_scale",
)  # fmt: skip
SGD_OPTIONS = ("momentum", "nesterov")  # ignored by AdamW


def trainer_state(t: Trainer, rng: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint; ``rng``: the RNG states of every rank, indexed by rank."""
    return {
        "format": ckpt.FORMAT,
        "fingerprint": t.fingerprint,
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "epoch": t.epoch,
        "batch": t.batch,
        "iteration": t.iteration,
        "epoch_sums": list(t.epoch_sums),
        "temperature": {**t.temperature.state_dict(), "current": t.temperature.value(t.iteration)},
        "rng": rng,
        "teacher": t.teacher_config,
        "options": t.opts.recipe_dict(),
        "world": t.ctx.world,
        "history": t.history,
        "classes": t.classes,
        "val_top1_original": t.top1_original,
        "val_top1_before": t.top1_before,
    }


def restore_trainer(t: Trainer, path: str | Path) -> None:
    """Load ``path`` into the trainer after checking it belongs to this model and run."""
    state = ckpt.load_checkpoint(path, t.model)
    saved = state["options"]
    checked = (*ORDER_OPTIONS, *OPTIMIZER_OPTIONS)
    if t.opts.optimizer == "sgd":
        checked += SGD_OPTIONS
    for key in checked:
        if key in saved and saved[key] != getattr(t.opts, key):
            raise DynconvertError(
                f"resume: {path} was written with {key}={saved[key]!r}, this run has "
                f"{getattr(t.opts, key)!r}; use the same value to continue the run"
            )
    rescale = _check_same_data(t, path, state)
    same_world = state["world"] == t.ctx.world
    if not same_world and state["batch"] != 0:
        raise DynconvertError(
            f"resume: {path} was saved mid-epoch by {state['world']} processes, this run has "
            f"{t.ctx.world}; the rest of that epoch cannot be split anew: resume with "
            f"{state['world']} processes (or from a checkpoint saved at the end of an epoch)"
        )
    if state["teacher"]["enabled"] != t.teacher_config["enabled"]:
        was = "on" if state["teacher"]["enabled"] else "off"
        raise DynconvertError(f"resume: {path} was written with distillation {was}; keep it {was}")
    if state["epoch"] >= t.opts.epochs and state["batch"] == 0:
        # e.g. stopped after its last checkpoint, before the model was saved: give it back
        warnings.warn(
            f"resume: {path} already finished {state['epoch']} epochs, so nothing is trained; "
            "its model is the result (raise --epochs to go on)",
            stacklevel=4,
        )
    _continue_temperature_schedule(t, path, state["temperature"])
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    t.epoch, t.batch, t.iteration = state["epoch"], state["batch"], state["iteration"]
    t.epoch_sums = list(state["epoch_sums"])
    t.history = list(state["history"])
    t.top1_original, t.top1_before = state["val_top1_original"], state["val_top1_before"]
    if not same_world:
        _continue_with_other_world(t, path, state["world"])
        return
    if rescale:
        warnings.warn(
            f"resume: {path} was written by an earlier dynconvert, which trained each epoch's "
            "lone last sample as a batch of its own; continuing with the iteration count "
            "rescaled: the result will differ slightly from an uninterrupted run",
            stacklevel=4,
        )
        _restart_schedule_at(t, t.epoch * t.iters_per_epoch + t.batch)
    rng = state["rng"]
    ckpt.restore_rng(rng if isinstance(rng, dict) else rng[t.ctx.rank])  # dict: older, one state


def _check_same_data(t: Trainer, path: str | Path, state: dict[str, Any]) -> bool:
    """The classes and the number of batches per epoch must be the run's own: the saved
    position (batch within the epoch) and the head's labels mean nothing on other data.

    Returns True for a checkpoint of an earlier dynconvert that trained an epoch's lone last
    sample as a batch of its own (one batch more per epoch): its iteration count is rescaled.
    """
    saved_classes = state.get("classes")
    if saved_classes is not None and t.classes is not None and saved_classes != t.classes:
        raise DynconvertError(
            f"resume: {path} was trained on classes {_few(saved_classes)}, this data has "
            f"{_few(t.classes)}; resume on the same data"
        )
    if state["world"] != t.ctx.world:  # batches per epoch differ; handled by the caller
        return False
    done = state["iteration"] - state["batch"]  # iterations of the finished epochs
    per_epoch = done // state["epoch"] if state["epoch"] else t.iters_per_epoch
    if per_epoch == t.iters_per_epoch and state["batch"] <= t.iters_per_epoch:
        return False
    earlier_count = math.ceil(len(t.sampler) / t.opts.batch_size)
    if per_epoch == earlier_count and state["batch"] < t.iters_per_epoch:
        return True
    raise DynconvertError(
        f"resume: {path} ran {per_epoch} batches per epoch, this data gives "
        f"{t.iters_per_epoch}; resume on the same data"
    )


def _few(names: list[str]) -> str:
    shown = ", ".join(map(str, names[:4]))
    return f"[{shown}{', …' if len(names) > 4 else ''}] ({len(names)})"


def _continue_temperature_schedule(t: Trainer, path: str | Path, saved: dict[str, Any]) -> None:
    """A run resumed without temperature options goes on with the saved schedule; options
    that set one win (as the lr schedule follows this run's options), with a warning when
    they differ from the saved one."""
    saved_schedule = TemperatureSchedule(saved["start"], saved["end"], saved["iterations"])
    if t.opts.temperature_start is None:
        t.temperature.load_state_dict(saved_schedule.state_dict())
    elif t.temperature.state_dict() != saved_schedule.state_dict():
        warnings.warn(
            f"resume: {path} was written with {saved_schedule.describe()}; this run's options "
            f"give {t.temperature.describe()}, which is followed from here on",
            stacklevel=4,
        )


def _restart_schedule_at(t: Trainer, iteration: int) -> None:
    """Move the position and the lr schedule to ``iteration`` of this run's count."""
    t.iteration = iteration
    t.scheduler.last_epoch = iteration - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": no step is skipped
        warnings.simplefilter("ignore", UserWarning)
        t.scheduler.step()  # sets the lr of the rescaled iteration


def _continue_with_other_world(t: Trainer, path: str | Path, saved_world: int) -> None:
    """Go on from an end-of-epoch checkpoint with another number of processes: the epoch's
    iterations are counted anew (the schedules follow) and each rank is reseeded, since the
    saved per-rank RNG states do not map onto the new ranks."""
    warnings.warn(
        f"resume: {path} was written by {saved_world} processes, this run has {t.ctx.world}; "
        f"continuing from epoch {t.epoch + 1} with the iteration count rescaled and the RNGs "
        "reseeded: the result will differ from an uninterrupted run",
        stacklevel=4,
    )
    _restart_schedule_at(t, t.epoch * t.iters_per_epoch)
    ckpt.seed_everything(t.opts.seed + saved_world * (t.epoch + 1), rank=t.ctx.rank)


@contextlib.contextmanager
def stop_on_sigint(t: Trainer) -> Iterator[None]:
    """The first Ctrl-C or SIGTERM asks the trainer to stop at the next iteration boundary,
    where it saves a checkpoint (all ranks agree on the step, see ``Trainer._step``); a
    second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        t._stop_signal = signum
        if t._stop_requested:
            raise interrupt_for(signum)
        t._stop_requested = True

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
