"""What :func:`dynconvert.finetune` returns."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`dynconvert.finetune` returns; ``model`` is the caller's model, trained."""

    model: nn.Module
    history: list[dict[str, Any]]
    val_top1_original: float | None
    val_top1_before: float | None
    val_top1_after: float | None
    health: dict[str, dict[str, Any]]
    classes: list[str] | None
    checkpoint: str | None
    #: ``val_top1_after`` with every router forced uniform: what the attention adds.
    val_top1_uniform: float | None = None
