"""``dynconvert MODEL --k 4 --out model.pt``: convert a model and save it.

MODEL is a timm name, ``package.module:function`` building your own model, or a file saved by
dynconvert (see ``dynconvert.model_request``, which builds or loads it). A timm model is built
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

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import timm
from click.core import ParameterSource
from torch import nn

from ..convert.config import ConvertConfig
from ..errors import DynconvertError
from ..io import check_outputs, read, save
from ..model_request import CONVERSION_OPTIONS, ModelRequest, Prepared, apply_recipe, prepare_model
from ..ranks import is_main_process
from ..recipes import load_recipe
from ..sources import is_saved_file, is_user_function
from .finetune_cmd import finetune_step, pipeline_options, pop_pipeline_flags
from .options import dataclass_options
from .params import FilePath, architecture_option, json_option

AfterConvert = Callable[[nn.Module, Any], nn.Module]


#: The options of :func:`dynconvert.convert`, shared by ``convert`` and ``inspect``.
conversion_options = dataclass_options(ConvertConfig)


def explicit_options(ctx: click.Context, names: tuple[str, ...] | list[str]) -> set[str]:
    """Which of ``names`` were given on the command line (not defaults)."""
    return {name for name in names if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}


def show_report(report: Any, json_path: Path | None) -> None:
    report.print()
    if json_path is not None:
        report.to_json(json_path)
        click.echo(f"wrote the report to {json_path}")


def write_outputs(prepared: Prepared, out: Path | None, json_path: Path | None) -> None:
    """Print the report, write ``--json``, and save the model to ``--out`` (if given)."""
    if not is_main_process():  # under torchrun every rank converts; rank 0 alone writes
        return
    show_report(prepared.report, json_path)
    if out is None:
        click.echo("dry run: the model was not written")
        return
    save(prepared.model, out, report=prepared.report)
    size_mb = out.stat().st_size / 2**20
    custom = read(out, map_location="meta")["source"].get("kind") != "timm"
    how = f"dynconvert.load({str(out)!r}{', model=<your architecture>' if custom else ''})"
    click.echo(f"saved {out} ({size_mb:.1f} MiB); load it with {how}")


def refuse_mistyped_command(ctx: click.Context, word: str, commands: list[str]) -> None:
    """``inspct`` is a typo of ``inspect``, not a MODEL to convert (unless it is one)."""
    close = difflib.get_close_matches(word.lower(), commands, n=1, cutoff=0.75)
    if not close or is_saved_file(word) or is_user_function(word):  # finetuned.pt is a MODEL
        return
    if not timm.is_model(word):
        ctx.fail(f"unknown command {word!r}; did you mean {close[0]!r}?")


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
@json_option("Also write the report as JSON to this file.")
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
            notes = apply_recipe(request, load_recipe(train_flags["recipe"]))
            for note in notes if is_main_process() else ():
                click.echo(note, err=True)
    after = None
    if train_flags is not None:
        outputs = {"--json": json_path}
        after = finetune_step(train_flags, None if dry_run else out, input_files(request), outputs)
    run_convert(request, out=None if dry_run else out, json_path=json_path, after_convert=after)
