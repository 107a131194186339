"""``dynconvert.convert``: discover, select, build, then swap in place, and report."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from ..errors import DynconvertError
from ..option_fields import keyword_signature, refuse_unknown_keywords
from ..report import ConversionReport, ConvRow
from .config import ConvertConfig
from .costs import conv_macs, dynamic_overhead_macs
from .discover import discover
from .replace import module_order, swap_modules
from .select import Decision, decide, validate
from .sites import ConvSite


def _count(params) -> int:
    """Parameters of ``params``; lazy ones, whose size is not known yet, count 0."""
    return sum(p.numel() for p in params if not isinstance(p, nn.parameter.UninitializedParameter))


def _params(module: nn.Module | None, site: ConvSite, model: nn.Module) -> int | None:
    if module is not None:
        return _count(module.parameters())
    if site.kernel_size is None or site.out_channels is None or site.groups is None:
        return None
    # functional conv: the weight it reads (its bias, if any, is not known from the graph)
    return site.out_channels * (site.in_channels // site.groups) * math.prod(site.kernel_size)


def _macs(site: ConvSite) -> int | None:
    if site.calls is None or len(site.output_shapes) != site.calls or site.kernel_size is None:
        return None
    if site.in_channels is None or site.groups is None:
        return None
    return sum(
        conv_macs(out, site.in_channels, site.groups, site.kernel_size)
        for out in site.output_shapes
    )


def _row(decision: Decision, new: nn.Module | None, config: ConvertConfig, model) -> ConvRow:
    site = decision.site
    params_before = _params(site.module, site, model)
    macs_before = _macs(site)
    params_after, macs_after = params_before, macs_before
    if new is not None:
        params_after = _count(new.parameters())
        if macs_before is not None:
            macs_after = macs_before + sum(
                dynamic_overhead_macs(
                    shape,
                    site.out_channels,
                    site.groups,
                    site.kernel_size,
                    config.k,
                    config.ratio,
                    getattr(site.module, "bias", None) is not None,
                )
                for shape in site.input_shapes
            )
    return ConvRow(
        name=site.name,
        type=site.type_name,
        status="converted" if decision.converted else "skipped",
        reason=decision.reason,
        in_channels=site.in_channels,
        out_channels=site.out_channels,
        kernel_size=list(site.kernel_size) if site.kernel_size is not None else None,
        stride=list(site.stride) if site.stride is not None else None,
        groups=site.groups,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        calls=site.calls,
        kind=site.kind,
        aliases=list(site.aliases),
        input_shapes=[list(s) for s in site.input_shapes],
    )


def _config_from(options: dict[str, Any], config: ConvertConfig | None) -> ConvertConfig:
    refuse_unknown_keywords("convert", ConvertConfig, options)
    if config is not None:
        if not isinstance(config, ConvertConfig):
            raise TypeError(f"config: expected a ConvertConfig, got {type(config).__name__}")
        if options:
            raise DynconvertError(
                f"convert: pass options either in config= or as keywords, not both "
                f"(got config and {', '.join(sorted(options))}); use "
                "dataclasses.replace(config, ...)",
                usage=True,
            )
        return config
    try:
        return ConvertConfig(**options)
    except (TypeError, ValueError) as exc:
        raise DynconvertError(str(exc), usage=True) from exc


def convert(
    model: nn.Module,
    k: int | None = None,
    *,
    example_input: torch.Tensor | None = None,
    config: ConvertConfig | None = None,
    **options: Any,
) -> tuple[nn.Module, ConversionReport]:
    """Replace the convolutions of ``model`` by dynamic convolutions, in place.

    Returns the same ``model`` object (its class, methods and attributes are kept) and a
    :class:`~dynconvert.report.ConversionReport`. Right after conversion the model computes
    what it computed before (Chen et al., CVPR 2020: uniform attention over K kernels whose
    mean is the trained kernel). The keyword options are the fields of :class:`ConvertConfig`
    (``k``, ``include``, ``exclude``, ``skip_stem``, ``variant``, ...: its fields are their one
    source, with defaults and help); pass either ``config=`` or keywords, not both.
    ``example_input`` (a batch) overrides ``input_size`` for the shape probe.

    >>> model, report = convert(timm.create_model("resnet18"), k=4, exclude="layer4.*")

    Everything is checked before the model is touched: an ``include`` pattern matching no conv
    or nothing to convert raises :class:`~dynconvert.errors.DynconvertError` and leaves the
    model unchanged; an ``exclude`` pattern matching nothing warns.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):  # its convs are compiled code, not modules
        raise DynconvertError(
            f"model: a TorchScript module ({type(model).__name__}) cannot be converted; pass "
            "the eager nn.Module it was scripted or traced from",
            usage=True,
        )
    if k is not None:
        options["k"] = k
    config = _config_from(options, config)
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input: expected a tensor, got {type(example_input).__name__}")

    discovery = discover(model, config.input_size, example_input)
    decisions = decide(model, discovery.sites, config)
    validate(decisions, config)

    # Build every new layer before swapping any, so a failure leaves the model as it was.
    order = module_order(model)
    generator = torch.Generator().manual_seed(config.seed)
    chosen = sorted((d for d in decisions if d.converted), key=lambda d: order[id(d.site.module)])
    built = {id(d.site.module): d.converter(d.site.module, config, generator) for d in chosen}

    params_before = _count(model.parameters())
    rows = [_row(d, built.get(id(d.site.module)) if d.converted else None, config, model)
            for d in decisions]  # fmt: skip
    swap_modules(model, [(d.site.module, built[id(d.site.module)]) for d in chosen])
    report = ConversionReport(
        rows=rows,
        notes=discovery.notes,
        model=type(model).__name__,
        input_size=list(discovery.input_size) if discovery.input_size else None,
        traced=discovery.traced,
        config=config.to_dict(),
        model_params_before=params_before,
        model_params_after=_count(model.parameters()),
    )
    return model, report


_MODEL = inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=nn.Module)
# help(convert) lists every ConvertConfig field as a keyword, with its default.
convert.__signature__ = keyword_signature(
    ConvertConfig, [_MODEL], positional=("k",), tail=("example_input", "config")
)
