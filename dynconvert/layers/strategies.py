"""Ways to compute ``y_b = conv(x_b, Σ_k a_bk·W_k) + Σ_k a_bk·b_k`` for a batch.

They are numerically the same function; they differ in speed, memory and in what a graph
exporter can express. Each strategy takes the layer, the already padded input and the
attention ``(B, K)``. :func:`select_strategy` is the seam where the layer picks one; a user
can force a name with ``strategy=``.

* ``grouped``: batch-folded grouped conv, the per-sample training path. The B mixed kernels
  become one conv with ``groups = B·groups``.
* ``loop``: one dense conv per sample with its own mixed kernel (on CPU mixed just before
  its conv, into a cache-resident buffer).
* ``dense``: batch size 1 only; mix once and run one plain conv.
* ``unfold``: im2col + batched GEMM (no im2col for 1×1 convs); see ``unfold.py``.
* ``packed``: ``loop`` with the K kernels kept, and mixed, in oneDNN's blocked layout, so
  the per-sample convs skip the kernel copy oneDNN makes on every call (CPU inference;
  elsewhere it runs ``loop``); see ``prepacked.py``.
* ``static``: export path. Convolution is linear in the kernel, so
  ``conv(x, Σ a_k W_k) = Σ a_k conv(x, W_k)``: one conv with the K kernels stacked on the
  output axis, then a weighted sum. No shape depends on the batch size, so ONNX and
  ``torch.export`` keep a dynamic batch dimension.

``'auto'`` measures the eligible strategies once per layer geometry and input shape and
caches the fastest (``autotune.py``; switch off with ``DYNCONVERT_AUTOTUNE=0``). When
autograd records, :func:`run_strategy` wraps the strategy in the memory-lean backward
(``lean_backward.py``), which recomputes the mixed kernels instead of saving them (switch
off with ``DYNCONVERT_LEAN_BACKWARD=0`` or ``lean_backward.set_lean_backward``). Large
temporaries that autograd does not see live in reused buffers (``workspace.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import autotune
from .lean_backward import (
    backward_kind,
    func_transforms_active,
    lean_backward_enabled,
    lean_forward,
)
from .prepacked import packed_conv
from .unfold import unfold_conv
from .workspace import recording, scratch

if TYPE_CHECKING:
    from .dynamic_conv import DynamicConvNd

Strategy = Callable[["DynamicConvNd", torch.Tensor, torch.Tensor], torch.Tensor]


#: Mixed kernels smaller than this are allocated, not written into the scratch buffer.
SCRATCH_MIN_BYTES = 2**20


def mix_kernels(weight: torch.Tensor, attn: torch.Tensor, *, reuse: bool = False) -> torch.Tensor:
    """``(K, O, I, *k)`` kernels and ``(B, K)`` attention → ``(B, O, I, *k)`` mixed kernels.

    ``reuse`` writes them into the shared scratch buffer (only where autograd does not
    record, and only for use before the layer returns).
    """
    batch, flat = attn.shape[0], weight.flatten(1)
    # Under autocast the product comes out in the low-precision dtype: no out= buffer then.
    # Small products come from the allocator's free lists faster than through out=.
    if (
        reuse
        and batch * flat.shape[1] * flat.element_size() >= SCRATCH_MIN_BYTES
        and attn.dtype == weight.dtype
        and not torch.is_autocast_enabled(weight.device.type)
    ):
        out = scratch("kernels", (batch, flat.shape[1]), weight)
        torch.mm(attn, flat, out=out)
        return out.view(batch, *weight.shape[1:])
    return (attn @ flat).view(batch, *weight.shape[1:])


#: Per-sample streamed mixing (see :func:`_loop`) for K kernels of at least ``MIN`` bytes
#: (below, the K+1 calls cost more than the bandwidth they save over one GEMM) and, at batch
#: sizes above 1, at most ``MAX`` bytes, so that re-reading them for each sample hits the
#: last-level cache.
STREAM_MIX_MIN_BYTES = 2 * 2**20
STREAM_MIX_MAX_BYTES = 16 * 2**20


def _streams(layer: DynamicConvNd, x: torch.Tensor, attn: torch.Tensor, reuse: bool) -> bool:
    """Whether :func:`_loop` mixes each sample's kernel just before its conv (CPU only)."""
    weight = layer.weight
    size = weight.numel() * weight.element_size()
    return (
        reuse
        and x.device.type == "cpu"
        and size >= STREAM_MIX_MIN_BYTES
        and (x.shape[0] == 1 or size <= STREAM_MIX_MAX_BYTES)
        and attn.dtype == weight.dtype
        and not torch.is_autocast_enabled("cpu")
    )


def _mix_one_into(weight: torch.Tensor, coeffs: list[float], out: torch.Tensor) -> torch.Tensor:
    """``out = Σ_k coeffs[k]·weight[k]``: one streaming pass over each kernel.

    On CPU this runs at the memory bandwidth, about 1.3x faster than the ``(1, K) @ (K, |W|)``
    product, whose M=1 GEMM does not; ``out`` is one kernel, small enough to stay in cache
    for the conv that reads it next.
    """
    torch.mul(weight[0], coeffs[0], out=out)
    for kernel, coeff in zip(weight[1:], coeffs[1:], strict=True):
        out.add_(kernel, alpha=coeff)
    return out


def mix_bias(bias: torch.Tensor | None, attn: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else attn @ bias


def _grouped(layer: DynamicConvNd, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    reuse = not recording(x, layer.weight, attn, layer.bias)
    weight = mix_kernels(layer.weight, attn, reuse=reuse).flatten(0, 1)
    bias = mix_bias(layer.bias, attn)
    out = layer.conv_fn(
        x.reshape(1, batch * x.shape[1], *x.shape[2:]),
        weight,
        None if bias is None else bias.flatten(),
        layer.stride,
        layer.conv_padding,
        layer.dilation,
        layer.groups * batch,
    )
    return out.view(batch, layer.out_channels, *out.shape[2:])


def _loop(layer: DynamicConvNd, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    reuse = not recording(x, layer.weight, attn, layer.bias)
    bias = mix_bias(layer.bias, attn)
    if _streams(layer, x, attn, reuse):
        # Mix each sample's kernel right before its conv (the generator runs in step with
        # the convs): the B mixed kernels never reach memory, and the mixing runs at the
        # bandwidth (see _mix_one_into).
        buffer = scratch("kernel", tuple(layer.weight.shape[1:]), layer.weight)
        kernels = (_mix_one_into(layer.weight, coeffs, buffer) for coeffs in attn.tolist())
    else:
        kernels = iter(mix_kernels(layer.weight, attn, reuse=reuse))
    single = x.shape[0] == 1
    outs = [
        layer.conv_fn(
            x if single else x[i : i + 1],
            kernel,
            None if bias is None else bias[i],
            layer.stride,
            layer.conv_padding,
            layer.dilation,
            layer.groups,
        )
        for i, kernel in enumerate(kernels)
    ]
    return outs[0] if single else torch.cat(outs)


def _dense(layer: DynamicConvNd, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    if x.shape[0] != 1:
        raise ValueError(f"strategy: 'dense' needs batch size 1, got {x.shape[0]}")
    return _loop(layer, x, attn)


def _static(layer: DynamicConvNd, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    k, out_channels, groups = layer.k, layer.out_channels, layer.groups
    per_group = out_channels // groups
    # Stack the K kernels inside each group, (g, K, O/g) on the output axis, so that the
    # conv's own `groups` (not the batch) keeps input and output channels paired.
    stacked = (
        layer.weight.view(k, groups, per_group, *layer.weight.shape[2:])
        .transpose(0, 1)
        .reshape(groups * k * per_group, *layer.weight.shape[2:])
    )
    y = layer.conv_fn(x, stacked, None, layer.stride, layer.conv_padding, layer.dilation, groups)
    y = y.unflatten(1, (groups, k, per_group))
    spatial_ones = (1,) * (y.dim() - 4)
    # Under CUDA autocast the conv gives bf16/fp16 but the router's softmax float32: mixed in
    # the conv's dtype, the output has the dtype nn.Conv2d and the other strategies give.
    conv_dtype = y.dtype  # CUDA autocast runs `sum` in float32
    y = (y * attn.to(y.dtype).view(-1, 1, k, 1, *spatial_ones)).sum(dim=2).flatten(1, 2)
    y = y.to(conv_dtype)
    bias = mix_bias(layer.bias, attn)
    if bias is not None:
        y = y + bias.to(y.dtype).view(*bias.shape, *spatial_ones)
    return y


STRATEGIES: dict[str, Strategy] = {
    "grouped": _grouped,
    "loop": _loop,
    "dense": _dense,
    "static": _static,
    "unfold": unfold_conv,
    "packed": packed_conv,
}


def graph_capture() -> bool:
    """True while torch.jit.trace or torch.export records the graph."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def select_strategy(layer: DynamicConvNd, x: torch.Tensor) -> str:
    """The ``'auto'`` choice: the layer's forced strategy, else one picked by shape and mode."""
    if func_transforms_active() and layer.strategy != "static":
        # vmap cannot batch what loop, dense and packed read on the host (attention values,
        # data pointers) nor unfold's in-place writes; grouped is the same function in pure
        # tensor ops, and a timing on wrapped tensors would mean nothing.
        return "grouped"
    if layer.strategy != "auto":
        return layer.strategy
    # A branch on the batch size would bake the export batch into the graph.
    if graph_capture():
        return "static"
    return autotune.choose(layer, x, STRATEGIES)


def run_strategy(layer: DynamicConvNd, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The layer's conv output for the padded input ``x`` and attention ``(B, K)``.

    While autograd records, every strategy but ``static`` (whose graph holds no mixed
    kernels, and which export traces) runs under the memory-lean backward, unless it is
    switched off or ``torch.func`` transforms run (then autograd records the strategy itself).
    """
    name = select_strategy(layer, x)
    records = recording(x, layer.weight, attn, layer.bias)
    if name == "packed" and records:
        name = "loop"  # the same convs; packing pays only while the kernels stay fixed
    strategy = STRATEGIES[name]
    lean = (
        records
        and lean_backward_enabled()
        and name != "static"
        and not graph_capture()
        and not torch.compiler.is_compiling()
        and not func_transforms_active()  # torch.func differentiates the strategy itself
    )
    if lean:
        return lean_forward(layer, x, attn, strategy, backward_kind(layer, name))
    return strategy(layer, x, attn)
