"""A memory-lean autograd path: keep x, the K kernels and the attention, not B mixed kernels.

Autograd through any forward strategy saves the ``B`` mixed kernels ``Σ_k a_bk W_k`` of every
layer until backward: ``B·|W|`` per layer, about 2.4 GB in fp32 for one ResNet-50 stage-4
3×3 conv at batch 256 (the out-of-memory that users of batch-folded implementations hit).
:class:`LeanDynamicConv` runs the chosen strategy without autograd and recomputes the mixed
kernels in backward, one layer at a time, so a training step's peak memory stays near the
static model's.

Backward of ``y_b = conv(x_b, W_b) + c_b`` with ``W_b = Σ_k a_bk W_k``, ``c_b = Σ_k a_bk c_k``:

* ``∂L/∂x`` and ``∂L/∂W_b`` from the recomputed ``W_b``: one batch-folded
  ``convolution_backward`` (groups ``B·g``), one dense one per sample, or batched GEMMs
  against the recomputed im2col columns (the backward that matches the forward strategy);
* ``∂L/∂W_k = Σ_b a_bk ∂L/∂W_b`` and ``∂L/∂a_bk = <∂L/∂W_b, W_k> + <∂L/∂c_b, c_k>``;
* the router's parameters get theirs from ``∂L/∂a`` through ordinary autograd.

It is on by default. ``DYNCONVERT_LEAN_BACKWARD=0`` in the environment, or
:func:`set_lean_backward` ``(False)``, switches it off: autograd then records the strategies
themselves and keeps the mixed kernels (more memory; sometimes a faster backward).
"""

from __future__ import annotations

from typing import Any

import torch

from .mixing import mix_kernels
from .spec import DynamicConvSpec, Strategy
from .switches import SWITCHES
from .unfold import col2im, im2col, supports_col2im
from .workspace import scratch


def set_lean_backward(enabled: bool) -> None:
    """Switch the memory-lean backward on or off (``DYNCONVERT_LEAN_BACKWARD=0``: off).

    Read at each forward, so it applies to every layer from the next call on. Off, autograd
    saves the ``B`` mixed kernels of each layer for backward, as the batch-folded
    implementations do.
    """
    SWITCHES.lean_backward = bool(enabled)


def lean_backward_enabled() -> bool:
    return SWITCHES.lean_backward


def _conv_backward(ctx, grad_out, x, kernel, groups, need_x, need_kernel):
    """ATen's conv backward with the layer's geometry: ``(∂L/∂x, ∂L/∂kernel)``, each or None."""
    stride, padding, dilation, _ = ctx.geometry
    grad_x, grad_kernel, _ = torch.ops.aten.convolution_backward(
        grad_out, x, kernel, None, stride, padding, dilation, False, [0] * len(stride), groups,
        [need_x, need_kernel, False],
    )  # fmt: skip
    return grad_x, grad_kernel


def _fold_backward(ctx, x, mixed, grad_out, need_x, need_mixed):
    """One batch-folded ``convolution_backward`` (groups ``B·g``)."""
    *_, groups = ctx.geometry
    batch = x.shape[0]
    grad_x, grad_mixed = _conv_backward(
        ctx,
        grad_out.reshape(1, -1, *grad_out.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        mixed.flatten(0, 1),
        groups * batch,
        need_x,
        need_mixed,
    )
    return (
        None if grad_x is None else grad_x.view(x.shape),
        None if grad_mixed is None else grad_mixed.view(mixed.shape),
    )


def _loop_backward(ctx, x, mixed, grad_out, need_x, need_mixed):
    """One dense ``convolution_backward`` per sample: no grouped kernels, good on big maps."""
    *_, groups = ctx.geometry
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    grad_mixed = None
    if need_mixed:
        if torch.is_grad_enabled():  # create_graph: autograd may keep it
            grad_mixed = torch.empty_like(mixed)
        else:
            grad_mixed = scratch("grad_kernels", tuple(mixed.shape), mixed)
    for b in range(x.shape[0]):
        gx, gw = _conv_backward(
            ctx, grad_out[b : b + 1], x[b : b + 1], mixed[b], groups, need_x, need_mixed
        )
        if need_x:
            grad_x[b : b + 1] = gx
        if need_mixed:
            grad_mixed[b] = gw
    return grad_x, grad_mixed


def _unfold_backward(ctx, x, mixed, grad_out, need_x, need_mixed):
    """Batched GEMMs against the recomputed im2col columns (2-D or 1×1 only)."""
    layer = ctx.layer
    batch, groups = x.shape[0], layer.groups
    cols = im2col(layer, x, reuse=False)  # (B, C·|k|, L)
    cols = cols.view(batch, groups, -1, cols.shape[-1])
    gy = grad_out.reshape(batch, groups, -1, cols.shape[-1])  # (B, g, O/g, L)
    kernel = mixed.view(batch, groups, gy.shape[2], -1)  # (B, g, O/g, C/g·|k|)
    grad_x = grad_mixed = None
    if need_mixed:
        grad_mixed = torch.matmul(gy, cols.transpose(-1, -2)).view(mixed.shape)
    if need_x:
        grad_cols = torch.matmul(kernel.transpose(-1, -2), gy).view(batch, -1, cols.shape[-1])
        grad_x = col2im(layer, grad_cols, x.shape)
    return grad_x, grad_mixed


_BACKWARDS = {"fold": _fold_backward, "loop": _loop_backward, "unfold": _unfold_backward}


def backward_kind(layer: DynamicConvSpec, strategy_name: str) -> str:
    """The backward that suits a forward strategy: its own data layout, recomputed."""
    if strategy_name in ("loop", "dense", "packed"):
        return "loop"
    if strategy_name == "unfold" and supports_col2im(layer):
        return "unfold"
    return "fold"


class LeanDynamicConv(torch.autograd.Function):
    """``forward(x, weight, bias, attn, layer, strategy, backward)`` → the conv output."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        attn: torch.Tensor,
        layer: DynamicConvSpec,
        strategy: Strategy,
        backward: str,
    ) -> torch.Tensor:
        ctx.geometry = (layer.stride, layer.conv_padding, layer.dilation, layer.groups)
        ctx.layer = layer
        ctx.backward_kind = backward
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, attn)
        out = strategy(layer, x, attn)
        # A strategy's output may be a view of a tensor made here (grouped, unfold). Autograd
        # forbids in-place ops on such views of a Function's output, and timm's blocks run
        # in-place activations on conv outputs; ``detach`` un-marks the view without a copy.
        return out.detach() if out._is_view() else out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight, bias, attn_in = ctx.saved_tensors
        attn = attn_in.to(weight.dtype)  # autocast may have made the router's output bf16
        batch = attn.shape[0]
        need_x, need_w, need_b, need_a = ctx.needs_input_grad[:4]
        need_mixed = need_w or need_a

        # Outside create_graph nothing keeps the recomputed kernels: a scratch buffer spares
        # the page faults of a fresh B·|W| block.
        mixed = mix_kernels(weight, attn, reuse=not torch.is_grad_enabled())
        grad_out = grad_out.contiguous()
        # Under autocast the forward ran in grad_out's (lower) precision; so does backward.
        work = grad_out.dtype
        grad_x, grad_mixed = _BACKWARDS[ctx.backward_kind](
            ctx, x.to(work), mixed.to(work), grad_out, need_x, need_mixed
        )
        del mixed
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if grad_mixed is not None:
            grad_mixed = grad_mixed.to(weight.dtype)
        grad_weight = grad_bias = grad_attn = None
        if need_mixed:
            grad_mixed = grad_mixed.view(batch, -1)
            if need_w:
                grad_weight = (attn.t() @ grad_mixed).view(weight.shape)
            if need_a:
                grad_attn = grad_mixed @ weight.flatten(1).t()
        if ctx.has_bias and (need_b or need_a):
            grad_mixed_bias = grad_out.sum(dim=tuple(range(2, grad_out.dim()))).to(bias.dtype)
            if need_b:
                grad_bias = attn.t() @ grad_mixed_bias
            if need_a:
                grad_attn = grad_attn + grad_mixed_bias @ bias.t()
        if grad_attn is not None:
            grad_attn = grad_attn.to(attn_in.dtype)
        return grad_x, grad_weight, grad_bias, grad_attn, None, None, None


def lean_forward(
    layer: DynamicConvSpec,
    x: torch.Tensor,
    attn: torch.Tensor,
    strategy: Strategy,
    backward: str = "fold",
) -> torch.Tensor:
    """Run ``strategy`` under :class:`LeanDynamicConv` with the given backward kind."""
    return LeanDynamicConv.apply(x, layer.weight, layer.bias, attn, layer, strategy, backward)
