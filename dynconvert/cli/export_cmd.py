"""``dynconvert export model.pt --format pt2|onnx|torchscript --out FILE``.

MODEL_FILE is a file saved by dynconvert (``dynconvert MODEL --out model.pt`` or
:func:`dynconvert.save`); it is rebuilt with :func:`dynconvert.load` and exported with
:func:`dynconvert.export`: batch dimension dynamic, the file loaded back and checked at batch
sizes 1, 3 and 8 unless ``--no-verify``. ``--format`` may be left out when ``--out`` ends in
``.pt2``, ``.onnx`` or ``.ts``. A file that holds a custom (non-timm) model needs ``--model
package.module:function`` to build its architecture.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import DynconvertError
from ..export import export
from ..export.deps import check_available
from ..export.formats import FORMATS, format_for_suffix
from ..export.options import FORMAT_NAMES, ExportOptions
from ..io import check_outputs
from ..model_request import build_architecture, load_saved
from ..sources import check_model_path, full_input_size
from .options import dataclass_options
from .params import FilePath, architecture_option


def _format_name(format_name: str | None, out: Path) -> str:
    guessed = format_for_suffix(out)
    if format_name is not None:
        name = format_name.lower()
        if guessed is not None and guessed != name:
            # refused, not warned: the file would be opened as the format its suffix names
            raise DynconvertError(
                f"--format {name} does not match --out {out.name}, whose suffix names "
                f"{guessed}; give --out a {FORMATS[name].suffix} suffix or --format {guessed}",
                usage=True,
            )
        return name
    if guessed is None:
        raise DynconvertError(
            f"--format is needed: {out.name} does not end in .pt2, .onnx or .ts "
            f"(choose one of {', '.join(FORMAT_NAMES)})",
            usage=True,
        )
    return guessed


# The command's --format defaults to the --out suffix, not to the API's "pt2": its choices are
# the field's (FORMAT_NAMES), its default and help the command's own.
_FORMAT = click.option(
    "--format",
    "format",
    type=click.Choice(FORMAT_NAMES, case_sensitive=False),
    default=None,
    help="Output format (default: from the --out suffix, .pt2, .onnx or .ts).",
)
_OUT = click.option(
    "--out",
    type=FilePath(dir_okay=False, path_type=Path),
    required=True,
    help="File to write.",
)


@click.command("export")
@click.argument("model_file", type=FilePath(dir_okay=False, path_type=Path))
@dataclass_options(ExportOptions, skip=("format",), extra={"format": _FORMAT, "input_size": _OUT})
@architecture_option
def export_command(
    model_file: Path,
    format: str | None,
    out: Path,
    input_size: tuple[int, ...] | None,
    verify: bool,
    fold_bn: bool,
    opset: int,
    architecture: str | None,
) -> None:
    """Export the dynconvert file MODEL_FILE with a dynamic batch dimension, verified.

    \b
    dynconvert export model.pt --format onnx --out model.onnx
    dynconvert export model.pt --out model.pt2 --input-size 3,160,160 --fold-bn
    """
    name = _format_name(format, out)
    check_outputs({"--out": out}, {"MODEL_FILE": model_file})
    check_available(name, verify)  # before the model is built: a missing package is one line
    options = ExportOptions(format=name, verify=verify, fold_bn=fold_bn, opset=opset)  # checked
    check_model_path(model_file, "a dynconvert file")
    model = load_saved(model_file, build_architecture(architecture))
    result = export(model, out, options=options, input_size=full_input_size(input_size, model))
    folded = f"; folded {len(result.folded)} BatchNorms" if fold_bn else ""
    checked = (
        f"verified at batch sizes {', '.join(str(r['batch']) for r in result.rows)} "
        f"(max relative error {result.max_relative_error:.1e})"
        if verify
        else "not verified"
    )
    click.echo(f"wrote {out} ({name}, input {result.input_size}, dynamic batch{folded}; {checked})")
