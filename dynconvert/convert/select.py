"""Which convolutions to convert, and why the others stay static.

Every conv found gets exactly one decision: converted, or skipped with the first reason that
applies. Reasons that make a swap impossible or inexact come first (type, shared parameters,
hooks), then the user's filters (dims, include/exclude, stem, min_channels, depthwise).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from ..errors import DynconvertError, UnmatchedPatternWarning
from ..layers import DynamicConvNd
from .config import ConvertConfig
from .sites import ConvSite
from .source_layers import Converter, carried_parameters, converter_for

ALREADY_DYNAMIC = "already dynamic"  # the skip reason of a DynamicConvNd


@dataclass
class Decision:
    site: ConvSite
    converter: Converter | None
    reason: str | None  # None: converted

    @property
    def converted(self) -> bool:
        return self.reason is None


def _matches(site: ConvSite, patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        if any(fnmatchcase(name, pattern) for name in site.names):
            return pattern
    return None


def _type_reason(module: nn.Module) -> str | None:
    if isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
        return "lazy conv not initialised; run one forward first"
    if isinstance(module, DynamicConvNd):
        return ALREADY_DYNAMIC
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed conv: not a target"
    if converter_for(module) is not None:
        return None
    name = type(module).__name__
    if not isinstance(module, nn.modules.conv._ConvNd):
        return f"{name} is not an nn.ConvNd; no exact converter registered"
    base = next((c for c in type(module).__mro__ if c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)), None)
    if base is None:
        return f"{name} is a custom nn.modules.conv._ConvNd; no exact converter registered"
    for method in ("forward", "_conv_forward"):
        if getattr(type(module), method) is not getattr(base, method):
            return f"{name} overrides {method}(); no exact converter registered"
    return f"{name} subclasses nn.{base.__name__}; only exact types are converted"


def _shared_params(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) → every (module name, module) that holds it."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append((name, module))
    return owners


def _plain_references(model: nn.Module) -> dict[int, str]:
    """id(module) → where a module attribute holds it outside the module tree.

    A conv kept in a plain list or dict (``self.convs = [self.a, self.b]``) is still called
    through that container after a swap, which only rewrites the registered slots.
    """
    found: dict[int, str] = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in ("_modules", "_parameters", "_buffers"):
                continue
            items = value.values() if isinstance(value, dict) else value
            if isinstance(value, nn.Module):
                items = (value,)
            elif not isinstance(value, (list, tuple, set, frozenset, dict)):
                continue
            for item in items:
                if isinstance(item, nn.Module):
                    found.setdefault(id(item), f"{name}.{attr}" if name else attr)
    return found


def _hook_reason(module: nn.Module) -> str | None:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(module, h, None) for h in hooks):
        return "has hooks (e.g. weight_norm) that a swap would drop"
    for attr in ("forward", "_conv_forward"):
        if attr in vars(module):
            return f"its {attr}() was replaced on the instance; a swap would drop it"
    for attr in carried_parameters(module):
        param = module._parameters.get(attr)
        if param is not None and (param._backward_hooks or param._post_accumulate_grad_hooks):
            return f"its {attr} has a gradient hook that a swap would drop"
    return None


def _structural_reason(
    site: ConvSite,
    owners: dict[int, list[tuple[str, nn.Module]]],
    references: dict[int, str],
) -> str | None:
    module = site.module
    if id(module) in references:
        return f"also held in {references[id(module)]!r}, which a swap would not update"
    for attr in carried_parameters(module):
        param = module._parameters.get(attr)
        if param is None:
            continue
        others = [name for name, m in owners.get(id(param), []) if m is not module]
        if others:
            return f"shares its {attr} with {others[0]!r}"
    if site.param_use:
        return site.param_use
    reason = _hook_reason(module)
    if reason:
        return reason
    if module._parameters.keys() - set(carried_parameters(module)):
        return "has extra parameters; only plain convs are converted"
    return None


def _filter_reason(site: ConvSite, config: ConvertConfig) -> str | None:
    if site.dims not in config.dims:
        return f"{site.dims}d excluded by dims={list(config.dims)}"
    if config.include is not None and _matches(site, config.include) is None:
        return "not matched by include"
    if config.exclude is not None:
        pattern = _matches(site, config.exclude)
        if pattern is not None:
            return f"excluded by {pattern!r}"
    if config.skip_stem and site.is_stem:
        return "stem (reads the model input); skip_stem=True"
    channels = min(site.in_channels or 0, site.out_channels or 0)
    if channels < config.min_channels:
        return f"fewer than min_channels={config.min_channels} channels"
    groups = site.groups or 1
    if config.depthwise == "skip" and groups > 1 and groups == site.in_channels:
        return "depthwise; depthwise='skip'"
    return None


def decide(model: nn.Module, sites: list[ConvSite], config: ConvertConfig) -> list[Decision]:
    owners = _shared_params(model)
    references = _plain_references(model)
    decisions = []
    for site in sites:
        if site.kind == "functional":
            decisions.append(Decision(site, None, "functional conv: no module to swap"))
            continue
        reason = (
            _type_reason(site.module)
            or _structural_reason(site, owners, references)
            or _filter_reason(site, config)
        )
        converter = converter_for(site.module) if reason is None else None
        decisions.append(Decision(site, converter, reason))
    return decisions


def validate(decisions: list[Decision], config: ConvertConfig) -> None:
    """Raise (include matches nothing, nothing converted) or warn (useless exclude)."""
    sites = [d.site for d in decisions]
    examples = ", ".join(repr(s.name) for s in sites[:3]) or "none"
    for pattern in config.include or ():
        if not any(_matches(s, (pattern,)) for s in sites):
            raise DynconvertError(
                f"include pattern {pattern!r} matches no convolution (conv names look like "
                f"{examples}); fix the pattern",
                usage=True,
            )
    for pattern in config.exclude or ():
        if not any(_matches(s, (pattern,)) for s in sites):
            warnings.warn(
                f"exclude pattern {pattern!r} matches no convolution; it excludes nothing",
                UnmatchedPatternWarning,
                stacklevel=3,
            )
    if not any(d.converted for d in decisions):
        if not decisions:
            raise DynconvertError("the model has no convolution to convert")
        reasons: dict[str, int] = {}
        for d in decisions:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        summary = "; ".join(f"{n}× {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1]))
        dynamic = reasons.pop(ALREADY_DYNAMIC, 0)
        if dynamic:  # a second conversion: suggesting skip_stem=False would mislead
            rest = "; ".join(f"{n}× {r}" for r, n in reasons.items())
            rest = f", {len(decisions) - dynamic} skipped: {rest}" if rest else ""
            raise DynconvertError(
                f"the model is already dynamic (convolutions: {dynamic} already dynamic{rest}); "
                "it needs no second conversion: to convert anew, start from the original "
                "static model",
                usage=True,
            )
        hint = (
            " (try --no-skip-stem / skip_stem=False)"
            if any(d.site.is_stem for d in decisions)
            else ""
        )
        raise DynconvertError(
            f"no convolution matched: {len(decisions)} found, all skipped ({summary}){hint}",
            usage=True,
        )
