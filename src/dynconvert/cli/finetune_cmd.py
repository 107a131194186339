"""``dynconvert finetune MODEL.pt --data DIR --epochs N --out ft.pt``.

The training flags are shared with the convert command (``dynconvert resnet50 --data DIR
...`` = convert, fine-tune, save) through :func:`training_options` and :func:`run_finetune`.
Precedence: built-in defaults < ``--recipe FILE`` < flags given on the command line.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from torch import nn

from ..errors import DynconvertError
from ..ranks import is_main_process

# click option name -> FinetuneOptions field (None: handled by the command itself).
_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--data",), {"type": click.Path(path_type=Path), "help": "DIR with train/ and val/."}),
    (("--recipe",), {"type": click.Path(path_type=Path), "help": "YAML recipe; flags override."}),
    (("--epochs",), {"type": int}),
    (("--batch-size",), {"type": int}),
    (("--optimizer",), {"type": click.Choice(["sgd", "adamw"])}),
    (("--lr",), {"type": float}),
    (("--attention-lr",), {"type": float, "help": "lr of the routers (default: --lr)."}),
    (("--weight-decay",), {"type": float}),
    (("--warmup-epochs",), {"type": float}),
    (("--temperature-start",), {"type": float, "help": "router temperature at the start."}),
    (("--temperature-end",), {"type": float}),
    (("--temperature-epochs",), {"type": float}),
    (("--kernel-lr-scale",), {"type": float, "help": "lr factor of the K kernels (try K)."}),
    (("--kernel-grad-scale",), {"type": float, "help": "gradient factor of the K kernels."}),
    (("--kernel-diff-grad-scale",), {"type": float, "help": "extra factor on their differences."}),
    (("--kernel-diff-decay",), {"type": float, "help": "decay of the kernels' differences."}),
    (("--mixup-alpha",), {"type": float}),
    (("--cutmix-alpha",), {"type": float}),
    (("--distill/--no-distill",), {"default": None, "help": "distil from the static original."}),
    (("--distill-weight",), {"type": float}),
    (("--label-smoothing",), {"type": float}),
    (("--clip-grad-norm",), {"type": float}),
    (("--amp",), {"type": click.Choice(["bf16", "fp16"]), "help": "autocast (CUDA, CPU)."}),
    (("--channels-last/--no-channels-last",), {"default": None}),
    (("--device",), {"type": str, "help": "cpu, cuda, cuda:1 (default: auto)."}),
    (("--seed",), {"type": int}),
    (("--num-workers",), {"type": int}),
    (("--train-subset",), {"type": int, "help": "train on N images (quick runs)."}),
    (("--input-size",), {"type": int, "help": "square input size for folder data."}),
    (("--checkpoint",), {"type": click.Path(path_type=Path), "help": "default: OUT.ckpt"}),
    (("--checkpoint-every",), {"type": int, "help": "also checkpoint every N iterations."}),
    (("--resume",), {"type": click.Path(path_type=Path), "help": "continue from a checkpoint."}),
    (("--plot",), {"type": click.Path(path_type=Path), "help": "write curves (PNG) here."}),
    (("--num-classes",), {"type": int, "help": "reset the head to this many classes."}),
    (("--progress/--no-progress",), {"default": True}),
]
_NOT_OPTIONS = {"data", "recipe", "num_classes", "distill"}


def training_options(command: Callable, *, skip: tuple[str, ...] = ()) -> Callable:
    """Add the fine-tuning flags (but the ones named in ``skip``) to a click command."""
    import dataclasses

    from ..finetune.options import FinetuneOptions

    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneOptions)}
    for names, kwargs in reversed(_FLAGS):
        flag = names[0].split("/")[0]
        if flag in skip:
            continue
        field = flag.lstrip("-").replace("-", "_")
        if field in defaults and defaults[field] is not None and field != "progress":
            kwargs = {**kwargs, "help": f"{kwargs.get('help', '')} [default: {defaults[field]}]"}
        command = click.option(*names, **kwargs)(command)
    return command


# The convert command has its own --checkpoint (weights to start from), --seed (kernel
# perturbation; reused for training) and --input-size (reused for the data).
PIPELINE_SKIP = ("--checkpoint", "--seed", "--input-size")
PIPELINE_FLAGS = tuple(
    names[0].split("/")[0].lstrip("-").replace("-", "_")
    for names, _ in _FLAGS
    if names[0].split("/")[0] not in PIPELINE_SKIP
)


def pipeline_options(command: Callable) -> Callable:
    """The fine-tuning flags of ``dynconvert MODEL --data DIR ...`` (convert → fine-tune → save),
    plus ``--train-checkpoint``."""
    command = click.option(
        "--train-checkpoint", type=click.Path(path_type=Path), help="default: OUT.ckpt"
    )(command)
    return training_options(command, skip=PIPELINE_SKIP)


def pop_pipeline_flags(options: dict[str, Any]) -> dict[str, Any] | None:
    """Take the fine-tuning flags out of the convert command's ``options``; None without
    ``--data``/``--recipe`` (then nothing is trained and any training flag is an error)."""
    flags = {name: options.pop(name) for name in (*PIPELINE_FLAGS, "train_checkpoint")}
    flags["checkpoint"] = flags.pop("train_checkpoint")
    flags["seed"] = options.get("seed")
    size = options.get("input_size")
    flags["input_size"] = size[-1] if size else None
    if flags["data"] is None and flags["recipe"] is None:
        given = [k for k in PIPELINE_FLAGS if k != "progress" and flags.get(k) is not None]
        if given:
            raise DynconvertError(
                f"--{given[0].replace('_', '-')} needs --data DIR to fine-tune on", usage=True
            )
        return None
    collect_options(dict(flags))  # recipe and flag errors before the slow conversion
    return flags


def finetune_step(flags: dict[str, Any], out: Path | None) -> Callable:
    """The ``after_convert`` step of the convert command: fine-tune, leave saving to it."""
    if out is None:
        raise DynconvertError("fine-tuning needs --out FILE (not --dry-run)", usage=True)

    def step(model: nn.Module, report: Any) -> nn.Module:
        run_finetune(model, flags, out, save=False)
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


def run_finetune(
    model: nn.Module,
    flags: dict[str, Any],
    out: Path,
    *,
    original: nn.Module | None = None,
    save: bool = True,
    report: Any = None,
):
    """Fine-tune ``model`` with the CLI ``flags`` and save it to ``out`` (rank 0 only).

    ``original``: the static model before conversion, for the results table and as the
    teacher of ``--distill`` (default: a static copy of ``model``, exact while its routers
    are still uniform).
    """
    from .. import io
    from ..finetune import finetune, reset_head, static_teacher
    from ..finetune.data import scan_image_folder, split_folders
    from ..finetune.models import model_num_classes
    from ..models import SOURCE_ATTR, model_source

    options, _, data = collect_options(flags)
    io.check_output_path(out)
    options.setdefault("checkpoint", str(out.with_suffix(".ckpt")))
    train_root, _ = split_folders(data)
    classes, _, _ = scan_image_folder(train_root, "train")
    head = model_num_classes(model)
    wanted = flags.get("num_classes")
    source = model_source(model)
    reset = wanted is not None and wanted != head
    if wanted is not None and wanted != len(classes):
        raise DynconvertError(
            f"--num-classes {wanted} does not match the {len(classes)} class folders in "
            f"{train_root}",
            usage=True,
        )
    if original is None:
        original = static_teacher(model)
    if reset:
        if options.get("teacher"):
            raise DynconvertError(
                "--distill needs the original classifier head; drop --num-classes or --distill",
                usage=True,
            )
        reset_head(model, wanted)
        original = None
        if source.get("kind") == "timm":  # so that the saved file rebuilds the new head
            source = copy.deepcopy(source)
            source.setdefault("kwargs", {})["num_classes"] = wanted
            object.__setattr__(model, SOURCE_ATTR, source)
    if options.get("teacher") is True and original is not None:
        options["teacher"] = original
    options["original"] = original
    result = finetune(model, data, **options)
    if save and is_main_process():
        io.save(model, out, report=report)
        click.echo(f"saved {out}", err=True)
    return result


def load_model(model_file: Path | None, spec: str | None, weights: Path | None) -> nn.Module:
    """A ``dynconvert.save`` file (its architecture from ``--model`` for a custom model), or
    ``--model package.module:function`` with ``--weights`` (a state dict)."""
    from .. import io
    from ..finetune import load_user_model

    if model_file is not None and weights is not None:
        raise DynconvertError("give either MODEL (a dynconvert file) or --weights", usage=True)
    if model_file is not None:
        architecture = load_user_model(spec) if spec else None
        return io.load(model_file, model=architecture)
    if spec is None:
        raise DynconvertError("give MODEL (a dynconvert file) or --model pkg.mod:fn", usage=True)
    return load_user_model(spec, weights)


@click.command("finetune")
@click.argument("model_file", required=False, type=click.Path(path_type=Path))
@click.option("--model", "spec", help="package.module:function building your model.")
@click.option("--weights", type=click.Path(path_type=Path), help="state dict for --model.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="where to save.")
@training_options
def finetune_command(model_file, spec, weights, out, **flags) -> None:
    """Fine-tune a converted model on an ImageFolder DIR (train/ and val/).

    A static model (``--model``, or ``model.name`` in the recipe) is first converted with the
    recipe's ``convert`` section, when it has one.

    \b
    dynconvert finetune model.pt --data DIR --epochs 5 --out ft.pt
    dynconvert finetune --model pkg.mod:net --weights w.pth --data DIR --out ft.pt
    torchrun --nproc_per_node 4 -m dynconvert finetune model.pt --data DIR --out ft.pt
    """
    _, recipe, _ = collect_options(dict(flags))  # recipe and flag errors before loading
    if model_file is None and spec is None and recipe.model.get("name"):
        name = recipe.model["name"]  # a dynconvert file, or package.module:function
        spec, model_file = (name, None) if ":" in name else (None, Path(name))
        if spec is not None and weights is None and recipe.model.get("weights"):
            weights = Path(recipe.model["weights"])
    model = load_model(model_file, spec, weights)
    original = report = None
    if recipe.convert and not _has_dynamic_layers(model):  # a static model + a recipe: convert
        import dynconvert

        original = copy.deepcopy(model).eval()
        model, report = dynconvert.convert(model, **recipe.convert)
    run_finetune(model, flags, out, original=original, report=report)


def _has_dynamic_layers(model: nn.Module) -> bool:
    from ..layers import DynamicConvNd

    return any(isinstance(m, DynamicConvNd) for m in model.modules())
