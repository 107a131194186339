"""The ``packed`` strategy: per-sample convs whose kernels are mixed in oneDNN's own layout.

On CPU, every ``F.conv2d`` call first copies its plain ``(O, I, kh, kw)`` kernel into
oneDNN's blocked layout, then convolves. A static conv pays that copy once per batch; B
per-sample convs, each with its own mixed kernel, pay it B times, and at batch 8 on
ResNet-50's stage 3–4 shapes that copy, not the lost weight reuse, is most of their extra
cost (``benchmarks/weight_reorder.py``).

The layout change is a permutation plus zero padding, so it commutes with mixing:
``Σ_k a_k·pack(W_k) = pack(Σ_k a_k·W_k)``. This strategy packs the K kernels once (per
weight version and input shape), mixes each sample's kernel directly in the blocked layout
and hands oneDNN a kernel it uses as is (``torch.ops.mkldnn._convolution_pointwise``, the
op ``torch.compile`` uses for frozen weights).

It is an inference path: CPU, float32, 2-D convs, autograd not recording. The packed
kernels cost K times the layer's weight memory until the weights change or :func:`forget`
drops them; elsewhere (and when oneDNN is missing) the strategy runs ``loop``, which
computes the same thing with plain kernels.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from dataclasses import dataclass

import torch

from . import tuning
from .context import recording
from .direct import loop
from .layout import output_memory_format
from .mixing import mix_bias, mix_one_into
from .spec import DynamicConvSpec

# Keyed on the layer itself, weakly: a layer's packs go when the layer goes.
_packs: weakref.WeakKeyDictionary[DynamicConvSpec, dict[tuple, _Pack]] = weakref.WeakKeyDictionary()
_local = threading.local()
_stats = {"packs": 0}
_verified: dict[tuple, bool] = {}  # geometry → oneDNN's prepacked conv is right for it


@dataclass
class _Pack:
    """The K kernels of one layer, in the blocked layout oneDNN wants for one input shape."""

    weight_version: tuple[int, int, int]  # (id, data_ptr, _version): new or edited → repack
    sample: torch.Tensor  # a few weight values: an edit through .data → repack
    kernels: torch.Tensor  # (K, n) dense view of the blocked bytes, one row per kernel


def _mkldnn_ops_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_convolution_weight  # noqa: B018
        torch.ops.mkldnn._convolution_pointwise  # noqa: B018
        torch.ops.mkldnn.data_ptr  # noqa: B018
        torch.ops.mkldnn._nbytes  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


_AVAILABLE = _mkldnn_ops_available()


def available() -> bool:
    """Whether this PyTorch build has the oneDNN ops ``packed`` needs."""
    return _AVAILABLE


def usable(layer: DynamicConvSpec, x: torch.Tensor, attn: torch.Tensor) -> bool:
    """Whether ``packed`` runs as itself here (else it runs ``loop``)."""
    return (
        _AVAILABLE
        and torch.backends.mkldnn.enabled
        and layer.dims == 2
        # A kernel tensor computed in each forward (weight-standardized convs) would be
        # repacked on every call: the cache below is keyed on the parameter.
        and isinstance(layer.weight, torch.nn.Parameter)
        and x.device.type == "cpu"
        and x.dtype == layer.weight.dtype == attn.dtype == torch.float32
        and not recording(x, layer.weight, attn, layer.bias)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _dense_view(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of an opaque mkldnn tensor as a flat dense tensor (no copy).

    The view does not own the memory: keep ``packed`` alive while it is used.
    """
    nbytes = torch.ops.mkldnn._nbytes(packed)
    raw = (ctypes.c_char * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(raw, dtype=dtype)


def _conv_args(layer: DynamicConvSpec, input_size: tuple[int, ...]) -> tuple:
    return (
        list(layer.conv_padding),
        list(layer.stride),
        list(layer.dilation),
        layer.groups,
        list(input_size),
    )


def _packed_kernels(layer: DynamicConvSpec, input_size: tuple[int, ...]) -> torch.Tensor:
    """The layer's K kernels in blocked layout for ``input_size``, packed once per weight."""
    weight = layer.weight
    version = (id(weight), weight.data_ptr(), weight._version)
    sample = _weight_sample(weight)
    per_layer = _packs.setdefault(layer, {})
    pack = per_layer.get(input_size)
    if pack is None or pack.weight_version != version or not torch.equal(pack.sample, sample):
        args = _conv_args(layer, input_size)
        with torch.inference_mode(False):  # kept across calls: never an inference tensor
            detached = weight.detach()
            blocked = [torch.ops.mkldnn._reorder_convolution_weight(w, *args) for w in detached]
            # One (K, n) block, so that mixing streams over contiguous rows.
            kernels = torch.stack([_dense_view(b, weight.dtype) for b in blocked])
        per_layer.pop(input_size, None)
        while len(per_layer) >= tuning.MAX_PACKS_PER_LAYER:  # bounded memory under varying shapes
            per_layer.pop(next(iter(per_layer)))
        pack = per_layer[input_size] = _Pack(version, sample, kernels)
        _stats["packs"] += 1
    return pack.kernels


_sample_positions: dict[tuple[int, torch.device], torch.Tensor] = {}


def _weight_sample(weight: torch.Tensor) -> torch.Tensor:
    """``tuning.SAMPLED_ELEMENTS`` scattered elements of the kernels: an edit through
    ``.data`` shows in them."""
    flat = weight.detach().reshape(-1)
    key = (flat.numel(), flat.device)
    positions = _sample_positions.get(key)
    if positions is None:
        generator = torch.Generator().manual_seed(flat.numel())
        chosen = torch.randint(flat.numel(), (tuning.SAMPLED_ELEMENTS,), generator=generator)
        positions = _sample_positions[key] = chosen.to(flat.device)
    return flat[positions]  # a gather: a new tensor, not a view


def _geometry(layer: DynamicConvSpec, input_size: tuple[int, ...]) -> tuple:
    """What the blocked layout depends on: kernel shape, dtype, conv arguments, input shape."""
    weight = layer.weight
    return (
        tuple(weight.shape[1:]),
        weight.dtype,
        tuple(layer.conv_padding),
        tuple(layer.stride),
        tuple(layer.dilation),
        layer.groups,
        input_size,
    )


def _target(
    layer: DynamicConvSpec, input_size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """An mkldnn kernel tensor of the right blocked layout and its dense view.

    Each sample's mixed kernel is written into it before its conv. Layers of one geometry
    and input shape share it (per thread), as they share one blocked layout.
    """
    targets = getattr(_local, "targets", None)
    if targets is None:
        targets = _local.targets = {}
    args = _conv_args(layer, input_size)
    key = _geometry(layer, input_size)
    entry = targets.get(key)
    if entry is None:
        with torch.inference_mode(False):  # kept across calls: never an inference tensor
            like = layer.weight.detach()[0]
            blocked = torch.ops.mkldnn._reorder_convolution_weight(like, *args)
            entry = targets[key] = (blocked, _dense_view(blocked, like.dtype))
    return entry


def _geometry_works(layer: DynamicConvSpec, x: torch.Tensor, key: tuple) -> bool:
    """Whether oneDNN's prepacked conv computes ``F.conv2d`` for this geometry (checked once).

    It does not always: for a 1→1 channel (2, 4) kernel with stride (1, 3) and padding 1 on
    a 2×4 map, torch 2.14.1 returns the third of three outputs in place of the second,
    every time, while the same call with the plain kernel is right (found by the property
    tests). So each new geometry is compared against the plain conv on the layer's first
    kernel and the real input, and falls back to ``loop`` if it differs.
    """
    verdict = _verified.get(key)
    if verdict is None:
        args = _conv_args(layer, key[-1])
        padding, stride, dilation, groups, _ = args
        kernel = layer.weight.detach()[0]
        blocked = torch.ops.mkldnn._reorder_convolution_weight(kernel, *args)
        probe = x[:1]
        got = torch.ops.mkldnn._convolution_pointwise(
            probe, blocked, None, padding, stride, dilation, groups, "none", [], ""
        )
        want = layer.conv_fn(probe, kernel, None, layer.stride, layer.conv_padding,
                             layer.dilation, layer.groups)  # fmt: skip
        scale = want.abs().max().item() + 1e-12
        verdict = _verified[key] = bool((got - want).abs().max().item() <= 1e-4 * scale)
    return verdict


def packed_conv(layer: DynamicConvSpec, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``y_b = conv(x_b, Σ_k a_bk W_k) + Σ_k a_bk c_k`` with kernels mixed in blocked layout."""
    input_size = (1, *x.shape[1:])
    if not usable(layer, x, attn) or not _geometry_works(layer, x, _geometry(layer, input_size)):
        return loop(layer, x, attn)
    kernels = _packed_kernels(layer, input_size)
    target, flat = _target(layer, input_size)
    padding, stride, dilation, groups = _conv_args(layer, input_size)[:4]
    # The bias is added afterwards: oneDNN's prepacked conv with a bias crashes the process
    # (SIGSEGV, torch 2.14.1) where stride and dilation leave output columns that read only
    # padding, and a crash cannot be checked for the way _geometry_works checks values.
    outs = []
    for i, coeffs in enumerate(attn.tolist()):
        mix_one_into(kernels, coeffs, flat)  # streamed, straight into oneDNN's kernel
        outs.append(
            torch.ops.mkldnn._convolution_pointwise(
                x[i : i + 1], target, None, padding, stride, dilation, groups, "none", [], ""
            )
        )
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    bias = mix_bias(layer.bias, attn)
    if bias is not None:
        out += bias.view(*bias.shape, 1, 1)
    # oneDNN hands back channels_last; the result keeps the input's memory format, as
    # nn.Conv2d's does.
    return out.contiguous(memory_format=output_memory_format(x))


def forget(layer: DynamicConvSpec | None = None) -> None:
    """Drop the packed kernels of ``layer`` (of every layer when None) and this thread's targets."""
    if layer is None:
        _packs.clear()
        _verified.clear()
        getattr(_local, "targets", {}).clear()
    else:
        _packs.pop(layer, None)


def held_bytes() -> int:
    """Bytes held by packed kernels (all layers)."""
    return sum(
        p.kernels.numel() * p.kernels.element_size()
        for per_layer in list(_packs.values())
        for p in per_layer.values()
    )


def stats() -> dict[str, int]:
    """``packs``: how many times a layer's K kernels were packed."""
    return dict(_stats)
