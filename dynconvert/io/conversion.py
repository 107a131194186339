"""What a saved file records about a conversion: its options, converted names and report.

``save`` takes them from the report of :func:`dynconvert.convert`, else from what ``load``
recorded on the model (:data:`CONVERSION_ATTR`), else reads them off the dynamic layers
(see the package docstring of :mod:`dynconvert.io`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import nn

from ..convert import ConvertConfig
from ..convert.variants import variant_of
from ..errors import DynconvertError
from ..layers import DynamicConvNd
from ..layers.routers import router_width
from ..report import ConversionReport, ConvRow

# Set by ``load`` on the model it returns: {"config": dict, "converted": [...], "report": dict}.
CONVERSION_ATTR = "_dynconvert_conversion"


def check_converted(model: nn.Module, names: list[str]) -> None:
    if not names:
        raise DynconvertError(
            "the model has no dynamic convolutions; convert it with dynconvert.convert first "
            "(a plain model is saved with torch.save(model.state_dict(), path))"
        )
    for name in names:
        module = model.get_submodule(name) if _has_submodule(model, name) else None
        if not isinstance(module, DynamicConvNd):
            raise DynconvertError(
                f"the report lists {name!r} as converted, but the model has "
                f"{type(module).__name__ if module is not None else 'no such module'} there; "
                "pass the report of this model's conversion"
            )


def check_config_fits(model: nn.Module, names: list[str], config: dict[str, Any]) -> None:
    """The recorded ``k`` and router ``ratio`` must rebuild every converted layer's shapes,
    or the file could never be loaded again."""
    k, ratio = config.get("k"), config.get("ratio")
    for name in names:
        layer = model.get_submodule(name)
        width = layer.router.width
        if layer.k != k or router_width(layer.in_channels, ratio) != width:
            raise DynconvertError(
                f"the conversion options (k={k}, ratio={ratio}) do not fit {name!r} (k={layer.k}, "
                f"router width {width} for {layer.in_channels} channels); pass the report or "
                "config of this model's own conversion"
            )


def layer_strategies(model: nn.Module, names: list[str], config: dict[str, Any]) -> dict:
    """Converted layers whose strategy differs from the recorded option: name → strategy."""
    default = config.get("strategy", "auto")
    return {
        name: model.get_submodule(name).strategy
        for name in names
        if model.get_submodule(name).strategy != default
    }


#: Module attributes that decide what a layer computes without changing any weight shape
#: (``output_stride`` of a timm ResNet sets dilation and stride; ``global_pool`` the pooling).
_ARCHITECTURE_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                       "dilation", "groups", "padding_mode", "k", "output_size", "pool_type",
                       "ceil_mode")  # fmt: skip
_LIBRARIES = ("torch.", "timm.", "dynconvert.")
#: dynconvert classes renamed since files recorded their names: old name → new name.
_RENAMED_CLASSES = {"KernelAttention": "SoftmaxRouter"}


def architecture(model: nn.Module) -> list[list[str]]:
    """``[name, class, attributes]`` per module: what ``load`` compares after rebuilding.

    Class names count only for torch, timm and dynconvert modules: a user's class may be
    renamed between saving and loading without changing what it computes.
    """
    rows = []
    for name, module in model.named_modules():
        cls = type(module)
        known = cls.__module__.startswith(_LIBRARIES)
        attrs = [
            f"{attr}={getattr(module, attr)!r}"
            for attr in _ARCHITECTURE_ATTRS
            if isinstance(getattr(module, attr, None), (int, float, str, tuple))
        ]
        rows.append([name, cls.__qualname__ if known else "", ", ".join(attrs)])
    return rows


def architecture_difference(saved: list, rebuilt: list) -> str | None:
    """The first module where two :func:`architecture` lists differ, in words, or None."""
    ours = {row[0]: row for row in rebuilt}
    theirs = {row[0]: row for row in saved}
    for name in [*theirs, *ours]:
        if name not in ours or name not in theirs:
            where = "the saved model" if name in theirs else "the rebuilt model"
            return f"{name!r} exists only in {where}"
    for name, row in theirs.items():
        mine = ours[name]
        saved_class = _RENAMED_CLASSES.get(row[1], row[1])
        if (saved_class and mine[1] and saved_class != mine[1]) or row[2] != mine[2]:
            return f"{name or 'the model'}: saved {row[1]}({row[2]}), rebuilt {mine[1]}({mine[2]})"
    return None


def check_all_recorded(model: nn.Module, names: list[str]) -> None:
    """A rebuilt timm model gets exactly ``names`` swapped; no other layer may be dynamic."""
    recorded = {id(model.get_submodule(name)) for name in names}
    extra = [
        name
        for name, module in model.named_modules()
        if isinstance(module, DynamicConvNd) and id(module) not in recorded
    ]
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise DynconvertError(
            f"dynamic layers {shown} are not in the report, so load could not rebuild them "
            "(was the model converted twice?); convert once with all the options"
        )


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def conversion_of(model: nn.Module, report: Any) -> dict[str, Any]:
    """Options, converted names and report of ``model``'s conversion (see the module doc)."""
    if report is not None:
        for attr in ("config", "converted_names", "to_dict"):
            if not hasattr(report, attr):
                raise TypeError(f"report: expected a ConversionReport, got {type(report).__name__}")
        return {
            "config": dict(report.config),
            "config_inferred": False,
            "converted": list(report.converted_names),
            "report": report.to_dict(),
        }
    recorded = getattr(model, CONVERSION_ATTR, None)
    if isinstance(recorded, dict):
        return {
            "config": dict(recorded["config"]),
            "config_inferred": bool(recorded.get("config_inferred", False)),
            "converted": list(recorded["converted"]),
            "report": recorded.get("report"),
        }
    return _infer_conversion(model)


def _infer_conversion(model: nn.Module) -> dict[str, Any]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicConvNd)]
    if not layers:
        return {"config": ConvertConfig().to_dict(), "config_inferred": True, "converted": [],
                "report": None}  # fmt: skip
    ks = {m.k for _, m in layers}
    ratio = _common_ratio([m for _, m in layers])
    variants = {variant_of(m) for _, m in layers}
    if len(ks) > 1 or ratio is None or len(variants) > 1 or None in variants:
        raise DynconvertError(
            "the dynamic layers differ in k, router width or variant (or have a router of no "
            "registered variant), so one set of options cannot rebuild them; pass report= "
            "(from dynconvert.convert) to save"
        )
    # The most common strategy is the option; the file records the others per layer.
    strategies = Counter(m.strategy for _, m in layers)
    options = {"k": ks.pop(), "ratio": ratio, "strategy": strategies.most_common(1)[0][0],
               "variant": variants.pop()}  # fmt: skip
    with_temperature = [m for _, m in layers if m.has_temperature]
    if with_temperature:
        options["temperature"] = with_temperature[0].temperature
    config = ConvertConfig(**options)
    names = [n for n, _ in layers]
    return {
        "config": config.to_dict(),
        "config_inferred": True,
        "converted": names,
        "report": report_of_layers(model, layers, config),
    }


def _common_ratio(layers: list[DynamicConvNd]) -> float | None:
    """A router ``ratio`` that gives every layer its router width (0.25, the default, first)."""

    def fits(ratio: float) -> bool:
        return all(router_width(m.in_channels, ratio) == m.router.width for m in layers)

    candidates = [0.25] + [m.router.width / m.in_channels for m in layers]
    return next((r for r in candidates if fits(r)), None)


def report_of_layers(model: nn.Module, layers: list[tuple[str, DynamicConvNd]], config) -> dict:
    rows = []
    for name, layer in layers:
        static = layer.weight[0].numel() + (layer.bias[0].numel() if layer.bias is not None else 0)
        rows.append(
            ConvRow(
                name=name,
                type=type(layer).__name__.replace("Dynamic", ""),
                status="converted",
                reason=None,
                in_channels=layer.in_channels,
                out_channels=layer.out_channels,
                kernel_size=list(layer.kernel_size),
                stride=list(layer.stride),
                groups=layer.groups,
                params_before=static,
                params_after=sum(p.numel() for p in layer.parameters()),
            )
        )
    return ConversionReport(
        rows=rows,
        notes=["saved without its conversion report: only the dynamic layers are listed"],
        model=type(model).__name__,
        config=config.to_dict(),
    ).to_dict()


# -- load -----------------------------------------------------------------------------------


def config_from_dict(data: dict[str, Any], what: str):
    try:
        return ConvertConfig.from_dict(dict(data))
    except (TypeError, ValueError) as exc:
        raise DynconvertError(f"{what}: options this version cannot use ({exc})") from exc


def submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
