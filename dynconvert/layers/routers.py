"""Routers: the branch of a dynamic convolution that maps an input to its kernel weights.

A router is an ``nn.Module`` that maps an input batch ``(B, C, *spatial)`` to routing weights
``(B, K)``, one per kernel, and declares its **normaliser**, which says what those weights
are:

* ``"softmax"``: a distribution over the K kernels at a temperature (Chen et al., "Dynamic
  Convolution: Attention over Convolution Kernels", CVPR 2020, §3.2); the temperature is a
  buffer, saved with the model and annealed from outside (:meth:`Router.set_temperature`);
* ``"sigmoid"``: an independent weight in (0, 1) per kernel, with no temperature (Yang et
  al., "CondConv: Conditionally Parameterized Convolutions", NeurIPS 2019).

Callers outside ``layers/`` use the protocol (:meth:`~Router.reset`, :meth:`~Router.seed`,
:attr:`~Router.width`, :meth:`~Router.at_start`, :meth:`~Router.start_weights`,
:meth:`~Router.constant_mix`, :meth:`~Router.kernel_shares`), never a router's own layers.

:class:`PooledRouter` is the paper's branch, global average pool → FC (reduce) → ReLU → FC
(K logits), with no normaliser of its own; :class:`SoftmaxRouter` is that branch with the
softmax, the router of every dynamic layer so far. Unlike the paper's squeeze-and-excitation
branch there is no BatchNorm, so batch size 1 trains and eval equals train mode.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

#: What each normaliser implies: (its weights sum to one, it has a temperature).
NORMALISERS: dict[str, tuple[bool, bool]] = {"softmax": (True, True), "sigmoid": (False, False)}


def router_width(in_channels: int, ratio: float, min_width: int = 4) -> int:
    """Router width: ``ratio`` of the input channels, never below ``min_width``."""
    return max(min_width, round(in_channels * ratio))


class Router(nn.Module):
    """The protocol every router follows; subclasses declare :attr:`normaliser`.

    A subclass implements ``forward`` (input → ``(B, K)`` weights), :meth:`normalise`,
    :meth:`reset`, :meth:`seed`, :attr:`width` and :meth:`at_start`. ``num_kernels`` is K
    (not ``k``: module attributes named ``k`` are part of a saved file's architecture record).
    """

    normaliser: ClassVar[str]
    num_kernels: int

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("normaliser")
        if declared is not None and declared not in NORMALISERS:
            raise TypeError(
                f"{cls.__name__}.normaliser: expected one of {sorted(NORMALISERS)}, got "
                f"{declared!r}"
            )

    @property
    def sums_to_one(self) -> bool:
        """Whether the weights of each sample sum to one (a BatchNorm folds in only then)."""
        return NORMALISERS[self.normaliser][0]

    @property
    def has_temperature(self) -> bool:
        return NORMALISERS[self.normaliser][1]

    def normalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Routing weights ``(B, K)`` from logits ``(B, K)``."""
        raise NotImplementedError

    def reset(self) -> None:
        """The exact start: the final layer zero, so routing is :meth:`start_weights`."""
        raise NotImplementedError

    def seed(self, generator: torch.Generator | None) -> None:
        """Redraw every layer but the final one from ``generator`` (the final one stays)."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """The hidden size (what a conversion's ``ratio`` sets)."""
        raise NotImplementedError

    def at_start(self) -> bool:
        """Whether the router still routes as at the start (its final layer is zero)."""
        raise NotImplementedError

    def set_temperature(self, value: float) -> None:
        raise self.no_temperature()

    def no_temperature(self) -> TypeError:
        """The error for asking a router without a temperature for one."""
        return TypeError(
            f"temperature: a {self.normaliser} router ({type(self).__name__}) has no temperature"
        )

    def start_weights(self) -> torch.Tensor:
        """``(K,)``: the weights every input gets at the start (1/K softmax, 0.5 sigmoid)."""
        anchor = next(self.parameters(), None)
        factory = {} if anchor is None else {"device": anchor.device, "dtype": anchor.dtype}
        return self.normalise(torch.zeros(1, self.num_kernels, **factory))[0]

    def constant_mix(self, stacked: torch.Tensor) -> torch.Tensor:
        """What K stacked tensors ``(K, ...)`` mix to under :meth:`start_weights`."""
        weights = self.start_weights().to(stacked.dtype)
        return torch.tensordot(weights, stacked, dims=1)

    def kernel_shares(self, weights: torch.Tensor) -> torch.Tensor:
        """Each kernel's share of the mix, ``(B, K)`` rows summing to one."""
        if self.sums_to_one:
            return weights
        return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)


class PooledRouter(Router):
    """The paper's branch: global average pool → FC (reduce) → ReLU → FC (K logits).

    A subclass declares the normaliser and implements :meth:`normalise`. ``temperature``
    is used only by a normaliser that has one.
    """

    def __init__(
        self,
        in_channels: int,
        k: int,
        ratio: float = 0.25,
        temperature: float = 1.0,
        *,
        min_width: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not ratio > 0:
            raise ValueError(f"ratio: must be > 0, got {ratio!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_kernels = k
        hidden = router_width(in_channels, ratio, min_width)
        self.fc1 = nn.Linear(in_channels, hidden, **factory)
        self.fc2 = nn.Linear(hidden, k, **factory)
        if self.has_temperature:
            self.register_buffer("temperature", torch.empty((), **factory))
            self.set_temperature(temperature)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    @torch.no_grad()
    def seed(self, generator: torch.Generator | None) -> None:
        """Redraw ``fc1`` with ``nn.Linear``'s own init, from ``generator``."""
        fc1 = self.fc1
        if fc1.weight.is_meta:
            return  # nothing to draw into; the real weights come with load_state_dict
        # Drawn on the generator's device (CPU) and copied: a CPU generator cannot fill a CUDA
        # tensor, and the same seed then gives the same router on every device.
        where = generator.device if generator is not None else torch.device("cpu")
        weight = torch.empty(fc1.weight.shape, dtype=fc1.weight.dtype, device=where)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        fc1.weight.copy_(weight)
        if fc1.bias is not None:
            bound = 1 / math.sqrt(fc1.in_features)
            bias = torch.empty(fc1.bias.shape, dtype=fc1.bias.dtype, device=where)
            fc1.bias.copy_(nn.init.uniform_(bias, -bound, bound, generator=generator))

    @property
    def width(self) -> int:
        return self.fc1.out_features

    def at_start(self) -> bool:
        return not (self.fc2.weight.count_nonzero() or self.fc2.bias.count_nonzero())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=tuple(range(2, x.dim())))
        return self.fc2(F.relu(self.fc1(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.logits(x))


class SoftmaxRouter(PooledRouter):
    """Kernel weights ``(B, K)`` that sum to 1: ``softmax(logits / temperature)``.

    Its state-dict keys (``fc1.*``, ``fc2.*``, ``temperature``) are those of the
    ``KernelAttention`` of earlier versions, so files saved then still load.
    """

    normaliser = "softmax"

    @torch.no_grad()
    def set_temperature(self, value: float) -> None:
        value = float(value)
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"temperature: must be a finite number > 0, got {value!r}")
        stored = torch.tensor(value, dtype=self.temperature.dtype)
        if not (stored > 0 and torch.isfinite(stored)):
            raise ValueError(
                f"temperature: {value!r} is {stored.item()} in {self.temperature.dtype}; "
                "pick a value that dtype can hold"
            )
        self.temperature.fill_(value)

    def normalise(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # inline: one call less per layer
        return torch.softmax(self.logits(x) / self.temperature, dim=1)

    def constant_mix(self, stacked: torch.Tensor) -> torch.Tensor:
        """The mean: what uniform 1/K weights give, without 1/K's rounding."""
        return stacked.mean(0)


#: The name of :class:`SoftmaxRouter` before routers had a protocol.
KernelAttention = SoftmaxRouter
