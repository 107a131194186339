"""One writer and one reader per export format; every graph keeps the batch dimension dynamic.

* ``pt2``: a ``torch.export`` ExportedProgram with ``Dim("batch", min=1)`` on the input,
  written by ``torch.export.save`` and read by ``torch.export.load``.
* ``onnx``: the torch.export-based ONNX exporter (``torch.onnx.export(..., dynamo=True)``)
  with the same dynamic dimension, opset >= 18; read by onnxruntime.
* ``torchscript``: ``torch.jit.trace``. Scripting cannot compile the layers (properties,
  strategy registry); a trace records the shape arithmetic of ``view``/``reshape`` as graph
  ops, so with the layers' static path (no shape or ``groups`` that depends on the batch)
  the traced graph runs at any batch size. Verification at several batch sizes proves it.

Writers receive the model already in eval mode with every dynamic conv on its static path
(see :mod:`dynconvert.export.api`) and an example batch of at least 2: ``torch.export``
specialises a dimension whose example size is 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DynconvertError
from ..files import EXPORT_SUFFIXES, format_for_suffix  # noqa: F401  (re-exported)
from .deps import require

Runner = Callable[[torch.Tensor], list[torch.Tensor]]
MIN_OPSET = 18


def flat_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in flat_tensors(item)]
    raise TypeError(f"model output: expected tensors, got {type(output).__name__}")


def batch_dynamic_shapes() -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for one positional input whose dimension 0 is the batch."""
    return ({0: torch.export.Dim("batch", min=1)},)


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Hide TorchScript's deprecation notices and the tracer's generic warnings.

    Verification, not a warning, decides whether the traced graph is right.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


# -- pt2 -------------------------------------------------------------------------------------


def _write_pt2(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=batch_dynamic_shapes())
    torch.export.save(program, path)


def _load_pt2(path: Path, device: torch.device) -> Runner:
    module = torch.export.load(path).module()
    return lambda x: flat_tensors(module(x))


# -- onnx ------------------------------------------------------------------------------------


def max_onnx_opset() -> int | None:
    """The newest opset the installed onnx knows, or None without onnx.

    The exporter writes opset 18 and converts it to the requested one (onnxscript's converter,
    falling back to onnx's); above onnx's newest opset the conversion fails, and the exporter
    then writes opset 18 anyway, with a traceback on stderr and no error.
    """
    try:
        import onnx  # optional dependency
    except ImportError:
        return None
    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: Any) -> None:
    """An ONNX opset the exporter can write: >= MIN_OPSET and known to the installed onnx."""
    highest = max_onnx_opset()
    too_low = isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET
    if too_low or (highest is not None and opset > highest):
        allowed = f"{MIN_OPSET} to {highest}" if highest is not None else f">= {MIN_OPSET}"
        raise DynconvertError(
            f"opset {opset!r}: the torch.export-based ONNX exporter with the installed onnx "
            f"writes opsets {allowed}",
            usage=True,
        )


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    require("onnx", "onnxscript", purpose="ONNX export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # exporter chatter on deprecated paths
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=batch_dynamic_shapes(),
            opset_version=opset,
            verbose=False,
        )
    # One self-contained file (the 2 GB protobuf limit applies), so that renaming it is atomic.
    program.save(path, external_data=False)


def _load_onnx(path: Path, device: torch.device) -> Runner:
    (ort,) = require("onnxruntime", purpose="verifying an ONNX export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        outputs = session.run(None, {name: x.detach().cpu().numpy()})
        return [torch.from_numpy(o) for o in outputs]

    return run


# -- torchscript -----------------------------------------------------------------------------


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    # check_trace reruns the same batch size, which proves nothing about a dynamic batch.
    with _quiet_tracing():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path))


def _load_torchscript(path: Path, device: torch.device) -> Runner:
    with _quiet_tracing():
        module = torch.jit.load(str(path), map_location=device)
    return lambda x: flat_tensors(module(x))


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str
    description: str
    write: Callable[[nn.Module, torch.Tensor, Path, int], None]
    load: Callable[[Path, torch.device], Runner]


FORMATS: dict[str, ExportFormat] = {
    "pt2": ExportFormat("pt2", EXPORT_SUFFIXES["pt2"], "torch.export ExportedProgram",
                        _write_pt2, _load_pt2),
    "onnx": ExportFormat("onnx", EXPORT_SUFFIXES["onnx"], "ONNX (torch.export-based exporter)",
                         _write_onnx, _load_onnx),
    "torchscript": ExportFormat("torchscript", EXPORT_SUFFIXES["torchscript"],
                                "TorchScript (torch.jit.trace)", _write_torchscript,
                                _load_torchscript),
}  # fmt: skip
