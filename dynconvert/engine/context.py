"""What the calling context allows: autograd recording, graph capture, ``torch.func``.

Every strategy and the dispatch ask these before using reused buffers, host-side reads or
the memory-lean backward.
"""

from __future__ import annotations

import torch


def recording(*tensors: torch.Tensor | None) -> bool:
    """True when autograd would save tensors computed from ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def graph_capture() -> bool:
    """True while torch.jit.trace or torch.export records the graph."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def func_transforms_active() -> bool:
    """True inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ...).

    :class:`~.lean_backward.LeanDynamicConv` has no vmap rule, so under them autograd (or the
    transform) records the strategy itself.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # private, torch 2.x
    return bool(active and active())
