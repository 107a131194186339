"""Measure dynamic against static models: interleaved timing and the peak memory of a step.

Used by ``dynconvert bench`` and by the scripts in ``benchmarks/``. Timings are taken
round-robin over the candidates (one call of each per round) and summarised by the median,
so that load from other processes spreads over all candidates alike; ratios to a baseline
measured in the same rounds are what is worth comparing across machines.

Peak memory on CPU: PyTorch keeps no allocator statistics there and its allocations are not
seen by ``tracemalloc``, so the operating system's peak resident set is used. Each
configuration runs in a fresh subprocess: build, one warm-up step, free and ``malloc_trim``,
reset the peak (``/proc/self/clear_refs``), then one measured step; the figure is
``VmHWM − VmRSS`` before the step (activations, gradients, temporaries). Linux only; on CUDA
``torch.cuda.max_memory_allocated`` is used instead.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .convert import convert
from .convert.config import ConvertConfig
from .finetune.models import load_user_model, static_twin
from .finetune.precision import AMP_DTYPES
from .io import load
from .layers import DynamicConvNd
from .sources import build_timm_model, is_saved_file


def interleaved_times(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    before: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one call each per round.

    Each round runs the candidates in a new (seeded) random order: a call inherits the cache
    and allocator state of the one before it (a freed multi-MB block can make the next large
    allocation page-fault), so a fixed order would charge that to the same candidate every
    round. ``before`` runs ahead of every timed call, outside the timing (e.g. to flush the
    caches).
    """
    sync = sync or (lambda: None)
    before = before or (lambda: None)
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name, fn in order:
            before()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def device_name(device: torch.device) -> str:
    """``'cpu'``, or the GPU's own name (``'NVIDIA H200'``): a table says what it ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def cuda_sync(device: torch.device) -> Callable[[], None] | None:
    """What :func:`interleaved_times` needs to time work queued on ``device``, if anything."""
    return torch.cuda.synchronize if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing for ``None``."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_of(step: Callable[[], object], device: torch.device) -> int:
    """Bytes by which one call of ``step`` raises the peak above the memory in use before it.

    Call it after a warm-up step, in a process that does nothing else.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _trim()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - before) * 1024


def run_isolated(module: str, args: list[str], timeout: float = 900) -> dict:
    """Run ``python -m module *args`` and parse the JSON it prints last."""
    # The child imports what this process can (a user's ``--model`` module included).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- models --------------------------------------------------------------------------------


def load_pair(
    spec: str,
    k: int = ConvertConfig.k,
    strategy: str = ConvertConfig.strategy,
    architecture=None,
):
    """(static model, dynamic model, conversion seconds or None) for a timm name or a file.

    ``architecture``: the module a saved custom model's file is loaded into (``--model``).
    """
    if is_saved_file(spec):
        return saved_pair(load(spec, model=architecture), strategy)
    static = build_timm_model(spec, pretrained=False)
    dynamic = copy.deepcopy(static)
    start = time.perf_counter()
    convert(dynamic, k, strategy=strategy)
    return static, dynamic, time.perf_counter() - start


def saved_pair(dynamic: torch.nn.Module, strategy: str = "auto"):
    """(its static twin, the loaded dynamic model, None): a file's baseline is each dynamic
    conv replaced by a plain conv of the same shape; there is no conversion to time."""
    if strategy != "auto":
        set_strategy(dynamic, strategy)
    return static_twin(dynamic), dynamic, None


def set_strategy(model: torch.nn.Module, strategy: str) -> None:
    for m in model.modules():
        if isinstance(m, DynamicConvNd):
            m.strategy = strategy


def eval_call(
    model: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None = None
) -> Callable[[], object]:
    model.eval()

    def run() -> object:
        with torch.no_grad(), autocast(x.device, amp):
            return model(x)

    return run


def train_step(
    model: torch.nn.Module, x: torch.Tensor, lr: float = 1e-3, amp: torch.dtype | None = None
) -> Callable[[], object]:
    """One forward + backward + SGD step (no momentum: no optimizer state to allocate).

    ``amp``: the forward and loss under autocast, backward outside it (no loss scaling).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(0)

    def run() -> object:
        opt.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if out.dim() == 2:
                target = torch.randint(out.shape[1], (out.shape[0],), generator=gen)
                loss = torch.nn.functional.cross_entropy(out, target.to(out.device))
            else:
                loss = out.float().square().mean()
        loss.backward()
        opt.step()
        return None

    return run


def input_for(model: torch.nn.Module, batch: int, input_size=None) -> torch.Tensor:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=gen).to(param.device, param.dtype)


def _memory_child(argv: list[str]) -> None:
    """``python -m dynconvert.benchmark SPEC VARIANT BATCH K STRATEGY DEVICE AMP ARCH [C H W]``:
    print the step's peak on ``DEVICE`` (``AMP``: ``bf16``, ``fp16`` or ``-`` for none;
    ``ARCH``: a ``package.module:function`` or ``-``). The model is built on CPU, then moved."""
    spec, variant, batch, k, strategy, device_arg, amp, arch, *size = argv
    device = torch.device(device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the allocator statistics are the current device's
    architecture = None
    if arch != "-":
        architecture = load_user_model(arch)
    static, dynamic, _ = load_pair(spec, int(k), strategy, architecture)
    model = (static if variant == "static" else dynamic).to(device)
    del static, dynamic
    x = input_for(model, int(batch), tuple(int(s) for s in size) or None)
    step = train_step(model, x, amp=AMP_DTYPES.get(amp))
    step()  # warm-up: autotune, lazily built state
    peak = peak_memory_of(step, x.device)
    amp = None if amp == "-" else amp
    result = {"spec": spec, "variant": variant, "batch": int(batch), "device": str(device)}
    print(json.dumps({**result, "amp": amp, "peak_bytes": peak}))


def step_peak_memory(
    spec: str,
    variant: str,
    batch: int,
    k: int,
    input_size=None,
    strategy: str = "auto",
    architecture: str | None = None,
    device: str = "cpu",
    amp: str | None = None,
) -> int:
    """Peak memory of one training step of ``variant`` ('static' or 'dynconvert'), isolated.

    ``architecture``: the ``package.module:function`` that builds a saved custom model;
    ``device``: where the step runs (``'cpu'``, ``'cuda:1'``...); ``amp``: ``'bf16'``,
    ``'fp16'`` or None, the autocast dtype of the step.
    """
    args = [spec, variant, str(batch), str(k), strategy, str(device), amp or "-"]
    args += [architecture or "-", *(str(s) for s in (input_size or ()))]
    return run_isolated("dynconvert.benchmark", args)["peak_bytes"]


if __name__ == "__main__":
    _memory_child(sys.argv[1:])


def write_results(out: Path, table: str, meta: dict, results: object) -> None:
    """Write the Markdown table and run metadata to ``out``, JSON beside it; print both."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{table}\n\n{json.dumps(meta)}\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table)
    print(meta)
