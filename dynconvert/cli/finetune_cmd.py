"""``dynconvert finetune MODEL.pt --data DIR --epochs N --out ft.pt``.

The training flags are shared with the convert command (``dynconvert resnet50 --data DIR
...`` = convert, fine-tune, save) through :func:`training_options` and :func:`finetune_step`.
Precedence: built-in defaults < ``--recipe FILE`` < flags given on the command line. The work
(recipe merging, the checks before loading, the model and its head) is the API's
(:mod:`dynconvert.model_request.finetune_plan`, :mod:`~dynconvert.model_request.finetune_run`):
the command parses, calls one function and prints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from torch import nn

from ..errors import DynconvertError
from ..finetune.options import FinetuneOptions
from ..model_request import check_run, collect_options, finetune_model_file, run_finetune
from .options import cli_option_names, dataclass_options
from .params import FilePath, square_image_size

_FILE_TO_WRITE = FilePath(dir_okay=False, path_type=Path)  # a folder is bad usage (exit 2)
# The flags of the command itself, not FinetuneOptions fields.
_DATA = click.option("--data", type=FilePath(path_type=Path), help="DIR with train/ and val/.")
_RECIPE = click.option(
    "--recipe", type=FilePath(path_type=Path), help="YAML recipe; flags override."
)
_DISTILL = click.option(
    "--distill/--no-distill", default=None, help="distil from the static original."
)
_NUM_CLASSES = click.option(
    "--num-classes", type=click.IntRange(min=1), help="reset the head to N classes."
)


def training_options(command: Callable, *, skip: tuple[str, ...] = ()) -> Callable:
    """Add the fine-tuning flags (but the fields named in ``skip``) to a click command: the
    :class:`FinetuneOptions` fields, defaulting to None so that a recipe can fill them."""
    fields = dataclass_options(
        FinetuneOptions, skip=skip, recipe_defaults=True, extra={"distill_weight": _DISTILL}
    )
    return _DATA(_RECIPE(fields(_NUM_CLASSES(command))))


# The convert command has its own --checkpoint (weights to start from), --seed (kernel
# perturbation; reused for training) and --input-size (reused for the data).
PIPELINE_SKIP = ("checkpoint", "seed", "input_size")
PIPELINE_FLAGS = (
    "data",
    "recipe",
    *cli_option_names(FinetuneOptions, skip=PIPELINE_SKIP),
    "distill",
    "num_classes",
)


def pipeline_options(command: Callable) -> Callable:
    """The fine-tuning flags of ``dynconvert MODEL --data DIR ...`` (convert → fine-tune → save),
    plus ``--train-checkpoint``."""
    command = click.option("--train-checkpoint", type=_FILE_TO_WRITE, help="default: OUT.ckpt")(
        command
    )
    return training_options(command, skip=PIPELINE_SKIP)


def pop_pipeline_flags(options: dict[str, Any]) -> dict[str, Any] | None:
    """Take the fine-tuning flags out of the convert command's ``options``; None without
    ``--data``/``--recipe`` (then nothing is trained and any training flag is an error)."""
    flags = {name: options.pop(name) for name in (*PIPELINE_FLAGS, "train_checkpoint")}
    flags["checkpoint"] = flags.pop("train_checkpoint")
    flags["seed"] = options.get("seed")
    if flags["data"] is None and flags["recipe"] is None:
        given = [k for k in PIPELINE_FLAGS if k != "progress" and flags.get(k) is not None]
        if given:
            raise DynconvertError(
                f"--{given[0].replace('_', '-')} needs --data DIR to fine-tune on", usage=True
            )
        return None
    flags["input_size"] = square_image_size(options.get("input_size"))
    collect_options(dict(flags))  # recipe and flag errors before the slow conversion
    return flags


def finetune_step(
    flags: dict[str, Any],
    out: Path | None,
    inputs: dict[str, Path | None],
    outputs: dict[str, Path | None],
) -> Callable:
    """The ``after_convert`` step of the convert command: fine-tune, leave saving to it.
    ``inputs`` and ``outputs``: the convert command's own (``MODEL``, ``--json``)."""
    if out is None:
        raise DynconvertError("fine-tuning needs --out FILE (not --dry-run)", usage=True)
    # outputs and data before the conversion
    plan = check_run(flags, out, inputs, outputs, checkpoint_flag="--train-checkpoint")

    def step(model: nn.Module, report: Any) -> nn.Module:
        run_finetune(model, flags, out, save=False, plan=plan, notify=_note)
        return model

    return step


def _note(text: str) -> None:
    click.echo(text, err=True)


@click.command("finetune")
@click.argument("model_file", required=False, type=FilePath(path_type=Path))
@click.option("--model", "spec", help="package.module:function building your model.")
@click.option("--weights", type=FilePath(path_type=Path), help="state dict for --model.")
@click.option("--out", required=True, type=_FILE_TO_WRITE, help="where to save.")
@training_options
def finetune_command(model_file, spec, weights, out, **flags) -> None:
    """Fine-tune a converted model on an ImageFolder DIR (train/ and val/).

    A static model (``--model``, or ``model.name`` in the recipe) is first converted with the
    recipe's ``convert`` section; without one it is refused (only converted models save).

    \b
    dynconvert finetune model.pt --data DIR --epochs 5 --out ft.pt
    dynconvert finetune --model pkg.mod:net --weights w.pth --data DIR --out ft.pt
    torchrun --nproc_per_node 4 -m dynconvert finetune model.pt --data DIR --out ft.pt
    """
    flags["input_size"] = square_image_size(flags["input_size"])
    finetune_model_file(model_file, spec, weights, out, flags, notify=_note)
