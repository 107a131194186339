"""The options of one export, written once: the single source of their names, defaults, types,
choices and help.

:func:`dynconvert.export` takes them as keywords (its signature is built from the fields) and
``dynconvert export`` makes its flags from them (``dynconvert.cli.options``), so a new export
option is one field here plus the code that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DynconvertError
from ..option_fields import option
from .formats import FORMATS, MIN_OPSET, check_opset

FORMAT_NAMES = tuple(FORMATS)
DEFAULT_BATCH_SIZES = (1, 3, 8)


def _positive_ints(values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`dynconvert.export` writes and checks a file.

    * ``format``: ``"pt2"`` (``torch.export``), ``"onnx"`` (the torch.export-based exporter)
      or ``"torchscript"`` (``torch.jit.trace``); any case.
    * ``input_size``: one sample's shape, e.g. ``(3, 224, 224)``; ``None``: from
      ``example_input``, else timm's data config. Checked with the model, not here.
    * ``verify``: load the file back and compare it with the model at each of
      ``batch_sizes``; ``show`` prints that table.
    * ``fold_bn``: fold each BatchNorm that directly follows a dynamic conv into its kernels.
    * ``opset``: the ONNX opset (``onnx`` only).
    * ``example_input``: a batch to record the graph with (Python only).

    Validation (format, batch sizes, opset) happens here, before any model is touched.
    """

    format: str = option("pt2", "Output format.", choices=FORMAT_NAMES, recipe=None)
    input_size: tuple[int, ...] | None = option(
        None, "One sample's shape (default: the timm model's data config).", value="shape",
        recipe=None,
    )  # fmt: skip
    verify: bool = option(
        True,
        "Load the file back and compare it with PyTorch at batch sizes 1, 3 and 8.",
        recipe=None,
    )
    fold_bn: bool = option(
        False,
        "Fold each BatchNorm that directly follows a dynamic conv into its kernels.",
        flag="--fold-bn",
        recipe=None,
    )
    opset: int = option(
        MIN_OPSET,
        "ONNX opset version (at most the installed onnx's newest).",
        minimum=MIN_OPSET,
        recipe=None,
    )
    batch_sizes: tuple[int, ...] = option(DEFAULT_BATCH_SIZES, cli=False, recipe=None)
    example_input: Any = option(None, cli=False, recipe=None)
    show: bool = option(True, cli=False, recipe=None)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through the back door, once
        name = str(self.format).lower()
        if name not in FORMATS:
            raise DynconvertError(
                f"unsupported export format {self.format!r}; choose one of {', '.join(FORMATS)}",
                usage=True,
            )
        set_(self, "format", name)
        sizes = tuple(self.batch_sizes)
        if not sizes or not _positive_ints(sizes):
            raise DynconvertError(
                f"batch_sizes: expected positive ints, got {self.batch_sizes!r}", usage=True
            )
        set_(self, "batch_sizes", sizes)
        if name == "onnx":
            check_opset(self.opset)
