"""Dynamic convolution: K kernels per layer, mixed per sample by a small attention branch.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020.

``DynamicConv1d/2d/3d`` take every argument of ``nn.Conv1d/2d/3d`` (tuples, ``'same'``,
padding modes, dilation, groups, bias, ``device``/``dtype``) plus ``k``, the router's
``ratio`` and ``temperature``, and the router's class (``router=``, see ``routers.py``).
:meth:`DynamicConvNd.from_conv` starts the layer exactly where a trained conv was (see
``start.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import engine
from ..engine import STRATEGIES, graph_capture, output_memory_format
from .geometry import check_k, conv_geometry, is_unbatched
from .padding import ResolvedPadding, ntuple, resolve_padding
from .routers import Router, SoftmaxRouter
from .start import StartFn, zero_sum_kernels

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class DynamicConvNd(nn.Module):
    """Base class of :class:`DynamicConv1d`, :class:`DynamicConv2d`, :class:`DynamicConv3d`.

    Parameters: ``weight`` ``(K, out, in/groups, *kernel)``, ``bias`` ``(K, out)`` or None,
    and the router under the name ``attention`` (a :class:`~.routers.Router`, by default
    :class:`~.routers.SoftmaxRouter`, whose ``temperature`` buffer is part of the state dict).
    Callers reach the router through :attr:`router` and the methods below, never its layers.

    ``strategy`` picks how the per-sample kernels are applied (see ``engine/strategies.py``):
    ``'auto'`` (default) chooses by shape and mode; any name in ``STRATEGIES`` forces one.
    """

    dims: ClassVar[int]
    conv_type: ClassVar[type[nn.Module]]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        k: int = 4,
        ratio: float = 0.25,
        temperature: float = 1.0,
        strategy: str = "auto",
        router: type[Router] = SoftmaxRouter,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = self.dims
        self.k = check_k(k)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = conv_geometry(
            n, in_channels, out_channels, groups, kernel_size, stride, dilation
        )
        self.padding = padding if isinstance(padding, str) else ntuple(padding, n, "padding")
        self.padding_mode = padding_mode
        self._resolved: ResolvedPadding = resolve_padding(
            padding, padding_mode, self.kernel_size, self.stride, self.dilation
        )
        self.strategy = strategy  # validated by the setter

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty((k, out_channels, in_channels // groups, *self.kernel_size), **factory)
        )
        self.bias = nn.Parameter(torch.empty((k, out_channels), **factory)) if bias else None
        self.attention = router(in_channels, k, ratio, temperature, **factory)
        self.reset_parameters()

    # -- construction -------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each kernel gets ``nn.ConvNd``'s own init; the router starts constant."""
        fan_in = self.weight[0, 0].numel()
        for kernel in self.weight:
            nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self.attention.reset()

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        k: int = 4,
        *,
        ratio: float = 0.25,
        temperature: float = 1.0,
        noise: float = 0.01,
        strategy: str = "auto",
        generator: torch.Generator | None = None,
        router: type[Router] = SoftmaxRouter,
        start: StartFn | None = None,
    ) -> DynamicConvNd:
        """A dynamic layer that computes exactly what ``conv`` computes, until it is trained.

        The router's logit layer is zero, so attention is uniform, and the K kernels are
        ``conv.weight`` plus a zero-sum perturbation (:func:`zero_sum_kernels`): the mixed
        kernel is ``conv.weight`` while the router's gradient is non-zero. Device, dtype and
        ``requires_grad`` follow ``conv``; the router trains iff ``conv.weight`` does.
        ``router`` and ``start`` (default :meth:`start_from`) belong together: ``start``
        makes the kernels exact under the router's start weights.

        Only exact ``nn.Conv1d/2d/3d`` (or subclasses that keep their ``forward``) are
        accepted: a subclass that overrides ``forward`` computes something else.
        """
        check_k(k)
        target = cls._target_for(conv)
        weight = conv.weight
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError("conv: lazy conv is not initialised yet; run one forward first")
        layer = target(
            **target._arguments_of(conv),
            k=k,
            ratio=ratio,
            temperature=temperature,
            strategy=strategy,
            router=router,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.start_as(conv, noise, generator, start)
        layer._carry_from(conv)
        return layer

    # The three steps of from_conv that a dynamic layer for another source type overrides.

    @classmethod
    def _target_for(cls, conv: nn.Module) -> type[DynamicConvNd]:
        """The class that rebuilds ``conv`` exactly; a TypeError says why ``conv`` is refused."""
        target = cls._class_for(conv)
        for method in ("forward", "_conv_forward"):
            if getattr(type(conv), method) is not getattr(target.conv_type, method):
                raise TypeError(
                    f"conv: {type(conv).__name__} overrides {method}(); converting it would "
                    "change what it computes"
                )
        return target

    @classmethod
    def _arguments_of(cls, conv: nn.Module) -> dict[str, Any]:
        """The constructor arguments that give ``conv``'s geometry."""
        return {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": conv.kernel_size,
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
        }

    def _carry_from(self, conv: nn.Module) -> None:
        """Copy what the source conv holds beyond its weight and bias (nothing here)."""

    @torch.no_grad()
    def to_conv(self) -> nn.Module:
        """The static conv this layer computes under constant routing (the router's start
        weights; the mean of the K kernels for a softmax router).

        The inverse of :meth:`from_conv` (the zero-sum perturbation averages out); the
        conv keeps the layer's device, dtype and train/eval mode.
        """
        conv = self._static_conv(device=self.weight.device, dtype=self.weight.dtype)
        self.copy_constant_mix(conv)
        return conv.train(self.training)

    def copy_constant_mix(self, conv: nn.Module) -> None:
        """Set ``conv``'s weight and bias to this layer's kernels under constant routing."""
        conv.weight.copy_(self.attention.constant_mix(self.weight))
        if self.bias is not None:
            conv.bias.copy_(self.attention.constant_mix(self.bias))

    def _static_conv(self, **factory: Any) -> nn.Module:
        return self.conv_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            **factory,
        )

    def start_as(
        self,
        conv: nn.Module,
        noise: float,
        generator: torch.Generator | None = None,
        start: StartFn | None = None,
    ) -> None:
        """The exact start from ``conv``: ``start`` (a variant's), else :meth:`start_from`."""
        if start is None:
            self.start_from(conv, noise, generator)
        else:
            start(self, conv, noise, generator)

    @torch.no_grad()
    def start_from(
        self, conv: nn.Module, noise: float, generator: torch.Generator | None = None
    ) -> None:
        """Copy a trained conv into the K kernels (zero-sum perturbed) and carry its flags."""
        weight = conv.weight
        self.weight.copy_(zero_sum_kernels(weight, self.k, noise, generator))
        if conv.bias is not None:
            self.bias.copy_(conv.bias.detach().expand(self.k, -1))
            self.bias.requires_grad_(conv.bias.requires_grad)
        self.weight.requires_grad_(weight.requires_grad)
        self.attention.requires_grad_(weight.requires_grad)
        self.train(conv.training)

    @classmethod
    def _class_for(cls, conv: nn.Module) -> type[DynamicConvNd]:
        candidates = [cls] if cls is not DynamicConvNd else DynamicConvNd.__subclasses__()
        for candidate in candidates:
            if getattr(candidate, "conv_type", None) and isinstance(conv, candidate.conv_type):
                return candidate
        expected = " or ".join(c.conv_type.__name__ for c in candidates if hasattr(c, "conv_type"))
        raise TypeError(f"conv: expected an nn.{expected}, got {type(conv).__name__}")

    # -- state --------------------------------------------------------------------------

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, name: str) -> None:
        if name != "auto" and name not in STRATEGIES:
            choices = ", ".join(["auto", *STRATEGIES])
            raise ValueError(f"strategy: expected one of {choices}, got {name!r}")
        self._strategy = name

    # -- the router, through its protocol ----------------------------------------------

    @property
    def router(self) -> Router:
        """The router (registered as ``attention``: that name is in saved state dicts)."""
        return self.attention

    def router_parameters(self) -> Iterator[nn.Parameter]:
        return self.attention.parameters()

    def kernel_parameters(self) -> list[nn.Parameter]:
        """The K kernels and, when there is one, their K biases."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """The routing weights ``(B, K)`` of a batched input ``(B, C, *spatial)``."""
        return self.attention(x)

    def register_routing_hook(self, hook: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call ``hook(weights)`` with the ``(B, K)`` routing weights of every forward."""
        return self.attention.register_forward_hook(lambda module, inputs, out: hook(out))

    @property
    def has_temperature(self) -> bool:
        return self.attention.has_temperature

    @property
    def temperature(self) -> float:
        if not self.attention.has_temperature:
            raise self.attention.no_temperature()
        return float(self.attention.temperature)

    def set_temperature(self, value: float) -> None:
        self.attention.set_temperature(value)

    @property
    def conv_fn(self):
        return _CONV_FNS[self.dims]

    @property
    def conv_padding(self) -> tuple[int, ...]:
        return self._resolved.conv_padding

    # -- forward ------------------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to(memory_format=channels_last) converts every 4-D and 5-D tensor, and the
        # K kernels have one more dim than a conv's weight (a 5-D tensor cannot be channels
        # last). Their layout does not matter, as each sample's kernel is mixed afresh: they
        # get the conversion a static conv's weight would get, then their own layout back.
        shape = self.weight.shape

        def kernels_as_one_conv_weight(t: torch.Tensor) -> torch.Tensor:
            if t.shape != shape:
                return fn(t)
            return fn(t.flatten(0, 1)).contiguous().unflatten(0, shape[:2])

        return super()._apply(kernels_as_one_conv_weight, recurse)

    def _check_input(self, x: torch.Tensor) -> bool:
        """Validate rank and channels; returns True for an unbatched input."""
        return is_unbatched(x, self.dims, self.in_channels, type(self).__name__)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the conv itself sees (non-zero padding modes pad explicitly)."""
        if self._resolved.pad is not None:
            x = F.pad(x, self._resolved.pad, mode=self._resolved.pad_mode)
        return x

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        unbatched = self._check_input(input)
        x = input.unsqueeze(0) if unbatched else input
        # (not while a graph is recorded: the branch would be baked in; static handles 0)
        if not graph_capture() and x.shape[0] == 0:
            out = self._empty_output(self.pad_input(x))
        else:
            attn = self.attention(x)
            x = self.pad_input(x)
            layout = output_memory_format(x)  # of the padded input, as for nn.Conv2d's own pad
            out = self.conv_output(x, attn).contiguous(memory_format=layout)
        return out.squeeze(0) if unbatched else out

    def conv_output(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The dynamic conv of the padded input ``x`` for attention ``(B, K)``."""
        return engine.run(self, x, attn)

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of 0 has no attention to mix by: the conv's empty output, kept in the graph."""
        bias = None if self.bias is None else self.bias[0]
        out = self.conv_fn(
            x, self.weight[0], bias, self.stride, self.conv_padding, self.dilation, self.groups
        )
        return out.contiguous(memory_format=output_memory_format(x))

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, k={self.k}"
        )
        if self.padding != (0,) * self.dims:
            s += f", padding={self.padding!r}"
        if self.dilation != (1,) * self.dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.strategy != "auto":
            s += f", strategy={self.strategy!r}"
        return s


class DynamicConv1d(DynamicConvNd):
    """Dynamic version of ``nn.Conv1d``; see :class:`DynamicConvNd`."""

    dims = 1
    conv_type = nn.Conv1d


class DynamicConv2d(DynamicConvNd):
    """Dynamic version of ``nn.Conv2d``; see :class:`DynamicConvNd`."""

    dims = 2
    conv_type = nn.Conv2d


class DynamicConv3d(DynamicConvNd):
    """Dynamic version of ``nn.Conv3d``; see :class:`DynamicConvNd`."""

    dims = 3
    conv_type = nn.Conv3d
