"""The options of a conversion, as one frozen, validated, serialisable value.

A :class:`ConvertConfig` is stored in saved files (plain python types only, so that
``torch.load(weights_only=True)`` reads it back) and handed to :func:`swap_named` to rebuild a
converted model exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..engine import STRATEGIES
from ..option_fields import option
from .variants import DEFAULT_VARIANT, variant_named

DEPTHWISE_POLICIES = ("convert", "skip")
DIMS = (1, 2, 3)
STRATEGY_CHOICES = ("auto", *STRATEGIES)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_str_tuple(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    values = tuple(value)
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{name}: expected glob patterns (non-empty strings), got {value!r}")
    return values


def _globs(help_text: str) -> Any:
    """A repeatable ``--include``/``--exclude`` option: one glob, or a list in a recipe."""
    return option(
        None, help_text, metavar="GLOB", repeatable=True, recipe_types=(str, list, type(None))
    )


@dataclass(frozen=True)
class ConvertConfig:
    """How :func:`dynconvert.convert` selects and builds dynamic convolutions.

    * ``k``, ``ratio``, ``temperature``: the dynamic layer (K kernels, router width as a
      fraction of the input channels, softmax temperature; Chen et al., CVPR 2020 §3).
    * ``noise``: the zero-sum perturbation of the K kernels, relative to the weight's std.
    * ``include`` / ``exclude``: ``fnmatch`` globs on qualified module names.
    * ``skip_stem``: keep the conv(s) that read the model input static, as the paper does.
    * ``min_channels``: convs with fewer input or output channels stay static.
    * ``depthwise``: ``"convert"`` or ``"skip"`` depthwise convs (groups == in_channels > 1).
    * ``dims``: which of Conv1d/2d/3d to convert.
    * ``seed``: kernels are drawn from a ``torch.Generator`` seeded with it (deterministic).
    * ``input_size``: per-sample input shape (e.g. ``(3, 224, 224)``) used to measure shapes
      and MACs; ``None`` uses timm's ``pretrained_cfg['input_size']`` when there is one.
    * ``variant``: the kind of dynamic convolution, a name registered with
      :func:`~dynconvert.convert.register_variant` (its router and exact start); ``"dy"`` is
      Chen et al.'s. Files saved before variants existed load as ``"dy"``.
    """

    k: int = option(4, "Kernels per dynamic conv (K).", minimum=1)
    include: tuple[str, ...] | None = _globs(
        "Convert only convs whose qualified name matches (repeatable)."
    )
    exclude: tuple[str, ...] | None = _globs(
        "Keep convs whose qualified name matches static (repeatable)."
    )
    skip_stem: bool = option(True, "Keep the conv that reads the input static, as the paper does.")
    min_channels: int = option(
        1, "Convs with fewer input or output channels stay static.", minimum=1
    )
    depthwise: str = option(
        "convert", "What to do with depthwise convs.", choices=DEPTHWISE_POLICIES
    )
    ratio: float = option(
        0.25, "Router width as a fraction of the input channels.", minimum=0, above_minimum=True
    )
    temperature: float = option(
        1.0, "Softmax temperature of the router.", minimum=0, above_minimum=True
    )
    dims: tuple[int, ...] = option(
        DIMS, "Which of Conv1d/2d/3d to convert.", cli=False, recipe_types=(int, list)
    )
    noise: float = option(
        0.01, "Zero-sum perturbation of the K kernels, relative to the weight's std.", cli=False
    )
    strategy: str = option(
        "auto",
        "Forward strategy of the dynamic layers ('dense': batch 1 only).",
        choices=STRATEGY_CHOICES,
    )
    seed: int = option(0, "Seed of the kernel perturbation.")
    input_size: tuple[int, ...] | None = option(
        None, "Input size for shapes and MACs (default: the model's).", value="shape"
    )
    variant: str = option(
        DEFAULT_VARIANT,
        "Kind of dynamic conv: a registered variant ('dy': Chen et al., CVPR 2020).",
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through the back door, once
        if not _is_int(self.k) or self.k < 1:
            raise ValueError(f"k: expected an int >= 1, got {self.k!r}")
        set_(self, "include", _as_str_tuple("include", self.include))
        set_(self, "exclude", _as_str_tuple("exclude", self.exclude))
        if not isinstance(self.skip_stem, bool):
            raise TypeError(f"skip_stem: expected a bool, got {self.skip_stem!r}")
        if not _is_int(self.min_channels) or self.min_channels < 1:
            raise ValueError(f"min_channels: expected an int >= 1, got {self.min_channels!r}")
        if self.depthwise not in DEPTHWISE_POLICIES:
            raise ValueError(
                f"depthwise: expected one of {DEPTHWISE_POLICIES}, got {self.depthwise!r}"
            )
        for name in ("ratio", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a number > 0, got {value!r}")
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
            set_(self, name, float(value))
        dims = (self.dims,) if _is_int(self.dims) else tuple(self.dims)
        if not dims or not all(_is_int(d) and d in DIMS for d in dims):
            raise ValueError(f"dims: expected a non-empty subset of {DIMS}, got {self.dims!r}")
        set_(self, "dims", tuple(sorted(set(dims))))
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)):
            raise TypeError(f"noise: expected a number >= 0, got {self.noise!r}")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ValueError(f"noise: expected a finite number >= 0, got {self.noise!r}")
        set_(self, "noise", float(self.noise))
        if self.strategy not in STRATEGY_CHOICES:
            choices = ", ".join(STRATEGY_CHOICES)
            raise ValueError(f"strategy: expected one of {choices}, got {self.strategy!r}")
        if not _is_int(self.seed):
            raise TypeError(f"seed: expected an int, got {self.seed!r}")
        if self.input_size is not None:
            size = tuple(self.input_size)
            if not 2 <= len(size) <= 4 or not all(_is_int(s) and s > 0 for s in size):
                raise ValueError(
                    "input_size: expected the per-sample shape (channels, *spatial) with 1-3 "
                    f"spatial dims, e.g. (3, 224, 224); got {self.input_size!r}"
                )
            set_(self, "input_size", size)
        if not isinstance(self.variant, str):
            raise TypeError(f"variant: expected a registered name, got {self.variant!r}")
        variant_named(self.variant)  # a ValueError that names the registered ones

    def to_dict(self) -> dict[str, Any]:
        """Plain python types only (lists, not tuples), for JSON and weights-only torch files."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer or foreign file)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)
