"""Pick the fastest strategy for one layer and input shape: measure once, then remember.

The first ``'auto'`` call of a layer for a given (layer geometry, input shape, memory
format, device, dtype, mode) times every eligible strategy, interleaved (a new seeded
order each round), and caches the fastest. In training mode (autograd records) a
candidate is its forward plus the memory-lean backward that goes with it
(``lean_backward.py``); in eval mode, the forward.
Later calls with the same key only look it up; layers of the same geometry share the entry.

Layers too small to be worth timing (fewer than ``SWITCHES.min_macs`` multiply-adds, by
default ``tuning.MIN_MACS``), runs with autotuning off (``DYNCONVERT_AUTOTUNE=0`` in the
environment, or :func:`set_autotune`) and ``torch.compile`` tracing use the fixed rules of
:func:`cost_model_choice` instead.
"""

from __future__ import annotations

import math
import random
import time
import weakref
from collections.abc import Callable, Mapping

import torch
from torch import nn

from . import prepacked, tuning
from .context import recording
from .layout import output_size
from .lean_backward import backward_kind, lean_forward
from .spec import DynamicConvSpec, Strategy
from .switches import SWITCHES

_cache: dict[tuple, str] = {}
# Each layer's last answer (see choose()), kept here, not on the layer, and weakly: it goes
# with the layer, and clear_cache() drops every one with the cache it came from.
_memos: weakref.WeakKeyDictionary[DynamicConvSpec, tuple[tuple, str, bool]] = (
    weakref.WeakKeyDictionary()
)
_stats = {"measurements": 0, "lookups": 0}


def set_autotune(enabled: bool, min_macs: int | None = None) -> None:
    """Switch measuring on or off (``DYNCONVERT_AUTOTUNE=0`` sets the default to off).

    ``min_macs``: layers with fewer multiply-adds per call use the cost model.
    """
    SWITCHES.autotune = bool(enabled)
    if min_macs is not None:
        SWITCHES.min_macs = int(min_macs)


def autotune_enabled() -> bool:
    return SWITCHES.autotune


def clear_cache() -> None:
    """Forget every measured choice and reset :func:`stats`."""
    _memos.clear()
    _cache.clear()
    _stats.update(measurements=0, lookups=0)


def cache() -> dict[tuple, str]:
    """A copy of the cache: key → chosen strategy."""
    return dict(_cache)


def stats() -> dict[str, int]:
    """``measurements``: timed strategy runs so far; ``lookups``: calls answered from the cache."""
    return dict(_stats)


def training_mode(layer: DynamicConvSpec, x: torch.Tensor) -> bool:
    """True when autograd records this layer's forward (its backward then counts too)."""
    return recording(x, layer.weight, layer.bias)


def cache_key(layer: DynamicConvSpec, x: torch.Tensor) -> tuple:
    channels_last = (
        x.dim() >= 4
        and not x.is_contiguous()
        and (
            x.is_contiguous(memory_format=torch.channels_last)
            if x.dim() == 4
            else x.is_contiguous(memory_format=torch.channels_last_3d)
        )
    )
    return (
        layer.dims,
        layer.k,
        layer.in_channels,
        layer.out_channels,
        layer.groups,
        layer.kernel_size,
        layer.stride,
        layer.conv_padding,
        layer.dilation,
        layer.bias is not None,
        tuple(x.shape),
        channels_last,
        x.device,
        x.dtype,
        training_mode(layer, x),
        training_mode(layer, x) and SWITCHES.lean_backward,  # which backward was timed
    )


def multiply_adds(layer: DynamicConvSpec, x: torch.Tensor) -> int:
    """Multiply-adds of the layer's conv for the (padded) input ``x``."""
    per_output = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    outputs = x.shape[0] * layer.out_channels * math.prod(output_size(layer, tuple(x.shape[2:])))
    return outputs * per_output


def cost_model_choice(layer: DynamicConvSpec, x: torch.Tensor) -> str:
    """Fixed rules, from the per-layer benchmark on CPU (``benchmarks/layers.py``).

    * batch 1: one plain conv with the mixed kernel (``dense``);
    * 1×1 convs and small maps: im2col + batched GEMM (``unfold``), whose inner dimension
      ``in/groups·|k|`` is long while the batch-folded conv runs B tiny convolutions;
    * depthwise and large maps: the batch-folded grouped conv.
    """
    batch = x.shape[0]
    if batch == 1:
        return "dense"
    per_group = layer.in_channels // layer.groups
    depthwise = layer.groups > 1 and per_group <= tuning.DEPTHWISE_MAX_CHANNELS_PER_GROUP
    if depthwise:
        return "grouped"
    pointwise = all(k == 1 for k in layer.kernel_size)
    out_len = math.prod(s // st for s, st in zip(x.shape[2:], layer.stride, strict=True))
    if pointwise or out_len <= tuning.UNFOLD_MAX_OUTPUTS:
        return "unfold"
    return "grouped"


class _WithoutParamHooks:
    """The layer, its weight and bias replaced by new leaves on the same storage.

    Timing a training candidate differentiates the parameters; on the layer's own ones that
    would run the user's gradient hooks (``weight.register_hook``) on every timed call.
    Everything else (geometry, conv function) is read from the layer.
    """

    def __init__(self, layer: DynamicConvSpec) -> None:
        self.layer = layer
        self.weight = nn.Parameter(layer.weight.detach(), layer.weight.requires_grad)
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach(), bias.requires_grad)

    def __getattr__(self, name: str) -> object:
        if name == "layer":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.layer, name)


def _runner(
    layer: DynamicConvSpec,
    x: torch.Tensor,
    attn: torch.Tensor,
    name: str,
    fn: Strategy,
    train: bool,
) -> Callable[[], object]:
    x, attn = x.detach(), attn.detach()
    if not train:

        def forward() -> object:
            with torch.no_grad():
                return fn(layer, x, attn)

        return forward
    backward = backward_kind(layer, name)
    layer = _WithoutParamHooks(layer)

    def forward_backward() -> object:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            ag = attn.detach().requires_grad_(True)
            if SWITCHES.lean_backward and name != "static":  # as dispatch.run does
                out = lean_forward(layer, xg, ag, fn, backward)
            else:  # time what will run: autograd through the strategy itself
                out = fn(layer, xg, ag)
            params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
            return torch.autograd.grad(out, [xg, ag, *params], torch.ones_like(out))

    return forward_backward


def measure(
    layer: DynamicConvSpec,
    x: torch.Tensor,
    attn: torch.Tensor,
    candidates: Mapping[str, Strategy],
    rounds: int = tuning.ROUNDS,
) -> dict[str, float]:
    """Best time (s) of each candidate over ``rounds`` interleaved rounds, after warm-up.

    The minimum, not the median: other processes only ever add time.
    """
    train = training_mode(layer, x)
    runners = {name: _runner(layer, x, attn, name, fn, train) for name, fn in candidates.items()}
    times: dict[str, float] = {}
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    # Warm-up, two passes: oneDNN primitives, caches, and glibc's mmap threshold, which only
    # rises when a larger block is freed. Until then a strategy whose output is a fresh
    # multi-MB block page-faults on every call (a depthwise grouped conv measured 3 ms, then
    # 0.27 ms once another candidate had run); a model's many layers settle it at once.
    for _ in range(2):
        for run in runners.values():
            run()
    order = list(runners.items())
    shuffle = random.Random(0).shuffle  # no candidate always runs after the same one
    for _ in range(rounds):
        shuffle(order)
        for name, run in order:
            # Back-to-back calls, the best one counts: a single call pays for the blocks
            # its predecessor freed (its multi-MB outputs may page-fault), which says
            # nothing about this candidate. In a model's first forward, with the process
            # still cold, single calls made the tuner pick `loop` for a depthwise conv that
            # `grouped` runs 1.6x faster (benchmarks/layers.py, mbv2_block at batch 32).
            for _ in range(tuning.CALLS_PER_SAMPLE):
                sync()
                start = time.perf_counter()
                run()
                sync()
                times[name] = min(times.get(name, math.inf), time.perf_counter() - start)
                _stats["measurements"] += 1
    return times


def _kernel_bytes(layer: DynamicConvSpec) -> int:
    return layer.weight.numel() * layer.weight.element_size()


def eligible(layer: DynamicConvSpec, x: torch.Tensor, strategies: Mapping[str, Strategy]):
    """The strategies worth timing for this call.

    Batch 1 times ``dense`` against the batched strategies too, eval included. Taking
    ``dense`` untimed in eval was 0-3% faster on a 32 MiB-L3 AMD EPYC, where a one-layer
    timing keeps kernels in cache that a whole model reads from memory; on a 480 MiB-L3 Xeon
    it made resnet50 at batch 1 ~15% slower than the timed picks (docs/performance.md,
    "Batch 1 on an Intel Xeon").
    """
    batch = x.shape[0]
    # `packed` only where it runs as itself (CPU inference), not as its `loop` fallback.
    packed_runs = prepacked.usable(layer, x, x.new_empty(0))
    if batch == 1 and x.device.type == "cpu":
        # It pays only where its saved kernel copy is large (ResNet-50 stage 3-4).
        packed_runs = packed_runs and _kernel_bytes(layer) >= tuning.PACKED_MIN_BYTES_AT_BATCH_1
    small_map = math.prod(output_size(layer, tuple(x.shape[2:]))) <= tuning.STATIC_MAX_OUTPUTS
    # On CUDA a layer this size is launch-bound and K convs cost about one: in the H200 table
    # (docs/performance.md) `static` was the fastest eval strategy on 56x56 maps it was
    # never timed on. Training keeps the rule: its K-times output is saved for backward.
    on_gpu_eval = x.device.type == "cuda" and not training_mode(layer, x)
    static_worth_it = on_gpu_eval or (batch >= 2 * layer.k and small_map)
    return {
        name: fn
        for name, fn in strategies.items()
        if not (name == "dense" and batch != 1)
        and (name != "static" or static_worth_it)
        and (name != "packed" or packed_runs)
    }


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def choose(layer: DynamicConvSpec, x: torch.Tensor, strategies: Mapping[str, Strategy]) -> str:
    """The cached or freshly measured fastest strategy (or the cost model's when tuning is off).

    Each layer remembers its last answer with the few facts it depends on (input shape,
    strides, dtype, device, mode and the switches), so a model run at a fixed shape skips
    building the full cache key: on small layers that Python is a visible share of a forward.
    """
    if torch.compiler.is_compiling():
        return cost_model_choice(layer, x)
    memo_key = (
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        training_mode(layer, x),
        SWITCHES.lean_backward,
        SWITCHES.autotune,
        SWITCHES.min_macs,
    )
    memo = _memos.get(layer)
    if memo is not None and memo[0] == memo_key:
        if memo[2]:
            _stats["lookups"] += 1
        return memo[1]
    if not SWITCHES.autotune or multiply_adds(layer, x) < SWITCHES.min_macs:
        name = cost_model_choice(layer, x)
        _memos[layer] = (memo_key, name, False)
        return name
    key = cache_key(layer, x)
    name = _cache.get(key)
    if name is not None:
        _stats["lookups"] += 1
        _memos[layer] = (memo_key, name, True)
        return name
    candidates = eligible(layer, x, strategies)
    if len(candidates) == 1:
        name = next(iter(candidates))
    else:
        # Stand-in attention: its values do not change the cost.
        attn = torch.full((x.shape[0], layer.k), 1.0 / layer.k, device=x.device, dtype=x.dtype)
        # The tuner's own forward/backward graphs are not the caller's: hooks on saved tensors
        # (a non-reentrant checkpoint counts them, to compare with its recomputation, which
        # finds the choice cached) must not see them; the innermost hooks are the ones used.
        with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
            times = measure(layer, x, attn, candidates)
        name = min(times, key=times.__getitem__)
        if name != "packed":
            prepacked.forget(layer)  # timing packed its kernels; free that memory
    _cache[key] = name
    _memos[layer] = (memo_key, name, True)
    return name
