"""``dynconvert finetune MODEL.pt --data DIR --epochs N --out ft.pt``.

The training flags are shared with the convert command (``dynconvert resnet50 --data DIR
...`` = convert, fine-tune, save) through :func:`training_options` and :func:`run_finetune`.
Precedence: built-in defaults < ``--recipe FILE`` < flags given on the command line.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from torch import nn

from ..errors import DynconvertError
from ..finetune.options import FinetuneOptions
from ..model_request import build_architecture, load_saved, reset_recorded_head
from ..ranks import is_main_process
from ..sources import is_saved_file
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
_NOT_OPTIONS = {"data", "recipe", "num_classes", "distill"}


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
        run_finetune(model, flags, out, save=False, plan=plan)
        return model

    return step


def collect_options(flags: dict[str, Any]) -> tuple[dict[str, Any], Any, Path | None]:
    """``(finetune kwargs, recipe, data path)`` from the recipe and the flags given."""
    from ..recipes import Recipe, load_recipe

    recipe = load_recipe(flags["recipe"]) if flags.get("recipe") else Recipe()
    options = recipe.finetune_options()
    for name, value in flags.items():
        if name in _NOT_OPTIONS or value is None:
            continue
        if name == "progress" and value is True and "progress" in options:
            continue
        options[name] = str(value) if isinstance(value, Path) else value
    if flags.get("distill") is not None:
        options.pop("teacher", None)
        if flags["distill"]:
            options["teacher"] = True
    data = flags.get("data") or recipe.data.get("path")
    if data is None:
        raise DynconvertError("--data DIR is required (or data.path in the recipe)", usage=True)
    if flags.get("num_classes") is None and recipe.model.get("num_classes") is not None:
        flags["num_classes"] = recipe.model["num_classes"]
    return options, recipe, Path(data)


@dataclasses.dataclass
class RunPlan:
    """What :func:`check_run` found: the finetune kwargs, the recipe and the data."""

    options: dict[str, Any]
    recipe: Any
    data: Path
    has_val: bool


def check_run(
    flags: dict[str, Any],
    out: Path,
    inputs: dict[str, Path | None] | None = None,
    outputs: dict[str, Path | None] | None = None,
    checkpoint_flag: str = "--checkpoint",
) -> RunPlan:
    """Every check that needs no model: options, output paths, plot format, data layout.

    ``inputs``: files the run reads (``MODEL``, weights), which no output may replace;
    ``outputs``: the command's other outputs (``--json``), which must be other files.
    """
    from .. import io
    from ..finetune.data import scan_image_folder, split_folders
    from ..finetune.distributed import resolve_device
    from ..finetune.plot import check_plot_path

    options, recipe, data = collect_options(flags)
    resolve_device(options.get("device"))  # a bad --device is bad usage, said before the run
    explicit_checkpoint = options.get("checkpoint") is not None
    options.setdefault("checkpoint", str(out.with_suffix(".ckpt")))
    _check_distinct(out, options, explicit_checkpoint=flags.get("checkpoint") is not None)
    named = recipe.model.get("name")
    read = {
        **(inputs or {}),
        "--recipe": flags.get("recipe"),
        "the recipe's model.name": named if named and is_saved_file(named) else None,
        "the recipe's model.weights": recipe.model.get("weights"),
        "--resume": options.get("resume"),
    }
    checkpoint = checkpoint_flag if explicit_checkpoint else "the training checkpoint"
    written = {"--out": out, **(outputs or {}), checkpoint: options["checkpoint"]}
    io.check_outputs(
        {**written, "--plot": options.get("plot")},
        read,
        {"--data": data},
        may_replace=[(checkpoint, "--resume")],  # the checkpoint continues the resumed run
    )
    if options.get("plot") is not None:
        check_plot_path(options["plot"])
    train_root, val_root = split_folders(data)
    allow_empty = bool(options.get("allow_empty_classes"))
    classes, _, _ = scan_image_folder(train_root, "train", allow_empty_classes=allow_empty)
    wanted = flags.get("num_classes")
    if wanted is not None and wanted != len(classes):
        raise DynconvertError(
            f"--num-classes {wanted} does not match the {len(classes)} class folders in "
            f"{train_root}",
            usage=True,
        )
    return RunPlan(options, recipe, data, has_val=val_root is not None)


def _check_distinct(out: Path, options: dict[str, Any], *, explicit_checkpoint: bool) -> None:
    """The saved model, the training checkpoint and the plot must be three files: each write
    would silently replace the other."""
    checkpoint = Path(options["checkpoint"])
    if out.resolve() == checkpoint.resolve():
        if explicit_checkpoint:
            raise DynconvertError(
                f"--out and --checkpoint are the same file {out}; give them different files",
                usage=True,
            )
        raise DynconvertError(
            f"--out {out} is also the training checkpoint (OUT with .ckpt), which the saved "
            f"model would replace; give --out another suffix (e.g. {out.with_suffix('.pt')}) "
            "or --checkpoint another file",
            usage=True,
        )
    plot = options.get("plot")
    for flag, path in (("--out", out), ("--checkpoint", checkpoint)):
        if plot is not None and Path(plot).resolve() == path.resolve():
            raise DynconvertError(
                f"--plot and {flag} are the same file {path}; give them different files",
                usage=True,
            )


def run_finetune(
    model: nn.Module,
    flags: dict[str, Any],
    out: Path,
    *,
    original: nn.Module | None = None,
    save: bool = True,
    report: Any = None,
    plan: RunPlan | None = None,
):
    """Fine-tune ``model`` with the CLI ``flags`` and save it to ``out`` (rank 0 only).

    ``original``: the static model before conversion, for the results table and as the
    teacher of ``--distill`` (default: a static copy of ``model``, exact while its routers
    are still uniform). ``plan``: :func:`check_run` of these flags, when already done.
    """
    from .. import io
    from ..finetune import finetune, static_teacher
    from ..finetune.models import model_num_classes

    if plan is None:
        plan = check_run(flags, out)
    options, data = plan.options, plan.data
    head = model_num_classes(model)
    wanted = flags.get("num_classes")
    reset = wanted is not None and wanted != head
    if original is None:
        original = static_teacher(model)
    if reset:
        if options.get("teacher"):
            raise DynconvertError(
                "--distill needs the original classifier head; drop --num-classes or --distill",
                usage=True,
            )
        reset_recorded_head(model, wanted, seed=options.get("seed") or 0)
        original = None
    if options.get("teacher") is True and original is not None:
        options["teacher"] = original
    options["original"] = original
    if not plan.has_val and is_main_process():
        click.echo(
            f"note: {data} has no val/ folder, so no validation is done (no val top-1)",
            err=True,
        )
    result = finetune(model, data, **options)
    if save and is_main_process():
        io.save(model, out, report=report)
        click.echo(f"saved {out}", err=True)
    return result


def load_model(model_file: Path | None, spec: str | None, weights: Path | None) -> nn.Module:
    """A ``dynconvert.save`` file (its architecture from ``--model`` for a custom model), or
    ``--model package.module:function`` with ``--weights`` (a state dict)."""
    from ..finetune import load_user_model

    if model_file is not None and weights is not None:
        raise DynconvertError("give either MODEL (a dynconvert file) or --weights", usage=True)
    if model_file is not None:
        return load_saved(model_file, build_architecture(spec))
    if spec is None:
        raise DynconvertError("give MODEL (a dynconvert file) or --model pkg.mod:fn", usage=True)
    return load_user_model(spec, weights)


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
    # before anything is loaded
    plan = check_run(flags, out, {"MODEL": model_file, "--weights": weights})
    recipe = plan.recipe
    if model_file is None and spec is None and recipe.model.get("name"):
        name = recipe.model["name"]  # a dynconvert file, or package.module:function
        spec, model_file = (name, None) if ":" in name else (None, Path(name))
        if spec is not None and weights is None and recipe.model.get("weights"):
            weights = Path(recipe.model["weights"])
    model = load_model(model_file, spec, weights)
    original = report = None
    if not _has_dynamic_layers(model):  # a static model: convert with the recipe, or refuse
        if not recipe.convert:  # io.save would refuse it, after the whole run
            raise DynconvertError(
                f"{spec or model_file} has no dynamic convolutions, and only a converted model "
                "can be saved; convert it first: add a convert: section to a --recipe "
                "(e.g. 'convert: {k: 4}'), or use dynconvert.convert and dynconvert.save",
                usage=True,
            )
        import dynconvert

        original = copy.deepcopy(model).eval()
        model, report = dynconvert.convert(model, **recipe.convert)
    run_finetune(model, flags, out, original=original, report=report, plan=plan)


def _has_dynamic_layers(model: nn.Module) -> bool:
    from ..layers import DynamicConvNd

    return any(isinstance(m, DynamicConvNd) for m in model.modules())
