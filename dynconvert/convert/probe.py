"""One probe forward on an example input: shapes for the MACs, and parameter reads seen live.

The probe runs the model once in eval mode without grad, with a forward hook on every conv
module. It records each call's input/output shapes (for the MACs) and the order in which the
convs ran. While it runs, a ``TorchFunctionMode`` watches every torch call for a conv's
``weight`` or ``bias`` used outside that conv's own forward: code such as
``F.conv2d(x, self.conv.weight)`` or ``x / self.conv.weight.shape[0]`` would break or change
once the weight becomes ``K`` kernels. torch.fx finds such reads too, but only in models it
can trace and not inside the modules it treats as leaves; the probe sees what really ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from ..modes import training_mode
from .sites import ConvSite

#: Reading these from a conv's weight stays valid after the swap.
HARMLESS_PARAM_ATTRS = frozenset({"dtype", "device", "requires_grad", "is_cuda"})


def example_for(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    """A seeded batch-1 input of ``input_size`` in the model's dtype and device."""
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


def _getter(func: Any) -> str | None:
    """``'shape'`` for the getter of ``tensor.shape`` (and so on), else None."""
    if getattr(func, "__name__", None) != "__get__":
        return None
    return getattr(getattr(func, "__self__", None), "__name__", None)


def _describe_use(func: Any) -> str:
    getter = _getter(func)
    return f".{getter}" if getter else f" in {getattr(func, '__name__', func)}()"


def _tensor_args(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensors among a call's arguments, one level into lists (``torch.cat([...])``)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (item for item in value if isinstance(item, torch.Tensor))


class _ParamReadWatcher(TorchFunctionMode):
    """Marks a conv site whose weight or bias goes into a torch call outside its own forward."""

    def __init__(self, sites: list[ConvSite]) -> None:
        super().__init__()
        self.owner: dict[int, tuple[ConvSite, str]] = {}
        for site in sites:
            for attr in ("weight", "bias"):
                param = site.module._parameters.get(attr) if site.module is not None else None
                if param is not None:
                    self.owner[id(param)] = (site, attr)
        self.active: list[int] = []  # ids of the conv sites whose forward is running

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.owner and _getter(func) not in HARMLESS_PARAM_ATTRS:
            for value in _tensor_args(args, kwargs):
                hit = self.owner.get(id(value))
                if hit is None or id(hit[0]) in self.active or hit[0].param_use:
                    continue
                site, attr = hit
                use = f"{attr}{_describe_use(func)}"
                site.param_use = f"its {attr} is read outside its forward ({use})"
        return func(*args, **kwargs)


def probe(
    model: nn.Module,
    sites: list[ConvSite],
    example: torch.Tensor,
    graph: fx.Graph | None,
    functional: dict[fx.Node, ConvSite],
) -> list[ConvSite]:
    """One eval-mode forward with hooks; returns the conv modules in the order they ran."""
    order: list[ConvSite] = []
    counts: dict[int, int] = {}
    watcher = _ParamReadWatcher(sites)

    def enter(site: ConvSite):
        def push(module: nn.Module, args: tuple) -> None:
            watcher.active.append(id(site))

        return push

    def leave(site: ConvSite):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            watcher.active.remove(id(site))
            counts[id(site)] = counts.get(id(site), 0) + 1
            if id(site) not in {id(s) for s in order}:
                order.append(site)
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                site.input_shapes.append(_per_sample(args[0].shape, site.dims))
                site.output_shapes.append(_per_sample(output.shape, site.dims))
                if args[0] is example:
                    site.is_stem = True

        return record

    modules = [s for s in sites if s.module is not None]
    # First among the pre-hooks: a user's own pre-hook runs "inside" the conv's call.
    handles = [s.module.register_forward_pre_hook(enter(s), prepend=True) for s in modules]
    handles += [s.module.register_forward_hook(leave(s)) for s in modules]
    try:
        with training_mode(model, False), torch.no_grad(), watcher:
            if functional and graph is not None:
                _Recorder(fx.GraphModule(model, graph), functional).run(example)
            else:
                model(example)
    finally:
        for handle in handles:
            handle.remove()
    for site in sites:
        if site.module is not None:
            site.calls = counts.get(id(site), 0)
    return order


def clear_shapes(sites: list[ConvSite]) -> None:
    for site in sites:
        site.input_shapes.clear()
        site.output_shapes.clear()
