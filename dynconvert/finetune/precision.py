"""Mixed precision (``amp='bf16'`` or ``'fp16'``): the autocast dtype and the grad scaler.

Autocast runs the convolutions and matmuls in the low-precision dtype while the parameters,
the optimizer state and the saved model stay float32. It works on CUDA and, with recent torch,
on CPU (bf16 and fp16); fp16 needs loss scaling (``GradScaler``) against gradient underflow,
bf16 has float32's exponent range and does not.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..errors import DynconvertError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch autocasts to ``dtype`` on ``device`` (it warns and disables itself when
    the dtype is not supported there, so a tiny matmul shows what really happens)."""
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast(device.type, dtype=dtype):
                ones = torch.ones(2, 2, device=device)
                out = ones @ ones
    except (RuntimeError, UserWarning):
        return False
    return out.dtype == dtype


def amp_dtype(mode: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``mode`` on ``device``; a clear error where torch cannot do it."""
    if mode is None:
        return None
    dtype = AMP_DTYPES[mode]
    if not autocast_supported(device, dtype):
        other = "bf16" if mode == "fp16" else "fp16"
        raise DynconvertError(
            f"amp: {mode} autocast is not supported on {device} by torch {torch.__version__}; "
            f"use amp={other}, a CUDA device, or no amp",
            usage=True,
        )
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only; a disabled (pass-through) scaler otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
