"""The per-sample input size a model is converted, probed or exported at."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DynconvertError, first_line
from ..modes import training_mode


def full_input_size(size: tuple[int, ...] | None, model: nn.Module) -> tuple[int, ...] | None:
    """``(C, N, N)`` for ``(N,)``, C from the timm model's config (3 without one)."""
    if size is None or len(size) != 1:
        return size
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels = (cfg.get("input_size") or (3,))[0]
    return (channels, size[0], size[0])


def probe_input_size(model: nn.Module, size: tuple[int, ...], name: str) -> None:
    """One forward at the size the user gave, before converting: ``convert`` only notes a
    failed probe (and goes on without shapes and MACs), which would save a model whose report
    is about an input it cannot take."""
    like = next(model.parameters(), None)
    example = torch.zeros(1, *size, dtype=getattr(like, "dtype", torch.float32),
                          device=getattr(like, "device", "cpu"))  # fmt: skip
    try:
        with training_mode(model, False), torch.no_grad():
            model(example)
    except Exception as exc:
        default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        hint = f", e.g. its default {','.join(map(str, default))}" if default else ""
        raise DynconvertError(
            f"{name} cannot take inputs of size {tuple(size)} ({first_line(exc)}); give "
            f"the size it expects with --input-size{hint}",
            usage=True,
        ) from exc
