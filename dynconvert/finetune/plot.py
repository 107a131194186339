"""``--plot curves.png``: loss, val top-1, temperature and attention entropy per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DynconvertError
from ..files import atomic_output

PANELS = (
    ("train_loss", "train loss"),
    ("val_top1", "val top-1 (%)"),
    ("temperature", "temperature"),
    ("entropy", "attention entropy (nats)"),
)


_NO_MATPLOTLIB = "plot: matplotlib is not installed; pip install 'dynconvert[plot]'"


def _pyplot():
    try:
        import matplotlib  # optional dependency

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional dependency
    except ImportError:
        raise DynconvertError(_NO_MATPLOTLIB) from None
    return plt


def plot_formats() -> list[str]:
    """The file suffixes (without the dot) that ``savefig`` writes here."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase  # optional dependency
    except ImportError:
        raise DynconvertError(_NO_MATPLOTLIB) from None

    # pgf needs a LaTeX installation, which would only show when the first epoch ends.
    return sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})


def check_plot_path(path: str | Path) -> None:
    """Fail before training when matplotlib cannot write ``path``'s format (its suffix)."""
    path = Path(path)
    formats = plot_formats()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        what = f"the suffix .{suffix}" if suffix else "no suffix"
        raise DynconvertError(
            f"plot: {path} has {what}; give a file name ending in one of "
            f"{', '.join('.' + f for f in formats)} (e.g. curves.png)",
            usage=True,
        )


def plot_history(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Draw the curves and write them atomically to ``path`` (any matplotlib format)."""
    plt = _pyplot()
    check_plot_path(path)
    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        points = [
            (e, h[key]) for e, h in zip(epochs, history, strict=True) if h.get(key) is not None
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_output(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, dpi=100, format=path.suffix.lower().lstrip("."))
    finally:
        plt.close(fig)
