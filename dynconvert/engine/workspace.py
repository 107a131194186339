"""Reusable scratch buffers for the large temporaries of a dynamic conv forward.

With the default glibc allocator, blocks above the mmap threshold (at most 32 MiB) are
mapped afresh on every call and returned on free, so each forward pays page faults for its
mixed kernels and im2col columns: several ms per deep layer. The layers of a model run one
after another, so one buffer per (thread, device, dtype, slot), grown to the largest request,
serves every layer.

A buffer is handed out only while autograd does not record: a tensor that autograd saves for
backward must never be overwritten by the next layer. :func:`release` frees the buffers.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def _pool() -> dict[tuple, torch.Tensor]:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    return pool


def scratch(slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A contiguous ``shape`` tensor on ``like``'s device and dtype; its content is garbage.

    The memory is shared with the next call for the same ``slot``: use the result only
    until the current layer returns, and never where autograd saves it.
    """
    numel = 1
    for size in shape:
        numel *= size
    key = (slot, like.device, like.dtype)
    pool = _pool()
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = pool[key] = persistent_empty(numel, device=like.device, dtype=like.dtype)
    return buffer[:numel].view(shape)


def persistent_empty(*shape: int, **options) -> torch.Tensor:
    """``torch.empty`` for a tensor kept across calls: never an inference tensor.

    One made under ``torch.inference_mode()`` (Lightning's validation) could not be written
    in place by the training step after it.
    """
    with torch.inference_mode(False):
        return torch.empty(*shape, **options)


def release() -> None:
    """Free this thread's scratch buffers (they are re-created on demand)."""
    _pool().clear()


def held_bytes() -> int:
    """Bytes held by this thread's scratch buffers."""
    return sum(b.numel() * b.element_size() for b in _pool().values())
