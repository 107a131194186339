"""Fold each BatchNorm that directly follows a dynamic conv into the conv's K kernels and biases.

A dynamic conv computes ``y = Σ_k a_k (W_k * x) + Σ_k a_k b_k`` with ``Σ_k a_k = 1`` (Chen et
al., CVPR 2020: a softmax over the K kernels). An eval-mode BatchNorm is the affine map
``s·y + t`` per channel, with ``s = γ / sqrt(var + eps)`` and ``t = β - s·mean``, so

    BN(y) = Σ_k a_k ((s·W_k) * x) + Σ_k a_k (s·b_k + t)

exactly: each kernel is scaled by ``s`` and each bias becomes ``s·b_k + t`` (a zero bias is
created when the conv had none). The router reads the conv's input, which does not change.

"Directly follows" is read from a ``torch.fx`` trace made with conversion's own tracer
(:class:`dynconvert.convert.discover.ConvTracer`, which keeps convs, dynamic convs and timm's
not-traceable modules as leaves), also keeping BatchNorms as leaves: the conv's output must
be used by that BatchNorm only, each called exactly once, and neither's parameters read
anywhere else. Weight-standardized convs (``DynamicStdConv2d``) are never folded: their
forward normalises each kernel again, which would undo the BatchNorm's scale. The BatchNorm
is then replaced, in place under every name it has, by
``nn.Identity`` (or, for timm's ``BatchNormAct2d``, by its dropout and activation, which it
applies after normalising). The fold uses the running statistics, so it is for inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from ..convert.discover import ConvTracer
from ..convert.replace import swap_modules
from ..errors import DynconvertError
from ..layers import DynamicConvNd, DynamicStdConv2d


@dataclass(frozen=True)
class FoldedPair:
    conv: str
    norm: str


class _FoldTracer(ConvTracer):
    """Conversion's tracer, with BatchNorms (and timm's norm+act modules) kept as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _replacement(norm: nn.Module) -> nn.Module | None:
    """What computes the rest of ``norm`` once its affine map is folded (None: cannot fold)."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return None
    if not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
        return None  # it normalises with batch statistics even in eval mode
    if type(norm).forward is nn.modules.batchnorm._BatchNorm.forward:  # BatchNorm1d/2d/3d
        return nn.Identity()
    if type(norm) is BatchNormAct2d:
        return nn.Sequential(norm.drop, norm.act)
    return None  # a subclass with its own forward computes something else


def find_pairs(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """(conv name, norm name) of every BatchNorm that only a dynamic conv's output feeds."""
    calls: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            calls[id(module)] = calls.get(id(module), 0) + 1
    # Parameters read outside the module's forward (fx records them as get_attr nodes).
    read_outside = {
        str(node.target).rsplit(".", 1)[0] for node in graph.nodes if node.op == "get_attr"
    }
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        conv = model.get_submodule(node.target)
        if not isinstance(conv, DynamicConvNd) or len(node.users) != 1:
            continue
        if isinstance(conv, DynamicStdConv2d):
            continue  # its kernels are standardized: a BatchNorm's scale cannot go into them
        if not conv.router.sums_to_one:
            continue  # the shift t would be added Σ_k a_k ≠ 1 times
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        norm = model.get_submodule(user.target)
        if (
            _replacement(norm) is None
            or norm.num_features != conv.out_channels
            or calls[id(conv)] != 1
            or calls[id(norm)] != 1
            or {node.target, user.target} & read_outside
        ):
            continue
        pairs.append((str(node.target), str(user.target)))
    return pairs


@torch.no_grad()
def fold_into(conv: DynamicConvNd, norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Scale ``conv``'s K kernels and shift its K biases by ``norm``'s eval-mode affine map."""
    dtype = conv.weight.dtype
    inv_std = torch.rsqrt(norm.running_var.double() + norm.eps)
    scale = inv_std * norm.weight.double() if norm.weight is not None else inv_std
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    trailing = (1,) * (conv.weight.dim() - 2)
    conv.weight.copy_((conv.weight.double() * scale.view(1, -1, *trailing)).to(dtype))
    bias = (
        conv.bias.double()
        if conv.bias is not None
        else torch.zeros(
            (conv.k, conv.out_channels), dtype=torch.float64, device=conv.weight.device
        )
    )
    folded = (bias * scale + shift).to(dtype)
    if conv.bias is not None:
        conv.bias.copy_(folded)
    else:
        conv.bias = nn.Parameter(folded, requires_grad=conv.weight.requires_grad)


def fold_bn(model: nn.Module) -> list[FoldedPair]:
    """Fold every BatchNorm that directly follows a dynamic conv, in place; returns the pairs.

    The model must be traceable by ``torch.fx`` (with conversion's leaf rules); a model that is
    not raises :class:`DynconvertError` and is left unchanged. Only use the folded model in
    eval mode: the fold bakes in the running statistics.
    """
    try:
        graph = _FoldTracer().trace(model)
    except Exception as exc:
        raise DynconvertError(
            f"fold-bn: cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); export "
            "without --fold-bn"
        ) from exc
    pairs = find_pairs(model, graph)
    replacements = []
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        fold_into(conv, norm)
        replacements.append((norm, _replacement(norm)))
    swap_modules(model, replacements)
    return [FoldedPair(conv, norm) for conv, norm in pairs]
