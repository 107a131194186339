"""torchrun / DistributedDataParallel helpers: one process per device, rank 0 writes and prints."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import DynconvertError


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks (float64; a no-op on one process)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Collective: ``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None elsewhere."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    if name in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    # Each refusal is bad usage (exit 2): the name, not the run, is wrong for this machine.
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DynconvertError(
            f"device: {name!r} is not a device (cpu, cuda, cuda:1...)", usage=True
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise DynconvertError(f"device: dynconvert runs on cpu or cuda, not {name!r}", usage=True)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DynconvertError("device: cuda was asked for but no CUDA GPU is available", usage=True)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index >= (count := torch.cuda.device_count()):
        raise DynconvertError(f"device: no {device} here, {count} CUDA device(s)", usage=True)
    return device


def init_distributed(device_name: str | None) -> DistContext:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), or run on one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world <= 1 and not dist.is_initialized():
        return DistContext(device=device)
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
