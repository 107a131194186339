"""Find every convolution of a model, and learn from torch.fx and one probe forward how it is used.

* The module tree gives every conv module and all the names it is registered under.
* A ``torch.fx`` trace (with timm's not-traceable registries, as timm's own FX feature
  extraction uses them) adds functional ``F.conv*`` calls, which conv reads the model input
  (the stem), how often each module is called, and whether a conv's parameters are read
  outside its own forward. A model that cannot be traced is still walked; the reason is noted.
* One forward in eval mode on an example input (batch 1), with hooks, records each call's
  input/output shapes for the MACs; it also counts calls inside modules that fx treats as
  leaves. Training flags are restored and nothing is learned (no grad, eval-mode BatchNorm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import first_line
from ..layers import DynamicConvNd

_CONV_FUNCTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
# Reading these from a conv's weight stays valid after the swap.
_HARMLESS_ATTRS = {"dtype", "device", "requires_grad", "is_cuda"}


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
    try:
        import timm.models  # noqa: F401  (registers the model-level not-traceable modules)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover
        return (), ()
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
    """Call counts, stems, parameter reads and functional convs, from the traced graph."""
    by_module = {id(s.module): s for s in sites}
    by_name = {name: s for s in sites for name in s.names}
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
            if node.op == "get_attr" and "." in str(node.target):
                owner, attr = str(node.target).rsplit(".", 1)
                owner_site = by_name.get(owner)
                if owner_site is not None and attr in ("weight", "bias"):
                    for user in node.users:
                        harmless = (
                            user.op == "call_function"
                            and user.target is getattr
                            and user.args[1] in _HARMLESS_ATTRS
                        )
                        if not harmless:
                            owner_site.param_use = f"its {attr} is read outside its forward"
        if site is not None and node.args:
            first = node.args[0]
            if isinstance(first, fx.Node) and reads_input[first] and not crossed_conv[first]:
                site.is_stem = True
        crossed_conv[node] = crossed or is_conv
    for site in sites:  # zero may mean "inside a leaf module": the probe counts those
        site.calls = calls.get(id(site.module)) or None
    return list(functional.values()), functional


def trace(model: nn.Module) -> fx.Graph:
    return ConvTracer().trace(model)


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """timm's ``pretrained_cfg['input_size']`` (or ``default_cfg``), when the model has one."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(int(v) for v in cfg["input_size"])
    return None


def _example_for(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), torch.empty(0))
    dtype = tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, *input_size), generator=generator, dtype=dtype).to(tensor.device)


def _per_sample(shape: torch.Size, dims: int) -> tuple[int, ...]:
    shape = tuple(shape)
    return shape[1:] if len(shape) == dims + 2 else shape


class _Recorder(fx.Interpreter):
    """Runs the traced graph, recording the shapes of the functional conv calls."""

    def __init__(self, gm: fx.GraphModule, functional: dict[fx.Node, ConvSite]) -> None:
        super().__init__(gm)
        self.functional = functional

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        site = self.functional.get(n)
        if site is not None and isinstance(n.args[0], fx.Node):
            site.input_shapes.append(_per_sample(self.env[n.args[0]].shape, site.dims))
            site.output_shapes.append(_per_sample(out.shape, site.dims))
        return out


def _probe(
    model: nn.Module,
    sites: list[ConvSite],
    example: torch.Tensor,
    graph: fx.Graph | None,
    functional: dict[fx.Node, ConvSite],
) -> list[ConvSite]:
    """One eval-mode forward with hooks; returns the conv modules in the order they ran."""
    order: list[ConvSite] = []
    counts: dict[int, int] = {}

    def hook(site: ConvSite):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            counts[id(site)] = counts.get(id(site), 0) + 1
            if id(site) not in {id(s) for s in order}:
                order.append(site)
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                site.input_shapes.append(_per_sample(args[0].shape, site.dims))
                site.output_shapes.append(_per_sample(output.shape, site.dims))
                if args[0] is example:
                    site.is_stem = True

        return record

    handles = [s.module.register_forward_hook(hook(s)) for s in sites if s.module is not None]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if functional and graph is not None:
                _Recorder(fx.GraphModule(model, graph), functional).run(example)
            else:
                model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
    for site in sites:
        if site.module is not None:
            site.calls = counts.get(id(site), 0)
    return order


def _clear_shapes(sites: list[ConvSite]) -> None:
    for site in sites:
        site.input_shapes.clear()
        site.output_shapes.clear()


def discover(
    model: nn.Module,
    input_size: tuple[int, ...] | None = None,
    example_input: torch.Tensor | None = None,
) -> Discovery:
    """All convolutions of ``model`` with what the graph and one probe forward say about them.

    Nothing about the model changes (training flags are restored; the probe runs in eval mode
    without grad).
    """
    notes: list[str] = []
    sites = _module_sites(model)
    graph: fx.Graph | None = None
    functional: dict[fx.Node, ConvSite] = {}
    functional_sites: list[ConvSite] = []
    try:
        graph = trace(model)
    except Exception as exc:  # any failure of symbolic tracing: fall back to the module tree
        notes.append(f"fx tracing failed: {first_line(exc)}; walked the module tree")
    if graph is not None:
        functional_sites, functional = _analyse_graph(model, graph, sites)
    all_sites = sites + functional_sites

    if example_input is None and input_size is None:
        input_size = default_input_size(model)
    if example_input is None and input_size is not None:
        example_input = _example_for(model, input_size)
    if example_input is not None:
        input_size = tuple(example_input.shape[1:])
        try:
            order = _probe(model, sites, example_input, graph, functional)
        except Exception as exc:
            _clear_shapes(all_sites)
            order = []
            notes.append(
                f"probe forward at input size {input_size} failed: {first_line(exc)}; "
                "shapes and MACs unknown"
            )
        if graph is None and order and not any(s.is_stem for s in sites):
            order[0].is_stem = True  # the first conv to run reads the (possibly transformed) input
    else:
        notes.append("no input size known (pass input_size=...): shapes and MACs unknown")
    if graph is None and not any(s.is_stem for s in sites) and sites:
        sites[0].is_stem = True
        notes.append(f"stem assumed to be the first registered conv, {sites[0].name!r}")
    return Discovery(all_sites, notes, graph is not None, input_size)
