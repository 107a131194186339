"""The training objective: cross-entropy (hard, smoothed or mixed targets), distillation, extras."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn

from ..errors import DynconvertError
from ..layers import DynamicConvNd

if TYPE_CHECKING:
    from .options import FinetuneOptions


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """Hinton et al. 2015: KL(teacher‖student) at ``temperature``, scaled by T² so its
    gradient keeps the size of the hard-label term."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student.float() / t, dim=1),
        F.log_softmax(teacher.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def classification_loss(outputs: torch.Tensor, targets: torch.Tensor, smoothing: float):
    if targets.is_floating_point():  # soft targets from mixup/cutmix (already smoothed)
        return torch.sum(-targets * F.log_softmax(outputs.float(), dim=1), dim=1).mean()
    return F.cross_entropy(outputs.float(), targets, label_smoothing=smoothing)


def training_loss(
    model: nn.Module,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    inputs: torch.Tensor,
    *,
    smoothing: float,
    teacher: nn.Module | None,
    distill_weight: float,
    distill_temperature: float,
    regularizers: Sequence[Callable[[nn.Module], torch.Tensor]] = (),
) -> torch.Tensor:
    """``(1 - w)·CE + w·KD + Σ regularizer(model)``; ``model`` is the unwrapped model."""
    loss = classification_loss(outputs, targets, smoothing)
    if teacher is not None and distill_weight > 0:
        with torch.no_grad():
            teacher_out = teacher(inputs)
        kd = distillation_loss(outputs, teacher_out, distill_temperature)
        loss = (1 - distill_weight) * loss + distill_weight * kd
    for regularizer in regularizers:
        loss = loss + regularizer(model)
    return loss


def make_mixup(
    mixup_alpha: float,
    cutmix_alpha: float,
    smoothing: float,
    num_classes: int | None,
    until_iteration: int | None = None,
):
    """timm's ``Mixup`` when either alpha is > 0 (it needs even batches; odd ones pass through).

    The returned ``apply(inputs, targets, iteration)`` passes batches through unmixed from
    ``until_iteration`` on (timm's ``--mixup-off-epoch``).
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    if num_classes is None:
        raise ValueError("mixup/cutmix: the number of classes is unknown")
    mixup = Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=smoothing,
        num_classes=num_classes,
    )

    def apply(inputs: torch.Tensor, targets: torch.Tensor, iteration: int):
        if len(inputs) % 2 or (until_iteration is not None and iteration >= until_iteration):
            return inputs, targets
        return mixup(inputs, targets)

    return apply


def parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    attention_lr: float | None,
    attention_weight_decay: float | None,
    kernel_lr_scale: float = 1.0,
) -> list[dict]:
    """Three kinds of parameters, each with and without weight decay:

    * ``attention``: the routers (each dynamic layer's ``router_parameters()``), at
      ``attention_lr`` (default ``lr``);
    * ``kernels``: the K kernels and biases of the dynamic layers, at ``lr * kernel_lr_scale``.
      Under uniform attention each kernel gets ``1/K`` of the gradient of the conv it
      replaced, so the mixed kernel learns K times slower than the static conv did;
      ``kernel_lr_scale=K`` restores its pace;
    * ``main``: everything else, at ``lr``.

    Biases and 1-D parameters (norms) get no weight decay. Dynamic-conv biases are
    ``(K, out)``, so biases are found by name, not by ``ndim``.
    """
    layers = [m for m in model.modules() if isinstance(m, DynamicConvNd)]
    kernels = {id(p) for m in layers for p in m.kernel_parameters()}
    routers = {id(p) for m in layers for p in m.router_parameters()}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in routers:
            kind = "attention"
        else:
            kind = "kernels" if id(param) in kernels else "main"
        no_decay = param.ndim <= 1 or name == "bias" or name.endswith(".bias")
        groups.setdefault((kind, no_decay), []).append(param)
    out = []
    for (kind, no_decay), params in sorted(groups.items()):
        group_lr, decay = lr, weight_decay
        if kind == "attention":
            group_lr = lr if attention_lr is None else attention_lr
            decay = weight_decay if attention_weight_decay is None else attention_weight_decay
        elif kind == "kernels":
            group_lr = lr * kernel_lr_scale
        out.append(
            {
                "params": params,
                "lr": group_lr,
                "weight_decay": 0.0 if no_decay else decay,
                "name": kind + ("/no_decay" if no_decay else ""),
            }
        )
    return out


def make_optimizer(model: nn.Module, opts: FinetuneOptions) -> torch.optim.Optimizer:
    """SGD (Nesterov when asked and momentum > 0) or AdamW over :func:`parameter_groups`."""
    groups = parameter_groups(
        model,
        opts.lr,
        opts.weight_decay,
        opts.attention_lr,
        opts.attention_weight_decay,
        opts.kernel_lr_scale,
    )
    if not groups:
        raise DynconvertError("model: no trainable parameters", usage=True)
    if opts.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=opts.lr, momentum=opts.momentum, nesterov=opts.nesterov and opts.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=opts.lr)


def kernel_difference_penalty(model: nn.Module) -> torch.Tensor:
    """``Σ_layers Σ_k ||W_k − mean_k W||²``: pulls the K kernels of every dynamic layer
    towards their mean (a weight decay on the kernel *differences*, not on the kernels)."""
    total = None
    for m in model.modules():
        if isinstance(m, DynamicConvNd):
            spread = (m.weight - m.weight.mean(dim=0, keepdim=True)).pow(2).sum()
            total = spread if total is None else total + spread
    if total is None:
        return torch.zeros(())
    return total


@torch.no_grad()
def scale_kernel_gradients(kernels: list[torch.Tensor], scale: float, diff_scale: float) -> None:
    """``g_k ← scale · (ḡ + diff_scale · (g_k − ḡ))`` for the ``(K, ...)`` kernel gradients.

    Under uniform attention each of the K kernels gets ``∂L/∂W / K``, so their mean learns K
    times slower than the static conv did (``scale`` = K restores its pace), and the kernels
    only move apart where attention is not uniform (``diff_scale`` speeds that up).
    """
    grads = [p.grad for p in kernels if p.grad is not None]
    if not grads:  # a static model (the benchmark's baseline) has no dynamic kernels
        return
    if diff_scale != 1.0:
        for grad in grads:
            mean = grad.mean(dim=0, keepdim=True)
            grad.sub_(mean).mul_(diff_scale).add_(mean)
    if scale != 1.0:
        torch._foreach_mul_(grads, scale)
