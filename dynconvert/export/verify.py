"""Load an exported file back and compare it with the PyTorch model at several batch sizes.

The reference is the PyTorch model in eval mode, run as the user runs it (its own strategy,
not the export path), on seeded random inputs of each batch size. A batch passes when
``max |exported - reference| <= TOLERANCE * max |reference|`` over every output tensor
(float16/bfloat16 models: against a float32 copy, with room for their own rounding). An
exported graph that baked the export batch size in (a batch-folded grouped conv, a reshape to
a constant batch) fails or errors at the other sizes, and that is reported, not raised, here:
:func:`failures` says which rows failed and the caller decides.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ..errors import first_line
from .formats import Runner, flat_tensors

TOLERANCE = 1e-4
COLUMNS = ("format", "batch", "max_abs_error", "max_abs_output", "relative_error", "ok", "error",
           "allowed_error")  # fmt: skip


def random_batch(
    input_size: Sequence[int], batch: int, like: torch.Tensor, seed: int
) -> torch.Tensor:
    """A seeded standard-normal batch with the dtype and device of ``like``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *input_size), generator=generator, dtype=torch.float64)
    return x.to(like.device, like.dtype)


def compare(
    outputs: list[torch.Tensor], reference: list[torch.Tensor]
) -> tuple[float, float, str | None]:
    """(max abs error, max abs reference) over all outputs, or a reason they cannot be compared."""
    if len(outputs) != len(reference):
        return math.nan, math.nan, f"{len(outputs)} outputs, expected {len(reference)}"
    error, scale = 0.0, 0.0
    for out, ref in zip(outputs, reference, strict=True):
        if tuple(out.shape) != tuple(ref.shape):
            shapes = f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
            return math.nan, math.nan, shapes
        out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
        # max() would drop a NaN error (max(0.0, nan) is 0.0), so non-finite values fail here.
        for values, whose in ((ref, "the model's own output"), (out, "the exported output")):
            bad = values.numel() - int(torch.isfinite(values).sum())
            if bad:
                return math.nan, math.nan, f"{bad} non-finite values in {whose}"
        error = max(error, (out - ref).abs().max().item() if ref.numel() else 0.0)
        scale = max(scale, ref.abs().max().item() if ref.numel() else 0.0)
    return error, scale, None


#: Low-precision models are checked against a float32 copy: the file may be off by this many
#: times the model's own error in its dtype (different op orders round differently).
LOW_PRECISION_FACTOR = 4.0
LOW_PRECISION = (torch.float16, torch.bfloat16)


def verify(
    format_name: str,
    runner: Runner,
    reference_model: nn.Module,
    input_size: Sequence[int],
    batch_sizes: Iterable[int],
    like: torch.Tensor,
    *,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per batch size: the exported file's error against ``reference_model``.

    ``reference_model`` must already be in eval mode. ``like`` gives the dtype and device of
    the inputs. A float16 or bfloat16 model is compared with a float32 copy of itself, and
    the file passes when its error is at most ``LOW_PRECISION_FACTOR`` times the model's own
    (plus ``TOLERANCE``): a fixed 1e-4 is below what those dtypes can hold.
    """
    low = like.dtype in LOW_PRECISION
    exact = copy.deepcopy(reference_model).float() if low else None
    rows = []
    for batch in batch_sizes:
        x = random_batch(input_size, batch, like, seed + batch)
        with torch.no_grad():
            reference = flat_tensors(reference_model(x))
            own_error = 0.0
            if exact is not None:
                precise = flat_tensors(exact(x.float()))
                own_error, _, _ = compare(reference, precise)
                reference = precise
        row: dict[str, Any] = {"format": format_name, "batch": batch}
        try:
            with torch.no_grad():
                outputs = runner(x)
            error, scale, problem = compare(outputs, reference)
        except Exception as exc:  # the exported graph cannot run at this batch size
            error, scale, problem = math.nan, math.nan, first_line(exc, limit=160)
        relative = error / scale if scale > 0 else (0.0 if error == 0 else math.inf)
        allowed = TOLERANCE * scale + LOW_PRECISION_FACTOR * own_error
        ok = problem is None and error <= allowed
        row.update(
            max_abs_error=error,
            max_abs_output=scale,
            relative_error=relative,
            ok=ok,
            error=problem,
            allowed_error=allowed,
        )
        rows.append(row)
    return rows


def failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if not row["ok"]]


def failure_message(rows: list[dict[str, Any]]) -> str:
    """One line naming the batch sizes that failed and why."""
    parts = []
    for row in failures(rows):
        if row["error"]:
            parts.append(f"batch {row['batch']}: {row['error']}")
        else:
            parts.append(
                f"batch {row['batch']}: max error {row['max_abs_error']:.3g} > allowed "
                f"{row['allowed_error']:.3g} (max |output| {row['max_abs_output']:.3g})"
            )
    return "; ".join(parts)


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2e}"


def table(rows: list[dict[str, Any]], title: str | None = None):
    """The rows as a rich table (batch, errors, result)."""
    view = Table(title=title)
    for name, justify in (("format", "left"), ("batch", "right"), ("max |error|", "right"),
                          ("max |output|", "right"), ("relative", "right"),
                          ("result", "left")):  # fmt: skip
        view.add_column(name, justify=justify)
    for row in rows:
        result = "[green]ok[/green]" if row["ok"] else f"[red]FAIL[/red] {row['error'] or ''}"
        view.add_row(
            row["format"],
            str(row["batch"]),
            _number(row["max_abs_error"]),
            _number(row["max_abs_output"]),
            _number(row["relative_error"]),
            result.strip(),
        )
    return view
