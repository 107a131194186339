"""``dynconvert MODEL --k 4 --out model.pt``: convert a model and save it.

MODEL is a timm name, ``package.module:function`` building your own model, or a file saved by
dynconvert (see ``model_request.py``, which builds or loads it). A timm model is built
pretrained by default: converting trained weights is the point; offline that fails with a
hint to use ``--no-pretrained`` or ``--checkpoint FILE``, never a silent fall-back to random
weights. A saved file is already converted: its stored report is shown and it is saved again
to ``--out``; conversion options are refused for it (they would not apply).

``--dry-run`` converts in memory and shows the report without writing the model (``--json``
still writes the report, since it was asked for). Without ``--dry-run``, ``--out`` is required.

The command is three steps (:func:`prepare_model`, an optional ``after_convert`` step, then
:func:`write_outputs`) so that a later option can add a step, e.g. fine-tuning with
``--data DIR --epochs N``: add the click options to :data:`convert_command` and pass
``after_convert=`` to :func:`run_convert`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from torch import nn

from ..convert.config import DEPTHWISE_POLICIES
from ..engine import STRATEGIES
from ..errors import DynconvertError
from .finetune_cmd import finetune_step, is_main_process, pipeline_options, pop_pipeline_flags
from .model_request import (
    CONVERSION_OPTIONS,
    ModelRequest,
    Prepared,
    is_saved_file,
    prepare_model,
)
from .params import FilePath, architecture_option, input_size_option

AfterConvert = Callable[[nn.Module, Any], nn.Module]


def conversion_options(command: Callable) -> Callable:
    """The options of :func:`dynconvert.convert`, shared by ``convert`` and ``inspect``."""
    positive = click.FloatRange(min=0, min_open=True)
    options = [
        click.option("--k", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Kernels per dynamic conv (K)."),
        click.option("--ratio", type=positive, default=0.25, show_default=True,
                     help="Router width as a fraction of the input channels."),
        click.option("--temperature", type=positive, default=1.0, show_default=True,
                     help="Softmax temperature of the router."),
        click.option("--include", multiple=True, metavar="GLOB",
                     help="Convert only convs whose qualified name matches (repeatable)."),
        click.option("--exclude", multiple=True, metavar="GLOB",
                     help="Keep convs whose qualified name matches static (repeatable)."),
        click.option("--skip-stem/--no-skip-stem", default=True, show_default=True,
                     help="Keep the conv that reads the input static, as the paper does."),
        click.option("--min-channels", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Convs with fewer input or output channels stay static."),
        click.option("--depthwise", type=click.Choice(DEPTHWISE_POLICIES), default="convert",
                     show_default=True, help="What to do with depthwise convs."),
        click.option("--strategy", type=click.Choice(["auto", *STRATEGIES]), default="auto",
                     show_default=True,
                     help="Forward strategy of the dynamic layers ('dense': batch 1 only)."),
        input_size_option("Input size for shapes and MACs (default: the model's)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the kernel perturbation."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def explicit_options(ctx: click.Context, names: tuple[str, ...] | list[str]) -> set[str]:
    """Which of ``names`` were given on the command line (not defaults)."""
    return {name for name in names if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}


def apply_recipe(request: ModelRequest, recipe_path: Path) -> None:
    """The recipe fills what the command line left at its defaults (precedence: defaults <
    recipe < command line, as for the fine-tuning options).

    - ``convert``: the conversion options. A saved MODEL is already converted, so it is
      not re-converted; a note says so.
    - ``model``: ``pretrained``, and ``weights`` as ``--checkpoint``, when the recipe names
      MODEL (or names no model). MODEL on the command line wins over another
      ``model.name``, and then that model's weights are not used; a note says so.
    """
    from ..recipes import load_recipe

    recipe = load_recipe(recipe_path)
    if is_saved_file(request.model):
        if recipe.convert and is_main_process():
            click.echo(f"note: {request.model} is already converted; the recipe's convert "
                       "section is not applied", err=True)  # fmt: skip
        return
    for name, value in recipe.convert.items():
        if name not in request.explicit:
            is_size = name == "input_size" and value is not None
            request.options[name] = tuple(value) if is_size else value
    named = recipe.model.get("name")
    if named is not None and named != request.model:
        if recipe.model.keys() & {"weights", "pretrained"} and is_main_process():
            click.echo(f"note: MODEL {request.model} replaces the recipe's model.name {named}; "
                       "its model.weights/pretrained are not used", err=True)  # fmt: skip
        return
    if "pretrained" in recipe.model and "pretrained" not in request.explicit:
        request.pretrained = recipe.model["pretrained"]
    weights = recipe.model.get("weights")
    if weights is not None and not request.explicit & {"checkpoint", "pretrained"}:
        request.checkpoint = Path(weights)


def show_report(report: Any, json_path: Path | None) -> None:
    report.print()
    if json_path is not None:
        report.to_json(json_path)
        click.echo(f"wrote the report to {json_path}")


def write_outputs(prepared: Prepared, out: Path | None, json_path: Path | None) -> None:
    """Print the report, write ``--json``, and save the model to ``--out`` (if given)."""
    import dynconvert

    if not is_main_process():  # under torchrun every rank converts; rank 0 alone writes
        return
    show_report(prepared.report, json_path)
    if out is None:
        click.echo("dry run: the model was not written")
        return
    dynconvert.save(prepared.model, out, report=prepared.report)
    size_mb = out.stat().st_size / 2**20
    custom = dynconvert.io.read(out, map_location="meta")["source"].get("kind") != "timm"
    how = f"dynconvert.load({str(out)!r}{', model=<your architecture>' if custom else ''})"
    click.echo(f"saved {out} ({size_mb:.1f} MiB); load it with {how}")


def input_files(request: ModelRequest) -> dict[str, Path | None]:
    """The files the convert command reads, which no output may replace."""
    return {
        "MODEL": Path(request.model) if is_saved_file(request.model) else None,
        "--checkpoint": request.checkpoint,
    }


def run_convert(
    request: ModelRequest,
    *,
    out: Path | None,
    json_path: Path | None = None,
    after_convert: AfterConvert | None = None,
) -> Prepared:
    """The command without click: check outputs, prepare, optional extra step, write."""
    from dynconvert.io import check_outputs

    # fail before the (slow) conversion
    check_outputs({"--out": out, "--json": json_path}, input_files(request))
    prepared = prepare_model(request)
    if after_convert is not None:
        prepared.model = after_convert(prepared.model, prepared.report)
    write_outputs(prepared, out, json_path)
    return prepared


@click.command("convert")
@click.argument("model", metavar="MODEL")
@click.option(
    "--out",
    "-o",
    type=FilePath(dir_okay=False, path_type=Path),
    default=None,
    help="Where to save the converted model (one file).",
)
@click.option(
    "--dry-run", is_flag=True, help="Convert in memory and show the report; do not write the model."
)
@click.option(
    "--json",
    "json_path",
    type=FilePath(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report as JSON to this file.",
)
@click.option(
    "--pretrained/--no-pretrained",
    default=True,
    show_default=True,
    help="Start from timm's pretrained weights (needs the hub or its cache).",
)
@click.option(
    "--checkpoint",
    type=FilePath(dir_okay=False, path_type=Path),
    default=None,
    help="Start from the weights in this local timm/torch checkpoint instead (for "
    "package.module:function, its state dict).",
)
@architecture_option
@conversion_options
@pipeline_options  # --data DIR --epochs N ...: convert → fine-tune → save (finetune_cmd.py)
@click.pass_context
def convert_command(
    ctx: click.Context,
    model: str,
    out: Path | None,
    dry_run: bool,
    json_path: Path | None,
    pretrained: bool,
    checkpoint: Path | None,
    architecture: str | None,
    **options: Any,
) -> None:
    """Convert the convs of MODEL (a timm name, a saved file, or package.module:function
    building your own model, with --checkpoint as its state dict) to dynamic convs.

    \b
    dynconvert resnet50 --k 4 --out model.pt
    dynconvert mypackage.nets:build --checkpoint w.pth --input-size 3,32,32 --out model.pt
    dynconvert resnet50 --no-pretrained --exclude 'layer4.*' --dry-run
    dynconvert resnet50 --recipe R.yaml --data DIR --epochs 5 --out model.pt

    With --data or --recipe it also fine-tunes before saving; the recipe's convert section
    sets the conversion options not given as flags, and its model section the weights when
    it names MODEL. Under torchrun only rank 0 writes.
    """
    if out is None and not dry_run:
        raise DynconvertError(
            "no output: pass --out FILE to save the converted model, or --dry-run to only "
            "see the report",
            usage=True,
        )
    train_flags = pop_pipeline_flags(options)  # None unless --data/--recipe (finetune_cmd.py)
    request = ModelRequest(
        model=model,
        pretrained=pretrained,
        checkpoint=checkpoint,
        options=options,
        explicit=explicit_options(ctx, [*CONVERSION_OPTIONS, "pretrained", "checkpoint"]),
        architecture=architecture,
    )
    if train_flags is not None:
        if "seed" not in request.explicit:  # the default --seed must not hide finetune.seed
            train_flags["seed"] = None
        if train_flags["recipe"] is not None:
            apply_recipe(request, train_flags["recipe"])
    after = None
    if train_flags is not None:
        outputs = {"--json": json_path}
        after = finetune_step(train_flags, None if dry_run else out, input_files(request), outputs)
    run_convert(request, out=None if dry_run else out, json_path=json_path, after_convert=after)
