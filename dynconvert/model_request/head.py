"""A new classifier head that the saved file remembers."""

from __future__ import annotations

import copy

from torch import nn

from ..finetune import reset_head
from ..sources import SOURCE_ATTR, model_source


def reset_recorded_head(model: nn.Module, num_classes: int, seed: int = 0) -> None:
    """:func:`dynconvert.finetune.reset_head`, and a timm model's recorded source updated so
    that the saved file rebuilds the new head."""
    source = model_source(model)
    reset_head(model, num_classes, seed=seed)
    if source.get("kind") == "timm":
        source = copy.deepcopy(source)
        source.setdefault("kwargs", {})["num_classes"] = num_classes
        object.__setattr__(model, SOURCE_ATTR, source)
