"""``--plot curves.png``: loss, val top-1, temperature and attention entropy per epoch."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DynconvertError

PANELS = (
    ("train_loss", "train loss"),
    ("val_top1", "val top-1 (%)"),
    ("temperature", "temperature"),
    ("entropy", "attention entropy (nats)"),
)


def plot_history(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Draw the curves and write them atomically to ``path`` (any matplotlib format)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DynconvertError(
            "plot: matplotlib is not installed; pip install 'dynconvert[plot]'"
        ) from None
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
