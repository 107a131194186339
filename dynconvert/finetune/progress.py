"""What the user sees while a run goes: rich progress bars and the final tables (rank 0 only)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class TrainProgress:
    """One bar for the whole run and one per epoch; the epoch bar shows loss, top-1, img/s."""

    def __init__(
        self,
        enabled: bool,
        total_iterations: int,
        *,
        messages: bool = True,
        console: Console | None = None,
    ):
        self.console = console or default_console()
        self.enabled, self.messages = enabled, messages
        self._progress: Progress | None = None
        self._overall = self._epoch = None
        self.total = total_iterations

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.__enter__()
            self._overall = self._progress.add_task("overall", total=self.total, stats="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int, overall_done: int):
        if self._progress is None:
            return
        if self._epoch is not None:
            self._progress.remove_task(self._epoch)
        self._epoch = self._progress.add_task(
            f"epoch {epoch + 1}/{epochs}", total=total, completed=done, stats=""
        )
        self._progress.update(self._overall, completed=overall_done)

    def step(self, loss: float, top1: float, images_per_s: float) -> None:
        if self._progress is None:
            return
        stats = f"loss {loss:.4f}  top-1 {top1:5.1f}%  {images_per_s:,.0f} img/s"
        self._progress.update(self._epoch, advance=1, stats=stats)
        self._progress.update(self._overall, advance=1)

    def log(self, message: Any) -> None:
        """Messages and tables: shown with or without the bars (``verbose``), on rank 0."""
        if self.messages:
            self.console.print(message, highlight=False, soft_wrap=isinstance(message, str))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}%"


def results_table(
    original: float | None,
    before: float | None,
    after: float | None,
    uniform: float | None = None,
) -> Table:
    """``uniform``: the fine-tuned model with its routers forced uniform (mean kernels)."""
    table = Table(title="validation top-1")
    table.add_column("model")
    table.add_column("val top-1", justify="right")
    table.add_row("original", _pct(original))
    table.add_row("converted, before fine-tuning", _pct(before))
    table.add_row("after fine-tuning", _pct(after))
    if uniform is not None:
        table.add_row("  the same, routers uniform (mean kernels)", _pct(uniform))
    return table


def health_table(summary: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="attention health (validation)")
    table.add_column("layer")
    table.add_column("entropy / max", justify="right")
    table.add_column("kernel shares", justify="right")
    table.add_column("status")
    for name, v in summary.items():
        shares = " ".join(f"{s:.2f}" for s in v["shares"])
        status = (
            f"[yellow]unused: {', '.join(map(str, v['unused']))}[/yellow]" if v["unused"] else "ok"
        )
        table.add_row(name, f"{v['entropy']:.3f} / {v['max_entropy']:.3f}", shares, status)
    return table


def default_console() -> Console:
    return Console(stderr=True, force_terminal=None if sys.stderr.isatty() else False)
