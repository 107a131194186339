"""One convolution of a model as discovery found it: what ``discover``, ``probe`` and
``select`` pass between them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class ConvSite:
    """One convolution of the model: a module (maybe under several names) or a functional call."""

    name: str
    kind: str  # "module" or "functional"
    type_name: str
    dims: int
    in_channels: int | None
    out_channels: int | None
    kernel_size: tuple[int, ...] | None
    stride: tuple[int, ...] | None
    groups: int | None
    module: nn.Module | None = None
    aliases: tuple[str, ...] = ()
    calls: int | None = None
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    is_stem: bool = False
    param_use: str | None = None  # why its parameters are used outside its forward

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)
