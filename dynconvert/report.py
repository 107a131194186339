"""What a conversion did: one row per convolution, a totals row with the ratios, and notes.

Shown as a rich table (:meth:`ConversionReport.print`) and written as JSON
(:meth:`ConversionReport.to_dict`, :meth:`ConversionReport.to_json`). MACs are per sample at
the input size in :attr:`ConversionReport.input_size` and include the router and the kernel
aggregation of the dynamic convs (see ``dynconvert.convert.costs``); they are ``None`` where
shapes are unknown.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import DynconvertError
from .files import atomic_write_text

FORMAT = "dynconvert.report/1"


@dataclass
class ConvRow:
    """One convolution found in the model (a module, possibly under several names, or a call)."""

    name: str
    type: str
    status: str  # "converted" or "skipped"
    reason: str | None
    in_channels: int | None
    out_channels: int | None
    kernel_size: list[int] | None
    stride: list[int] | None
    groups: int | None
    params_before: int | None
    params_after: int | None
    macs_before: int | None = None
    macs_after: int | None = None
    calls: int | None = None
    kind: str = "module"
    aliases: list[str] = field(default_factory=list)
    input_shapes: list[list[int]] = field(default_factory=list)

    @property
    def converted(self) -> bool:
        return self.status == "converted"


def _sum(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(values)


def _ratio(after: int | None, before: int | None) -> float | None:
    if after is None or not before:
        return None
    return after / before


def human(n: int | None) -> str:
    """``1234567`` → ``1.23M``; ``None`` → ``?``."""
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _tuple_text(value: list[int] | None) -> str:
    if value is None:
        return "?"
    return str(value[0]) if len(set(value)) == 1 else "×".join(map(str, value))


@dataclass
class ConversionReport:
    """The result of :func:`dynconvert.convert`: rows, totals, notes and the options used."""

    rows: list[ConvRow]
    notes: list[str] = field(default_factory=list)
    model: str = ""
    input_size: list[int] | None = None
    traced: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    model_params_before: int | None = None
    model_params_after: int | None = None

    @property
    def converted_names(self) -> list[str]:
        """Qualified names of the converted modules (what ``swap_named`` takes)."""
        return [r.name for r in self.rows if r.converted and r.kind == "module"]

    @property
    def totals(self) -> dict[str, Any]:
        """Sums over the conv rows (MACs ``None`` if any is unknown), and the model's params."""
        params_before = _sum([r.params_before for r in self.rows])
        params_after = _sum([r.params_after for r in self.rows])
        macs_before = _sum([r.macs_before for r in self.rows])
        macs_after = _sum([r.macs_after for r in self.rows])
        return {
            "convs": len(self.rows),
            "converted": sum(r.converted for r in self.rows),
            "skipped": sum(not r.converted for r in self.rows),
            "params_before": params_before,
            "params_after": params_after,
            "params_ratio": _ratio(params_after, params_before),
            "macs_before": macs_before,
            "macs_after": macs_after,
            "macs_ratio": _ratio(macs_after, macs_before),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_params_ratio": _ratio(self.model_params_after, self.model_params_before),
        }

    def skip_reasons(self) -> dict[str, int]:
        """Reason → number of convs skipped for it, most frequent first."""
        counts: dict[str, int] = {}
        for row in self.rows:
            if not row.converted:
                counts[row.reason or "?"] = counts.get(row.reason or "?", 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (plain python types only)."""
        return {
            "format": FORMAT,
            "model": self.model,
            "input_size": self.input_size,
            "traced": self.traced,
            "config": self.config,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "totals": self.totals,
            "notes": list(self.notes),
            "rows": [asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionReport:
        if data.get("format") != FORMAT:
            raise ValueError(f"report: expected format {FORMAT!r}, got {data.get('format')!r}")
        row_fields = {f.name for f in fields(ConvRow)}
        rows = [ConvRow(**{k: v for k, v in r.items() if k in row_fields}) for r in data["rows"]]
        return cls(
            rows=rows,
            notes=list(data.get("notes", [])),
            model=data.get("model", ""),
            input_size=data.get("input_size"),
            traced=bool(data.get("traced", False)),
            config=dict(data.get("config", {})),
            model_params_before=data.get("model_params_before"),
            model_params_after=data.get("model_params_after"),
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON via a temporary file in the target folder, renamed."""
        path = Path(path)
        folder = path.parent
        if not folder.is_dir():
            raise DynconvertError(f"cannot write {path}: folder {folder} does not exist")
        atomic_write_text(json.dumps(self.to_dict(), indent=2) + "\n", path)
        return path

    # -- display ------------------------------------------------------------------------

    def table(self):
        """The rich ``Table``: one row per conv and a totals row with the ratios."""
        totals = self.totals
        size = "×".join(map(str, self.input_size)) if self.input_size else "unknown size"
        table = Table(
            title=f"{self.model or 'model'}: "
            f"{totals['converted']}/{totals['convs']} convs converted",
            caption=f"params and MACs per sample at input {size}",
            show_footer=True,
        )

        def arrow(before: int | None, after: int | None, ratio: float | None = None) -> str:
            if before == after:
                return human(before)
            text = f"{human(before)} → {human(after)}"
            return f"{text} (×{ratio:.2f})" if ratio is not None else text

        footer_status = f"{totals['converted']} converted, {totals['skipped']} skipped"
        table.add_column("conv", footer="total", overflow="fold")
        table.add_column("type")
        table.add_column("in→out", justify="right")
        table.add_column("k/s/g", justify="right")
        table.add_column("status", footer=footer_status, overflow="fold")
        table.add_column(
            "params",
            justify="right",
            footer=arrow(totals["params_before"], totals["params_after"], totals["params_ratio"]),
        )
        table.add_column(
            "MACs",
            justify="right",
            footer=arrow(totals["macs_before"], totals["macs_after"], totals["macs_ratio"]),
        )
        for row in self.rows:
            name = row.name + (f" (×{row.calls} calls)" if row.calls and row.calls > 1 else "")
            if row.aliases:
                name += f" = {', '.join(row.aliases)}"
            status = (
                "[green]converted[/]"
                if row.converted
                else f"[yellow]skipped[/]: {escape(row.reason or '?')}"
            )
            table.add_row(
                name,
                row.type,
                f"{human(row.in_channels)}→{human(row.out_channels)}",
                f"{_tuple_text(row.kernel_size)}/{_tuple_text(row.stride)}/{human(row.groups)}",
                status,
                arrow(row.params_before, row.params_after),
                arrow(row.macs_before, row.macs_after),
            )
        return table

    def print(self, console=None) -> None:
        """Print the table, the model's parameter totals and the notes."""
        console = console or Console()
        console.print(self.table())
        totals = self.totals
        if totals["model_params_before"] is not None:
            ratio = totals["model_params_ratio"]
            console.print(
                f"model params: {human(totals['model_params_before'])} → "
                f"{human(totals['model_params_after'])}"
                + (f" (×{ratio:.2f})" if ratio is not None else "")
            )
        for note in self.notes:
            console.print(f"note: {note}", markup=False, highlight=False)
