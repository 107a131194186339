"""``dynconvert inspect MODEL_OR_FILE``: show the conversion table; nothing is written.

For a timm name the model is built with random weights (they do not change the table) and
converted in memory with the given options. For a file saved by dynconvert the report stored
in it is shown, with where the model came from; the file is read safely (weights only) and no
model is built. ``--json FILE`` writes the same report as JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import DynconvertError
from ..io import CONVERSION_ATTR, check_outputs, read
from ..model_request import (
    CONVERSION_OPTIONS,
    ModelRequest,
    build_architecture,
    load_saved,
    prepare_model,
)
from ..report import ConversionReport
from ..sources import check_model_argument, check_model_path, is_saved_file
from .convert_cmd import conversion_options, explicit_options, show_report
from .params import architecture_option, json_option


def _describe_file(data: dict[str, Any]) -> str:
    source = data["source"]
    if source.get("kind") == "timm":
        kwargs = source.get("kwargs") or {}
        origin = f"timm {source.get('name')}" + (f" {kwargs}" if kwargs else "")
    else:
        origin = f"custom model {source.get('class', '?')} (load it with --model or model=)"
    versions = data.get("versions") or {}
    made_with = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    config = data["config"]
    return (
        f"{origin}; k={config.get('k')}, ratio={config.get('ratio')}, "
        f"{len(data['converted'])} dynamic convs; saved with {made_with or 'unknown versions'}"
    )


def _file_report(path: Path, architecture: str | None):
    data = read(path)
    stored = data.get("report")
    if not isinstance(stored, dict):  # an older or foreign writer: rebuild to list the layers
        stored = getattr(load_saved(path, build_architecture(architecture)), CONVERSION_ATTR)
        stored = stored["report"]
    click.echo(f"{path}: {_describe_file(data)}")
    try:
        return ConversionReport.from_dict(stored)
    except (KeyError, TypeError, ValueError) as exc:
        raise DynconvertError(f"{path}: the stored report cannot be read ({exc})") from exc


@click.command("inspect")
@click.argument("model", metavar="MODEL_OR_FILE")
@json_option("Also write the report as JSON to this file.")
@architecture_option
@conversion_options
@click.pass_context
def inspect_command(
    ctx: click.Context,
    model: str,
    json_path: Path | None,
    architecture: str | None,
    **options: Any,
) -> None:
    """Show which convs of MODEL_OR_FILE are (or would be) converted, without writing a model.

    \b
    dynconvert inspect resnet50 --k 4 --exclude 'layer4.*'
    dynconvert inspect model.pt
    """
    check_model_argument(model)
    saved = Path(model) if is_saved_file(model) else None
    check_outputs({"--json": json_path}, {"MODEL": saved})
    explicit = explicit_options(ctx, CONVERSION_OPTIONS)
    if is_saved_file(model) and not explicit:
        path = Path(model)
        check_model_path(path)
        report = _file_report(path, architecture)
    else:
        request = ModelRequest(
            model=model, options=options, explicit=explicit, architecture=architecture
        )
        report = prepare_model(request).report  # refuses conversion options for a file
    show_report(report, json_path)
