"""``dynconvert.export``: write a converted model as pt2, ONNX or TorchScript, and prove it.

The graph is recorded with every dynamic conv on its static path (one conv with the K kernels
stacked on the output axis, then the attention-weighted sum: no shape depends on the batch)
and the batch dimension dynamic. The file is written to a temporary name in the target folder,
loaded back and compared with the PyTorch model at several batch sizes (``verify.py``); only
a file that passes is renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from timm.data import resolve_data_config
from torch import nn

from ..errors import DynconvertError, first_line
from ..io import atomic_output, check_free_space, check_output_path
from ..option_fields import keyword_signature, refuse_unknown_keywords
from . import export_state
from .deps import check_available
from .fold_bn import FoldedPair
from .fold_bn import fold_bn as fold_batchnorms
from .formats import FORMATS
from .options import ExportOptions
from .verify import failure_message, random_batch, table
from .verify import verify as verify_file

EXAMPLE_BATCH = 2  # torch.export specialises a dimension whose example size is 1


@dataclass
class ExportResult:
    """What :func:`export` wrote and how it checked it.

    ``rows``: one dict per verified batch size (``format``, ``batch``, ``max_abs_error``,
    ``max_abs_output``, ``relative_error``, ``ok``, ``error``, ``allowed_error``); empty with
    ``verify=False``.
    """

    path: Path
    format: str
    input_size: tuple[int, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)
    folded: list[FoldedPair] = field(default_factory=list)
    export_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return bool(self.rows) and all(row["ok"] for row in self.rows)

    @property
    def max_relative_error(self) -> float:
        return max((row["relative_error"] for row in self.rows), default=math.nan)


def _reference_tensor(model: nn.Module) -> torch.Tensor:
    """A tensor with the model's float dtype and device (for building inputs)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return torch.empty(0)


def resolve_input_size(
    model: nn.Module, input_size: Sequence[int] | None, example_input: torch.Tensor | None
) -> tuple[int, ...]:
    """The shape of one sample: from ``example_input``, ``input_size`` or timm's data config."""
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input: expected a tensor, got {type(example_input).__name__}")
        if example_input.dim() < 2:
            raise DynconvertError(
                "example_input: expected a batch (batch dimension first), got shape "
                f"{tuple(example_input.shape)}",
                usage=True,
            )
        return tuple(example_input.shape[1:])
    if input_size is not None:
        size = tuple(input_size)
        if not size or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                for s in size):  # fmt: skip
            raise DynconvertError(
                f"input_size: expected positive ints, one sample's shape such as (3, 224, 224), "
                f"got {input_size!r}",
                usage=True,
            )
        return size
    if getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None):
        return tuple(int(s) for s in resolve_data_config({}, model=model)["input_size"])
    raise DynconvertError(
        f"the input size of {type(model).__name__} is not known (it has no timm data config); "
        "pass input_size=(C, H, W) or example_input=, or --input-size C,H,W",
        usage=True,
    )


def _example(
    input_size: tuple[int, ...], example_input: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    if example_input is None:
        return random_batch(input_size, EXAMPLE_BATCH, like, seed=12345)
    example = example_input.detach()
    if example.shape[0] < EXAMPLE_BATCH:
        example = example.repeat(EXAMPLE_BATCH, *(1,) * (example.dim() - 1))[:EXAMPLE_BATCH]
    return example


def _probe(model: nn.Module, example: torch.Tensor, input_size: tuple[int, ...]) -> None:
    """One eval-mode forward, so that a wrong input size is one clear error, before any export."""
    try:
        with (
            export_state.eval_mode(model),
            export_state.any_batch_size(model),
            export_state.fixed_strategy_choice(),
            torch.no_grad(),
        ):
            model(example)
    except Exception as exc:
        raise DynconvertError(
            f"{type(model).__name__} cannot take inputs of size {input_size} "
            f"({first_line(exc)}); give the size it expects with input_size= or --input-size",
            usage=True,
        ) from exc


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, each shared tensor once."""
    seen = {}
    for tensor in model.state_dict(keep_vars=True).values():
        seen.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
    return sum(seen.values())


def _options_from(keywords: dict[str, Any], options: ExportOptions | None) -> ExportOptions:
    """The :class:`ExportOptions` of one call: ``options=``, or the keywords."""
    refuse_unknown_keywords("export", ExportOptions, keywords)
    if options is None:
        return ExportOptions(**keywords)
    if not isinstance(options, ExportOptions):
        raise TypeError(f"options: expected an ExportOptions, got {type(options).__name__}")
    return dataclasses.replace(options, **keywords)


def _show(rows: list[dict[str, Any]], title: str) -> None:
    Console().print(table(rows, title=title))


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    options: ExportOptions | None = None,
    **keywords: Any,
) -> ExportResult:
    """Export ``model`` (converted by :func:`dynconvert.convert`) to ``path`` with a dynamic batch.

    The keyword options are the fields of :class:`~dynconvert.export.options.ExportOptions`,
    their one source of names, defaults and help (``options=`` passes them as one value;
    keywords given beside it replace its fields):

    ``format``: ``"pt2"`` (``torch.export``), ``"onnx"`` (torch.export-based exporter,
    ``opset`` >= 18) or ``"torchscript"`` (``torch.jit.trace``). The sample shape comes from
    ``example_input`` (a batch), else ``input_size`` (e.g. ``(3, 224, 224)``), else timm's data
    config. ``fold_bn`` folds each BatchNorm that directly follows a dynamic conv into its
    kernels (on a copy; ``model`` is not changed).

    With ``verify`` (the default) the written file is loaded back (``torch.export.load``,
    onnxruntime, ``torch.jit.load``) and compared with ``model`` in eval mode on random inputs
    of each of ``batch_sizes``; a max abs error above 1e-4 × max |output| raises
    :class:`DynconvertError` and nothing is written. ``show`` prints the table. The model's
    training flags and layer strategies are restored afterwards.

    Why ``**keywords`` and not one keyword per option: as :func:`dynconvert.convert` does, the
    signature is built from the fields (``help(export)`` shows each with its default), so a new
    option is one field, with no default written a second time here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")

    if format is not None:
        keywords["format"] = format
    options = _options_from(keywords, options)
    name, sizes, example_input = options.format, options.batch_sizes, options.example_input
    fmt = FORMATS[name]
    path = Path(path)
    check_output_path(path)
    check_available(name, options.verify)

    like = _reference_tensor(model)
    if name == "onnx" and options.verify and like.dtype == torch.bfloat16:
        raise DynconvertError(
            "an ONNX file of a bfloat16 model cannot be checked: onnxruntime has no bfloat16 "
            "Conv; export a float32 copy (model.float()) to ONNX, or this model to pt2",
            usage=True,
        )
    size = resolve_input_size(model, options.input_size, example_input)
    example = _example(size, example_input, like)
    _probe(model, example, size)

    target, folded = model, []
    if options.fold_bn:
        target = copy.deepcopy(model)
        with export_state.eval_mode(target):
            folded = fold_batchnorms(target)

    # The exporters abort the whole process on a full disk, so refuse up front.
    check_free_space(path, _weight_bytes(target), f"the {name} file (its weights alone)")
    result = ExportResult(path=path, format=name, input_size=size, folded=folded)
    with atomic_output(path, suffix=path.suffix) as tmp:
        start = time.perf_counter()
        try:
            with export_state.eval_mode(target), export_state.static_strategy(target):
                fmt.write(target, example, tmp, options.opset)
        except DynconvertError:
            raise
        except Exception as exc:
            raise DynconvertError(
                f"{name} export of {type(model).__name__} failed: {first_line(exc)} "
                "(rerun with --debug for the traceback)"
            ) from exc
        result.export_seconds = time.perf_counter() - start

        if options.verify:
            start = time.perf_counter()
            try:
                runner = fmt.load(tmp, like.device)
            except Exception as exc:
                raise DynconvertError(
                    f"the {name} file of {type(model).__name__} was written but cannot be "
                    f"loaded back ({first_line(exc)}), so {path} was not written"
                ) from exc
            with (
                export_state.eval_mode(model),
                export_state.any_batch_size(model),
                export_state.fixed_strategy_choice(),
            ):
                result.rows = verify_file(name, runner, model, size, sizes, like)
            result.verify_seconds = time.perf_counter() - start
            if options.show:
                _show(result.rows, f"{path.name}: {fmt.description}, input {size}")
            if not result.verified:
                raise DynconvertError(
                    f"{name} export of {type(model).__name__} failed verification, so {path} "
                    f"was not written: {failure_message(result.rows)}"
                )
    return result


_HEAD = [
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=nn.Module),
    inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD),
]
export.__signature__ = keyword_signature(
    ExportOptions, _HEAD, positional=("format",), tail=("options",)
)
