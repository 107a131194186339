"""Click parameter types shared by the commands."""

from __future__ import annotations

import re
from typing import Any

import click


class IntTuple(click.ParamType):
    """A few positive ints separated by ``,``, ``x`` or spaces: ``3,224,224``, ``224x160``."""

    name = "int_tuple"

    def __init__(self, min_len: int, max_len: int, expected: str) -> None:
        self.min_len, self.max_len, self.expected = min_len, max_len, expected

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, tuple):
            return value
        parts = [p for p in re.split(r"[,x×\s]+", str(value).strip()) if p]
        try:
            sizes = tuple(int(p) for p in parts)
        except ValueError:
            sizes = ()
        if not self.min_len <= len(sizes) <= self.max_len or any(s < 1 for s in sizes):
            self.fail(f"expected {self.expected}; got {value!r}", param, ctx)
        return sizes


def input_size() -> IntTuple:
    """``224``, ``224,160`` (H,W) or ``3,224,224`` (C,H,W)."""
    return IntTuple(1, 3, "H, H,W or C,H,W with positive ints")


def sample_shape() -> IntTuple:
    """One sample's shape without the batch: ``3,224,224`` (C,H,W), ``64,100`` (C,L)..."""
    return IntTuple(2, 4, "one sample's shape as positive ints, e.g. 3,224,224 (C,H,W)")
