"""Find every convolution of a model, and learn from torch.fx and one probe forward how it is used.

* The module tree gives every conv module and all the names it is registered under.
* A ``torch.fx`` trace (with timm's not-traceable registries, as timm's own FX feature
  extraction uses them) adds functional ``F.conv*`` calls, which conv reads the model input
  (the stem), how often each module is called, and whether a conv's parameters are read
  outside its own forward. The model is traced in both training modes, since a read under
  ``if self.training:`` appears in one graph only. A model that cannot be traced is still
  walked; the reason is noted.
* One forward in eval mode on an example input (batch 1, ``probe.py``) records each call's
  shapes for the MACs, counts calls inside modules that fx treats as leaves, and watches
  for parameter reads that really ran. Training flags are restored and nothing is learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm.models  # noqa: F401  (registers the model-level not-traceable modules)
import torch
import torch.fx as fx
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import nn

from ..errors import first_line
from ..layers import DynamicConvNd
from ..modes import training_mode
from .probe import HARMLESS_PARAM_ATTRS, clear_shapes, example_for, probe
from .sites import ConvSite

_CONV_FUNCTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}


@dataclass
class Discovery:
    sites: list[ConvSite]
    notes: list[str]
    traced: bool
    input_size: tuple[int, ...] | None


def is_conv_module(module: nn.Module) -> bool:
    if isinstance(module, (nn.modules.conv._ConvNd, DynamicConvNd)):
        return True
    return type(module).__name__ == "CondConv2d"  # timm's, not an nn.Conv subclass


def _conv_dims(module: nn.Module) -> int:
    if isinstance(module, DynamicConvNd):
        return module.dims
    kernel = getattr(module, "kernel_size", None)
    if isinstance(kernel, tuple):
        return len(kernel)
    return module.weight.dim() - 2


def _module_site(module: nn.Module, names: list[str]) -> ConvSite:
    dims = _conv_dims(module)

    def tup(value: Any) -> tuple[int, ...] | None:
        if value is None:
            return None
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims

    return ConvSite(
        name=names[0],
        aliases=tuple(names[1:]),
        kind="module",
        type_name=type(module).__name__,
        dims=dims,
        in_channels=getattr(module, "in_channels", None),
        out_channels=getattr(module, "out_channels", None),
        kernel_size=tup(getattr(module, "kernel_size", None)),
        stride=tup(getattr(module, "stride", None)),
        groups=getattr(module, "groups", None),
        module=module,
    )


def _module_sites(model: nn.Module) -> list[ConvSite]:
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and is_conv_module(module):
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    return [_module_site(modules[key], names[key]) for key in names]


def _notrace_registries() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


class ConvTracer(fx.Tracer):
    """A tracer that stops at convs, dynamic convs and timm's not-traceable modules."""

    def __init__(self) -> None:
        self.notrace_modules, functions = _notrace_registries()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_conv_module(m) or isinstance(m, self.notrace_modules):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _const(value: Any, dims: int) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value,) * dims
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _functional_site(model: nn.Module, node: fx.Node, dims: int, index: int) -> ConvSite:
    args = list(node.args) + [None] * 7
    kw = node.kwargs
    weight = kw.get("weight", args[1])
    stride = kw.get("stride", args[3] if args[3] is not None else 1)
    groups = kw.get("groups", args[6] if args[6] is not None else 1)
    shape = None
    label = f"F.conv{dims}d#{index}"
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        label = f"{weight.target} (F.conv{dims}d)"
        try:
            shape = tuple(model.get_parameter(weight.target).shape)
        except AttributeError:
            shape = None
    groups = groups if isinstance(groups, int) else None
    return ConvSite(
        name=label,
        kind="functional",
        type_name=f"F.conv{dims}d",
        dims=dims,
        in_channels=shape[1] * groups if shape and groups else None,
        out_channels=shape[0] if shape else None,
        kernel_size=shape[2:] if shape else None,
        stride=_const(stride, dims),
        groups=groups,
    )


def _analyse_graph(
    model: nn.Module, graph: fx.Graph, sites: list[ConvSite]
) -> tuple[list[ConvSite], dict[fx.Node, ConvSite]]:
    """Call counts, stems and functional convs, from the traced graph."""
    by_module = {id(s.module): s for s in sites}
    conv_containers = {
        name for name, m in model.named_modules() if any(is_conv_module(c) for c in m.modules())
    }
    functional: dict[fx.Node, ConvSite] = {}
    reads_input: dict[fx.Node, bool] = {}  # depends on the model input
    crossed_conv: dict[fx.Node, bool] = {}  # some conv lies between it and the input
    calls: dict[int, int] = {}
    for node in graph.nodes:
        inputs = node.all_input_nodes
        reads_input[node] = node.op == "placeholder" or any(reads_input[i] for i in inputs)
        crossed = any(crossed_conv[i] for i in inputs)
        site = None
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            site = by_module.get(id(module))
            if site is not None:
                calls[id(module)] = calls.get(id(module), 0) + 1
            is_conv = site is not None or node.target in conv_containers
        elif node.op == "call_function" and node.target in _CONV_FUNCTIONS:
            site = _functional_site(model, node, _CONV_FUNCTIONS[node.target], len(functional))
            site.calls = 1
            functional[node] = site
            is_conv = True
        else:
            is_conv = False
        if site is not None and node.args:
            first = node.args[0]
            if isinstance(first, fx.Node) and reads_input[first] and not crossed_conv[first]:
                site.is_stem = True
        crossed_conv[node] = crossed or is_conv
    for site in sites:  # zero may mean "inside a leaf module": the probe counts those
        site.calls = calls.get(id(site.module)) or None
    return list(functional.values()), functional


def mark_param_reads(graph: fx.Graph, sites: list[ConvSite]) -> None:
    """Note each conv whose weight or bias the graph reads outside the conv's own call."""
    by_name = {name: s for s in sites for name in s.names}
    for node in graph.nodes:
        if node.op != "get_attr" or "." not in str(node.target):
            continue
        owner, attr = str(node.target).rsplit(".", 1)
        site = by_name.get(owner)
        if site is None or attr not in ("weight", "bias") or site.param_use:
            continue
        for user in node.users:
            harmless = (
                user.op == "call_function"
                and user.target is getattr
                and user.args[1] in HARMLESS_PARAM_ATTRS
            )
            if not harmless:
                site.param_use = f"its {attr} is read outside its forward"


def trace(model: nn.Module) -> fx.Graph:
    return ConvTracer().trace(model)


def trace_other_mode(model: nn.Module) -> fx.Graph:
    """The graph of the mode the model is not in (``self.training`` branches differ).

    Every module's training flag is restored afterwards.
    """
    with training_mode(model, not model.training):
        return trace(model)


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """timm's ``pretrained_cfg['input_size']`` (or ``default_cfg``), when the model has one."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(int(v) for v in cfg["input_size"])
    return None


def _lazy_modules(model: nn.Module) -> list[str]:
    """Modules whose parameters or buffers a first forward would still create."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
    ]


def discover(
    model: nn.Module,
    input_size: tuple[int, ...] | None = None,
    example_input: torch.Tensor | None = None,
) -> Discovery:
    """All convolutions of ``model`` with what the graph and one probe forward say about them.

    Nothing about the model changes (training flags are restored; the probe runs in eval mode
    without grad, and not at all while lazy modules would be initialised by it).
    """
    notes: list[str] = []
    sites = _module_sites(model)
    graph: fx.Graph | None = None
    functional: dict[fx.Node, ConvSite] = {}
    functional_sites: list[ConvSite] = []

    # 1. Trace the model as it is; a parameter read under `if self.training:` shows only in
    #    the other mode's graph, so that one is read for parameter reads too.
    try:
        graph = trace(model)
    except Exception as exc:  # any failure of symbolic tracing: fall back to the module tree
        notes.append(f"fx tracing failed: {first_line(exc)}; walked the module tree")
    if graph is not None:
        functional_sites, functional = _analyse_graph(model, graph, sites)
        mark_param_reads(graph, sites)
        try:
            mark_param_reads(trace_other_mode(model), sites)
        except Exception as exc:
            mode = "eval" if model.training else "train"
            notes.append(f"fx tracing in {mode} mode failed: {first_line(exc)}")
    all_sites = sites + functional_sites

    # 2. Run it once on an example input: shapes, call counts, and parameter reads that ran.
    if example_input is None and input_size is None:
        input_size = default_input_size(model)
    if example_input is None and input_size is not None:
        example_input = example_for(model, input_size)
    lazy = _lazy_modules(model)
    if example_input is not None and lazy:
        notes.append(
            f"no probe forward: it would initialise lazy modules ({lazy[0]!r}); "
            "run one forward first for shapes and MACs"
        )
        example_input = None
    elif example_input is not None:
        input_size = tuple(example_input.shape[1:])
        try:
            order = probe(model, sites, example_input, graph, functional)
        except Exception as exc:
            clear_shapes(all_sites)
            order = []
            notes.append(
                f"probe forward at input size {input_size} failed: {first_line(exc)}; "
                "shapes and MACs unknown"
            )
        if graph is None and order and not any(s.is_stem for s in sites):
            order[0].is_stem = True  # the first conv to run reads the (possibly transformed) input
    elif not lazy:
        notes.append("no input size known (pass input_size=...): shapes and MACs unknown")
    if graph is None and example_input is None:
        notes.append(
            "parameter reads outside the convs' forwards were not checked (fx tracing failed "
            "and no probe ran): pass input_size=... or example_input=..."
        )
    if graph is None and not any(s.is_stem for s in sites) and sites:
        sites[0].is_stem = True
        notes.append(f"stem assumed to be the first registered conv, {sites[0].name!r}")
    return Discovery(all_sites, notes, graph is not None, input_size)
