"""The fine-tuning loop: one :class:`Trainer` per call of :func:`dynconvert.finetune`."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine import autotune
from ..errors import DynconvertError
from ..files import atomic_torch_save
from ..interrupts import interrupt_for
from . import checkpoint as ckpt
from . import precision
from .data import iterations_per_epoch, prepare_data
from .distributed import init_distributed, wrap_ddp
from .health import (
    AttentionMonitor,
    first_non_finite,
    mean_entropy,
    non_finite_error,
    unused_warnings,
)
from .losses import (
    kernel_difference_penalty,
    make_mixup,
    make_optimizer,
    scale_kernel_gradients,
    training_loss,
)
from .models import check_head, model_num_classes, static_teacher, static_twin, to_channels_last
from .options import FinetuneOptions
from .plot import plot_history
from .progress import TrainProgress, health_table, results_table
from .result import FinetuneResult
from .resume import restore_trainer, stop_on_sigint, trainer_state
from .schedules import (
    TemperatureSchedule,
    cosine_warmup_scheduler,
    current_temperature,
    dynamic_layers,
)


class Trainer:
    def __init__(self, model: nn.Module, train: Any, val: Any, opts: FinetuneOptions) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.opts, self.model = opts, model
        for what, path in (("checkpoint", opts.checkpoint), ("plot", opts.plot)):
            if path is not None:
                ckpt.check_writable(Path(path), what)
        self.ctx = init_distributed(opts.device)
        self.device = self.ctx.device
        cuda = self.device.type == "cuda"
        data = prepare_data(
            model, train, val, opts, rank=self.ctx.rank, world=self.ctx.world, pin_memory=cuda
        )
        self.train_set, self.sampler, self.loader = data.train_set, data.sampler, data.loader
        self.val_loader, self.classes = data.val_loader, data.classes
        self.skipped_files = data.skipped_files
        check_head(model, self.classes)
        self._stop_requested = False
        self._stop_signal: int | None = None  # set by stop_on_sigint

    # -- set-up -------------------------------------------------------------------------

    def _setup_model(self) -> None:
        opts, cuda = self.opts, self.device.type == "cuda"
        if opts.channels_last and not cuda:
            warnings.warn(
                f"channels_last needs a CUDA device; ignored on {self.device}", stacklevel=3
            )
        self.amp_dtype = precision.amp_dtype(opts.amp, self.device)
        self.memory_format = torch.channels_last if opts.channels_last and cuda else None
        teacher = opts.teacher
        if teacher is True or teacher == "original":
            teacher = static_teacher(self.model)
        elif teacher is not None and not isinstance(teacher, nn.Module):
            raise DynconvertError("teacher: expected an nn.Module, True or 'original'", usage=True)
        self.teacher = teacher
        self.teacher_config = {
            "enabled": teacher is not None,
            "weight": opts.distill_weight,
            "temperature": opts.distill_temperature,
            "kind": type(teacher).__name__ if teacher is not None else None,
        }
        self.model.to(self.device)
        if self.memory_format is not None:
            to_channels_last(self.model)
        if teacher is not None:
            teacher.to(self.device).eval().requires_grad_(False)
        self.fingerprint = ckpt.model_fingerprint(self.model)
        self.input_dtype = next(
            (p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32
        )
        self.iters_per_epoch = iterations_per_epoch(self.sampler, opts)
        self.total_iters = self.iters_per_epoch * opts.epochs
        self.optimizer = make_optimizer(self.model, opts)
        warmup = round(opts.warmup_epochs * self.iters_per_epoch)
        self.scheduler = cosine_warmup_scheduler(
            self.optimizer, self.total_iters, warmup, opts.min_lr / opts.lr
        )
        self.scaler = precision.grad_scaler(self.device, self.amp_dtype)
        t_iters = round((opts.temperature_epochs or opts.epochs) * self.iters_per_epoch)
        self.temperature = TemperatureSchedule(
            opts.temperature_start, opts.temperature_end, t_iters
        )
        off = opts.mixup_off_epoch
        self.mixup = make_mixup(
            opts.mixup_alpha,
            opts.cutmix_alpha,
            opts.label_smoothing,
            len(self.classes) if self.classes else model_num_classes(self.model),
            until_iteration=None if off is None else round(off * self.iters_per_epoch),
        )
        self.kernel_params = [
            p
            for m in dynamic_layers(self.model)
            for p in (m.weight, m.bias)
            if p is not None and p.requires_grad
        ]
        self.regularizers = list(opts.regularizers)
        if opts.kernel_diff_decay > 0:
            self.regularizers.append(
                lambda m: opts.kernel_diff_decay / 2 * kernel_difference_penalty(m)
            )
        self.ddp_model = wrap_ddp(self.model, self.ctx)

    # -- state (see resume.py) ---------------------------------------------------------

    def _stop_non_finite(self, what: str) -> None:
        raise non_finite_error(what, self.epoch, self.iteration, self.last_checkpoint)

    def _check_finite_weights(self) -> None:
        """A step with a finite loss can still write non-finite weights (an overflowing
        gradient): never evaluate, checkpoint or save those as a result."""
        name = first_non_finite(self.model)
        if name is not None:
            self._stop_non_finite(f"weights became non-finite ({name})")

    def _save(self) -> None:
        """Collective: every rank hands rank 0 its RNG states, rank 0 writes."""
        if self.opts.checkpoint is None:
            return
        self._check_finite_weights()
        rng = self.ctx.gather_to_main(ckpt.capture_rng())
        if self.ctx.is_main:
            atomic_torch_save(trainer_state(self, rng), self.opts.checkpoint)
        self.last_checkpoint = str(self.opts.checkpoint)

    # -- evaluation ---------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, monitor: AttentionMonitor | None = None) -> float | None:
        if self.val_loader is None:
            return None
        was_training = model.training
        model.eval()
        correct = count = 0
        with monitor or contextlib.nullcontext():
            for inputs, targets in self.val_loader:
                inputs, targets = self._to_device(inputs), targets.to(self.device)
                with self._autocast():
                    outputs = model(inputs)
                correct += (outputs.argmax(1) == targets).sum().item()
                count += len(targets)
        model.train(was_training)
        correct, count = self.ctx.all_sum([correct, count])
        return 100.0 * correct / max(count, 1)

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        # Images arrive as float32; a float64 (or half) model takes them in its own dtype.
        dtype = self.input_dtype if inputs.is_floating_point() else None
        inputs = inputs.to(self.device, dtype=dtype, non_blocking=True)
        if self.memory_format is not None:
            inputs = inputs.contiguous(memory_format=self.memory_format)
        return inputs

    def _autocast(self):
        return precision.autocast(self.device, self.amp_dtype)

    # -- training -----------------------------------------------------------------------

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, int]:
        opts = self.opts
        self.temperature.apply(self.model, self.iteration)
        inputs, hard = self._to_device(inputs), targets.to(self.device)
        targets = hard
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets, self.iteration)
        if opts.batch_hook is not None:
            inputs, targets = opts.batch_hook(inputs, targets)
        with self._autocast():
            outputs = self.ddp_model(inputs)
            loss = training_loss(
                self.model,
                outputs,
                targets,
                inputs,
                smoothing=opts.label_smoothing,
                teacher=self.teacher,
                distill_weight=opts.distill_weight,
                distill_temperature=opts.distill_temperature,
                regularizers=self.regularizers,
            )
        n = len(hard)
        correct = (outputs.argmax(1) == hard).sum().item()
        loss_sum, correct, n, stop = self.ctx.all_sum(
            [loss.item() * n, correct, n, float(self._stop_requested)]
        )
        if not math.isfinite(loss_sum):
            self._stop_non_finite(f"loss became non-finite ({loss_sum / n})")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        scale_kernel_gradients(
            self.kernel_params, opts.kernel_grad_scale, opts.kernel_diff_grad_scale
        )
        if opts.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), opts.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # fp16's scaler skips the steps whose gradients overflow (the first ones, while it
            # finds its scale); the schedule still follows the iteration count.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step")
            self.scheduler.step()
        self.iteration += 1
        self.batch += 1
        self._stop_requested = self._stop_requested or stop > 0
        return loss_sum, correct, int(n)

    def _train_epoch(self, progress: TrainProgress) -> None:
        opts, epoch = self.opts, self.epoch
        self.sampler.set_epoch(epoch)
        self.sampler.skip = self.batch * opts.batch_size
        self.train_set.epoch = epoch
        progress.start_epoch(epoch, opts.epochs, self.iters_per_epoch, self.batch, self.iteration)
        self.ddp_model.train()
        started, seen = time.perf_counter(), 0
        for inputs, targets in self.loader:
            loss_sum, correct, n = self._step(inputs, targets)
            sums = self.epoch_sums
            sums[0] += loss_sum
            sums[1] += correct
            sums[2] += n
            seen += n
            speed = seen / max(time.perf_counter() - started, 1e-9)
            progress.step(sums[0] / sums[2], 100 * sums[1] / sums[2], speed)
            self._notify(
                {
                    "event": "step",
                    "epoch": epoch,
                    "iteration": self.iteration,
                    "batch": self.batch,
                    "loss": loss_sum / n,
                    "lr": self.scheduler.get_last_lr()[0],
                    "temperature": self.temperature.value(self.iteration - 1),
                }
            )
            if self._stop_requested:
                self._save()
                where = f"; state saved to {self.last_checkpoint}" if self.last_checkpoint else ""
                progress.log(f"interrupted at epoch {epoch + 1}, iteration {self.iteration}{where}")
                raise interrupt_for(self._stop_signal)
            if (
                opts.checkpoint_every
                and self.iteration % opts.checkpoint_every == 0
                and self.batch < self.iters_per_epoch
            ):
                self._save()
        self.epoch_speed = seen / max(time.perf_counter() - started, 1e-9)

    def _end_epoch(self, progress: TrainProgress) -> None:
        self._check_finite_weights()
        opts, sums = self.opts, self.epoch_sums
        last = self.epoch + 1 == opts.epochs
        self.temperature.apply(self.model, self.iteration)
        monitor = AttentionMonitor(self.model)
        val_top1 = None
        if last or (self.epoch + 1) % opts.eval_every == 0:
            val_top1 = self.evaluate(self.model, monitor)
        self.health = monitor.summary()
        row = {
            "epoch": self.epoch + 1,
            "train_loss": sums[0] / max(sums[2], 1),
            "train_top1": 100 * sums[1] / max(sums[2], 1),
            "val_top1": val_top1,
            "lr": self.scheduler.get_last_lr()[0],
            "temperature": current_temperature(self.model),
            "entropy": mean_entropy(self.health),
            "images_per_s": self.epoch_speed,
        }
        self.history.append(row)
        self.epoch, self.batch, self.epoch_sums = self.epoch + 1, 0, [0.0, 0.0, 0.0]
        self._save()
        if opts.plot is not None and self.ctx.is_main:
            plot_history(self.history, opts.plot)
        val = f"  val top-1 {val_top1:.2f}%" if val_top1 is not None else ""
        progress.log(
            f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}  "
            f"train top-1 {row['train_top1']:.2f}%{val}"
        )
        self._notify({"event": "epoch", **row})

    def _notify(self, event: dict[str, Any]) -> None:
        if self.ctx.is_main:
            for callback in self.opts.callbacks:
                callback(event)

    def run(self) -> FinetuneResult:
        # Timing-based strategy choice could differ between runs (and a resumed run), and
        # each strategy rounds differently: deterministic runs use the fixed rules instead.
        deterministic = self.opts.deterministic
        if deterministic is None:
            deterministic = self.device.type == "cpu"
        autotuning = autotune.autotune_enabled()
        if deterministic:
            autotune.set_autotune(False)
        try:
            return self._run()
        finally:
            autotune.set_autotune(autotuning)
            self.ctx.close()

    def _run(self) -> FinetuneResult:
        opts = self.opts
        self._setup_model()
        self.epoch = self.batch = self.iteration = 0
        self.epoch_sums, self.history, self.health = [0.0, 0.0, 0.0], [], {}
        self.last_checkpoint: str | None = None
        self.top1_original = self.top1_before = None
        if opts.resume is not None:
            restore_trainer(self, opts.resume)
            self.last_checkpoint = str(opts.resume)
        else:
            ckpt.seed_everything(opts.seed, rank=self.ctx.rank)
            if opts.original is not None:
                self.top1_original = self._evaluate_other(opts.original)
            self.top1_before = self.evaluate(self.model)
        if not dynamic_layers(self.model):
            warnings.warn(
                "model has no dynamic layers; fine-tuning it as a static model", stacklevel=3
            )
        main = self.ctx.is_main
        bars = TrainProgress(
            opts.progress and main, self.total_iters, messages=opts.verbose and main
        )
        with bars as progress, stop_on_sigint(self):
            if self.skipped_files:
                progress.log(f"skipped {self.skipped_files} non-image files")
            while self.epoch < opts.epochs:
                self._train_epoch(progress)
                self._end_epoch(progress)
        after = self.history[-1]["val_top1"] if self.history else None
        uniform = None
        if after is not None and dynamic_layers(self.model):
            rng = ckpt.capture_rng()  # the val loader draws a seed; end in the saved state
            uniform = self.evaluate(static_twin(self.model))  # each router uniform
            ckpt.restore_rng(rng)
        progress.log(results_table(self.top1_original, self.top1_before, after, uniform))
        if self.health:
            progress.log(health_table(self.health))
        for message in unused_warnings(self.health):
            progress.log(f"[yellow]warning:[/yellow] {message}")
        self.ctx.barrier()  # rank 0 may still be writing; leave the process group together
        return FinetuneResult(
            self.model,
            self.history,
            self.top1_original,
            self.top1_before,
            after,
            self.health,
            self.classes,
            self.last_checkpoint,
            uniform,
        )

    def _evaluate_other(self, model: nn.Module) -> float | None:
        original_device = next(model.parameters()).device
        model.to(self.device)
        try:
            return self.evaluate(model)
        finally:
            model.to(original_device)
