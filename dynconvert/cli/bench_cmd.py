"""``dynconvert bench MODEL``: what dynamic convolution costs for your model, in one run.

MODEL is a timm name (built with random weights, converted with ``--k``; all convs but the
stem become dynamic) or a file saved by dynconvert (its static twin, each dynamic conv replaced
by a plain conv of the same shape, is the baseline). Static and dynamic are timed
round-robin (median of ``--rounds``): eval latency at ``--batch-size``, one training step
(forward + backward + SGD) and, each in a fresh process, that step's peak memory. A file
that holds a custom (non-timm) model needs ``--model package.module:function``, which the
fresh processes import too. ``--device`` (default ``cpu``) is where all of it runs: the models
are built and converted on CPU, then moved; ``--amp bf16|fp16`` autocasts the timed passes and
the step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from .. import benchmark
from ..convert.config import ConvertConfig
from ..errors import DynconvertError, first_line
from ..finetune.distributed import resolve_device
from ..finetune.precision import AMP_DTYPES, amp_dtype
from ..io import atomic_write_text, check_outputs
from ..model_request import build_architecture, load_saved
from ..sources import check_model_argument, check_model_path, full_input_size, is_saved_file
from .convert_cmd import explicit_options
from .options import named_option
from .params import architecture_option, input_size_option, json_option


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _device(name: str, amp: str | None):
    """The torch.device of ``--device``, checked with ``--amp`` before any model is built."""
    try:
        device = resolve_device(name)
    except DynconvertError as exc:
        raise DynconvertError(f"--{exc}", usage=True) from None
    if device.type not in ("cpu", "cuda"):
        raise DynconvertError(f"--device: bench runs on cpu or cuda, not {name!r}", usage=True)
    if device.type == "cuda" and device.index >= (count := torch.cuda.device_count()):
        raise DynconvertError(f"--device: no {name} here, {count} CUDA device(s)", usage=True)
    try:
        amp_dtype(amp, device)  # the check fine-tuning makes, with its message
    except DynconvertError as exc:
        raise DynconvertError(f"--{exc}", usage=True) from None
    return device


def _first_calls(calls: dict, amp: str | None, device) -> None:
    """One call of each (autotune measures here, outside the timed rounds); under ``--amp`` a
    failure is torch refusing an op in that dtype there, said in one line."""
    for call in calls.values():
        try:
            call()
        except RuntimeError as exc:
            if amp is None or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            raise DynconvertError(
                f"--amp {amp}: the model does not run under {amp} autocast on {device} "
                f"({first_line(exc)}); try the other dtype or no --amp"
            ) from exc


def _load_pair(model_spec: str, architecture: str | None, k: int, strategy: str):
    """(static, dynamic, conversion seconds or None), as ``benchmark.load_pair``, with the
    CLI's checks and errors for a file (missing, a folder, a custom model)."""
    if not is_saved_file(model_spec):
        if architecture is not None:
            raise DynconvertError(
                f"--model builds the architecture of a saved file; {model_spec} is a timm "
                "model name, drop --model",
                usage=True,
            )
        return benchmark.load_pair(model_spec, k, strategy)
    path = Path(model_spec)
    check_model_path(path)
    return benchmark.saved_pair(load_saved(path, build_architecture(architecture)), strategy)


def _measure(model_spec, pair, batch, input_size, k, rounds, train, memory, strategy,
             architecture, device, amp) -> dict:  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cuda_sync and the allocator act on the current device
    static, dynamic, convert_s = (pair[0].to(device), pair[1].to(device), pair[2])
    dtype, sync = AMP_DTYPES.get(amp), benchmark.cuda_sync(device)
    input_size = full_input_size(input_size, static)
    x = benchmark.input_for(static, batch, input_size)
    try:
        with torch.no_grad():
            static.eval()(x)
    except RuntimeError as exc:
        raise DynconvertError(
            f"{model_spec} does not run on input {tuple(x.shape)}: {exc}; pass --input-size C,H,W",
            usage=True,
        ) from exc
    result: dict = {"model": model_spec, "device": benchmark.device_name(device), "amp": amp}
    result.update(batch=batch, input=list(x.shape[1:]), convert_s=convert_s)
    models = {"static": static, "dynamic": dynamic}
    calls = {name: benchmark.eval_call(model, x, dtype) for name, model in models.items()}
    _first_calls(calls, amp, device)
    times = benchmark.medians(benchmark.interleaved_times(calls, rounds, sync=sync))
    result["eval_ms"] = {n: t * 1e3 for n, t in times.items()}
    if train:
        steps = {name: benchmark.train_step(model, x, amp=dtype) for name, model in models.items()}
        _first_calls(steps, amp, device)  # the warm-up step
        times = benchmark.medians(
            benchmark.interleaved_times(steps, max(1, rounds // 2), warmup=0, sync=sync)
        )
        result["train_ms"] = {n: t * 1e3 for n, t in times.items()}
    if memory and train:
        size = input_size or tuple(x.shape[1:])
        result["peak_bytes"] = {
            variant: benchmark.step_peak_memory(
                model_spec, name, batch, k, size, strategy, architecture, str(device), amp
            )
            for variant, name in (("static", "static"), ("dynamic", "dynconvert"))
        }
    return result


def _table(result: dict):
    on = f"{result['device']}, " + (f"{result['amp']} autocast" if result["amp"] else "float32")
    title = f"{result['model']} on {on}: batch {result['batch']}, input {result['input']}"
    table = Table(title=title)
    for column in ("measure", "static", "dynamic", "dynamic / static"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    rows = [("eval latency", result["eval_ms"], lambda v: f"{v:.1f} ms")]
    if "train_ms" in result:
        rows.append(("training step", result["train_ms"], lambda v: f"{v:.1f} ms"))
    if "peak_bytes" in result:
        rows.append(("peak memory of the step", result["peak_bytes"], _mib))
    for label, values, fmt in rows:
        ratio = values["dynamic"] / values["static"] if values["static"] else float("nan")
        table.add_row(label, fmt(values["static"]), fmt(values["dynamic"]), f"{ratio:.2f}×")
    if result["convert_s"] is not None:
        table.add_row("conversion", "", f"{result['convert_s']:.2f} s", "")
    return table


@click.command("bench")
@click.argument("model")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True)
@input_size_option("Per-sample input shape [default: the model's].")
@named_option(ConvertConfig, "k", "Kernels per layer (timm names only; a saved file has its own).")
@named_option(ConvertConfig, "strategy", "Force one strategy in every dynamic layer.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--train/--no-train", default=True, help="Also time one training step.")
@click.option("--memory/--no-memory", default=True, help="Measure the step's peak memory.")
@click.option("--device", default="cpu", show_default=True,
              help="Where to measure: cpu, cuda, cuda:1... (built and converted on CPU, then "
              "moved there).")  # fmt: skip
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None,
              help="Autocast dtype of the timed passes and the step [default: none].")  # fmt: skip
@json_option("Also write the figures as JSON.")
@architecture_option
@click.pass_context
def bench_command(
    ctx: click.Context,
    model: str,
    batch_size: int,
    input_size: tuple[int, int, int] | None,
    k: int,
    strategy: str,
    rounds: int,
    train: bool,
    memory: bool,
    device: str,
    amp: str | None,
    json_path: Path | None,
    architecture: str | None,
) -> None:
    """Time MODEL static vs dynamic: eval latency, a training step and its peak memory."""
    check_model_argument(model)
    if is_saved_file(model) and explicit_options(ctx, ["k"]):
        raise DynconvertError(
            f"{model} is a saved dynconvert model with its own K; --k applies to timm model "
            "names only",
            usage=True,
        )
    where = _device(device, amp)  # before the models are built (seconds)
    if json_path is not None:
        # before the measurement, which takes minutes
        check_outputs(
            {"--json": json_path}, {"MODEL": Path(model) if is_saved_file(model) else None}
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pair = _load_pair(model, architecture, k, strategy)
    console = Console()
    with console.status("measuring (static and dynamic interleaved)..."):
        result = _measure(
            model, pair, batch_size, input_size, k, rounds, train, memory, strategy,
            architecture, where, amp,
        )  # fmt: skip
    console.print(_table(result))
    if json_path is not None:
        atomic_write_text(json.dumps(result, indent=1), json_path)
        console.print(f"wrote {json_path}")
