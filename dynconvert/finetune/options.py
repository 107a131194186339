"""The settings of one fine-tuning run, validated before any training starts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DynconvertError
from ..option_fields import option
from .plot import check_plot_path  # matplotlib itself is imported only when a plot is drawn

OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("bf16", "fp16")
TRAIN_AUGMENTS = ("timm", "crop-flip", "none")


@dataclasses.dataclass
class FinetuneOptions:
    """Everything :func:`dynconvert.finetune` accepts besides the model and the data.

    Learning rate: cosine decay to ``min_lr`` with a linear warm-up of ``warmup_epochs``,
    updated every iteration. Parameters under ``*.attention.*`` (the routers of the dynamic
    layers) get ``attention_lr`` (default: ``lr``); biases and 1-D parameters (norms) get no
    weight decay. The routers' softmax temperature goes from ``temperature_start`` to
    ``temperature_end`` over ``temperature_epochs`` (default: all epochs), linearly per
    iteration; Chen et al. (CVPR 2020, §3.3) anneal it from 30 to 1 early in training.
    ``None`` for ``temperature_start`` leaves the temperature alone. The dynamic layers' K
    kernels train at ``lr * kernel_lr_scale`` (see ``losses.parameter_groups``);
    ``kernel_grad_scale`` multiplies their gradients instead (unlike the lr, it leaves the
    weight decay's pace alone); ``kernel_diff_grad_scale`` then multiplies only the part of
    each kernel's gradient that differs from the K kernels' mean gradient, so that the kernels
    move apart faster than their mean moves; ``kernel_diff_decay`` adds
    ``kernel_diff_decay/2 · Σ ||W_k − mean W||²`` to the loss.
    ``regularizers`` (callables ``model -> scalar``) and ``batch_hook`` (``(x, y) -> (x, y)``)
    are the seams for other regularisers.

    ``amp`` (``'bf16'``/``'fp16'``) autocasts forward passes on CUDA or CPU (``precision.py``;
    the weights stay float32); ``channels_last`` applies on CUDA only.

    ``deterministic`` (default: on for CPU) makes the dynamic layers' ``'auto'`` strategy use
    fixed rules instead of timing, so equal seeds give equal weights, also after a resume.

    ``progress`` shows rich bars; ``verbose`` prints per-epoch lines, notes and the final
    tables (both on rank 0 only).
    """

    epochs: int = option(10)
    batch_size: int = option(64)
    optimizer: str = option("sgd", choices=OPTIMIZERS)
    lr: float = option(0.01)
    momentum: float = option(0.9, cli=False)
    nesterov: bool = option(True, cli=False)
    weight_decay: float = option(5e-4)
    attention_lr: float | None = option(None, "lr of the routers (default: --lr).")
    attention_weight_decay: float | None = option(None, cli=False)
    kernel_lr_scale: float = option(1.0, "lr factor of the K kernels (try K).")
    kernel_grad_scale: float = option(1.0, "gradient factor of the K kernels.")
    kernel_diff_grad_scale: float = option(1.0, "extra factor on their differences.")
    kernel_diff_decay: float = option(0.0, "decay of the kernels' differences.")
    min_lr: float = option(0.0, cli=False)
    warmup_epochs: float = option(0.0)
    temperature_start: float | None = option(None, "router temperature at the start.")
    temperature_end: float = option(1.0)
    temperature_epochs: float | None = option(None)
    distill_weight: float = option(0.5)
    distill_temperature: float = option(4.0, cli=False)
    label_smoothing: float = option(0.0)
    clip_grad_norm: float | None = option(None)
    mixup_alpha: float = option(0.0)
    cutmix_alpha: float = option(0.0)
    # timm's --mixup-off-epoch: plain batches from this epoch on (None = mixup to the end).
    mixup_off_epoch: float | None = option(None, "plain batches from this epoch on.")
    amp: str | None = option(None, "autocast (CUDA, CPU).", choices=AMP_MODES)
    channels_last: bool = option(False)
    device: str | None = option(None, "cpu, cuda, cuda:1 (default: auto).")
    seed: int = option(0)
    deterministic: bool | None = option(None, cli=False, recipe=None)
    num_workers: int = option(0, recipe="data")
    train_subset: int | None = option(None, "train on N images (quick runs).", recipe="data")
    # A class folder without images is an error unless allowed (it still becomes a class).
    allow_empty_classes: bool = option(
        False,
        "keep class folders without images (still classes of the head).",
        flag="--allow-empty-classes",
        recipe="data",
    )
    # Image pipeline for folder data (timm's data config; None = the model's own config).
    input_size: int | None = option(
        None,
        "square input size for folder data: N, or 3,N,N.",
        value="shape",
        metavar="N|3,N,N",
        recipe="data",
    )
    mean: Sequence[float] | None = option(None, cli=False, recipe="data")
    std: Sequence[float] | None = option(None, cli=False, recipe="data")
    interpolation: str | None = option(None, cli=False, recipe="data")
    crop_pct: float | None = option(None, cli=False, recipe="data")
    train_augment: str = option("timm", cli=False, recipe="data")
    eval_every: int = option(1, cli=False)
    checkpoint: str | Path | None = option(
        None, "default: OUT.ckpt", value="file_to_write", recipe=None
    )
    checkpoint_every: int = option(0, "also checkpoint every N iterations.")
    resume: str | Path | None = option(
        None, "continue from a checkpoint.", value="path", recipe=None
    )
    plot: str | Path | None = option(
        None, "write curves (PNG) here.", value="file_to_write", recipe=None
    )
    progress: bool = option(True, recipe=None)
    verbose: bool = option(True, cli=False, recipe=None)
    # Python-only seams, never in a recipe.
    teacher: Any = option(None, cli=False, recipe=None)
    original: Any = option(None, cli=False, recipe=None)
    callbacks: Sequence[Callable[[dict], None]] = option((), cli=False, recipe=None)
    regularizers: Sequence[Callable[[Any], Any]] = option((), cli=False, recipe=None)
    batch_hook: Callable[[Any, Any], tuple[Any, Any]] | None = option(None, cli=False, recipe=None)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> FinetuneOptions:
        unknown = sorted(set(kwargs) - cls.field_names())
        if unknown:
            known = ", ".join(sorted(cls.field_names()))
            raise TypeError(f"finetune: unknown option {unknown[0]!r}; known: {known}")
        return cls(**kwargs)

    def validate(self) -> None:
        _int(self, "epochs", low=1)
        _int(self, "batch_size", low=1)
        _int(self, "seed", low=0)
        _int(self, "num_workers", low=0)
        _int(self, "eval_every", low=1)
        _int(self, "checkpoint_every", low=0)
        if self.train_subset is not None:
            _int(self, "train_subset", low=1)
        _choice(self, "optimizer", OPTIMIZERS)
        _choice(self, "train_augment", TRAIN_AUGMENTS)
        if self.input_size is not None:
            _int(self, "input_size", low=1)
        if self.crop_pct is not None:
            _number(self, "crop_pct", positive=True)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 3:
                    raise DynconvertError(f"{name}: expected 3 numbers, got {value!r}", usage=True)
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                    raise DynconvertError(f"{name}: expected 3 numbers, got {value!r}", usage=True)
                setattr(self, name, [float(v) for v in value])
        if self.amp is not None:
            _choice(self, "amp", AMP_MODES)
        for name in (
            "lr",
            "distill_temperature",
            "kernel_lr_scale",
            "kernel_grad_scale",
            "kernel_diff_grad_scale",
        ):
            _number(self, name, positive=True)
        for name in (
            "momentum",
            "weight_decay",
            "min_lr",
            "warmup_epochs",
            "temperature_end",
            "distill_weight",
            "label_smoothing",
            "mixup_alpha",
            "cutmix_alpha",
            "kernel_diff_decay",
        ):
            _number(self, name)
        for name in (
            "attention_lr",
            "attention_weight_decay",
            "temperature_start",
            "temperature_epochs",
            "clip_grad_norm",
            "mixup_off_epoch",
        ):
            if getattr(self, name) is not None:
                _number(self, name, positive=name not in ("attention_lr", "attention_weight_decay"))
        if self.temperature_start is not None and not self.temperature_end > 0:
            raise DynconvertError("temperature_end: must be > 0", usage=True)
        if self.distill_weight > 1:
            raise DynconvertError("distill_weight: must be in [0, 1]", usage=True)
        if self.label_smoothing >= 1:
            raise DynconvertError("label_smoothing: must be in [0, 1)", usage=True)
        if self.momentum >= 1:
            raise DynconvertError("momentum: must be in [0, 1)", usage=True)
        for name in ("channels_last", "nesterov", "progress", "verbose", "allow_empty_classes"):
            if not isinstance(getattr(self, name), bool):
                raise DynconvertError(f"{name}: expected true or false", usage=True)
        if self.deterministic is not None and not isinstance(self.deterministic, bool):
            raise DynconvertError("deterministic: expected true, false or null", usage=True)
        if self.device is not None and not isinstance(self.device, str):
            self.device = str(self.device)
        if self.plot is not None:
            check_plot_path(self.plot)  # the plot is first written after a whole epoch
        for name in ("callbacks", "regularizers"):
            for item in getattr(self, name):
                if not callable(item):
                    raise DynconvertError(f"{name}: {item!r} is not callable", usage=True)

    def recipe_dict(self) -> dict[str, Any]:
        """The plain (YAML/checkpoint-safe) settings, without the Python-only seams."""
        skip = {"teacher", "original", "callbacks", "regularizers", "batch_hook"}
        out = {}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                value = getattr(self, f.name)
                out[f.name] = str(value) if isinstance(value, Path) else value
                if isinstance(value, tuple):
                    out[f.name] = list(value)
        return out


def _int(opts: FinetuneOptions, name: str, low: int) -> None:
    value = getattr(opts, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DynconvertError(f"{name}: expected an int >= {low}, got {value!r}", usage=True)


def _number(opts: FinetuneOptions, name: str, positive: bool = False) -> None:
    value = getattr(opts, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DynconvertError(f"{name}: expected a finite number, got {value!r}", usage=True)
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise DynconvertError(f"{name}: must be {bound}, got {value!r}", usage=True)
    setattr(opts, name, float(value))


def _choice(opts: FinetuneOptions, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(opts, name)
    if value not in choices:
        raise DynconvertError(
            f"{name}: expected one of {', '.join(choices)}, got {value!r}", usage=True
        )
