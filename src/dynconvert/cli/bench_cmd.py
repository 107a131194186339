"""``dynconvert bench MODEL``: what dynamic convolution costs for your model, in one run.

MODEL is a timm name (built with random weights, converted with ``--k``; all convs but the
stem become dynamic) or a file saved by dynconvert (its static twin, each dynamic conv replaced
by a plain conv of the same shape, is the baseline). Static and dynamic are timed
round-robin (median of ``--rounds``): eval latency at ``--batch-size``, one training step
(forward + backward + SGD) and, each in a fresh process, that step's peak memory. A file
that holds a custom (non-timm) model needs ``--model package.module:function``, which the
fresh processes import too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..errors import DynconvertError
from ..layers import STRATEGIES
from .params import architecture_option, sample_shape


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _load_pair(model_spec: str, architecture: str | None, k: int, strategy: str):
    """(static, dynamic, conversion seconds or None), as ``benchmark.load_pair``, with the
    CLI's checks and errors for a file (missing, a folder, a custom model)."""
    from ..benchmark import load_pair, saved_pair
    from .model_request import is_saved_file
    from .params import build_architecture, check_model_path, load_saved

    if not is_saved_file(model_spec):
        if architecture is not None:
            raise DynconvertError(
                f"--model builds the architecture of a saved file; {model_spec} is a timm "
                "model name, drop --model",
                usage=True,
            )
        return load_pair(model_spec, k, strategy)
    path = Path(model_spec)
    check_model_path(path)
    return saved_pair(load_saved(path, build_architecture(architecture)), strategy)


def _measure(model_spec, pair, batch, input_size, k, rounds, train, memory, strategy,
             architecture) -> dict:  # fmt: skip
    import torch

    from ..benchmark import (
        eval_call,
        input_for,
        interleaved_times,
        medians,
        step_peak_memory,
        train_step,
    )

    static, dynamic, convert_s = pair
    x = input_for(static, batch, input_size)
    try:
        with torch.no_grad():
            static.eval()(x)
    except RuntimeError as exc:
        raise DynconvertError(
            f"{model_spec} does not run on input {tuple(x.shape)}: {exc}; pass --input-size C H W",
            usage=True,
        ) from exc
    result: dict = {"model": model_spec, "batch": batch, "input": list(x.shape[1:])}
    result["convert_s"] = convert_s
    calls = {"static": eval_call(static, x), "dynamic": eval_call(dynamic, x)}
    for call in calls.values():  # autotune measures here, outside the timed rounds
        call()
    result["eval_ms"] = {n: t * 1e3 for n, t in medians(interleaved_times(calls, rounds)).items()}
    if train:
        steps = {"static": train_step(static, x), "dynamic": train_step(dynamic, x)}
        times = medians(interleaved_times(steps, rounds=max(1, rounds // 2), warmup=1))
        result["train_ms"] = {n: t * 1e3 for n, t in times.items()}
    if memory and train:
        size = input_size or tuple(x.shape[1:])
        result["peak_bytes"] = {
            variant: step_peak_memory(
                model_spec, name, batch, k, size, strategy=strategy, architecture=architecture
            )
            for variant, name in (("static", "static"), ("dynamic", "dynconvert"))
        }
    return result


def _table(result: dict):
    from rich.table import Table

    table = Table(title=f"{result['model']}: batch {result['batch']}, input {result['input']}")
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
@click.option("--input-size", type=sample_shape(), default=None, metavar="C,H,W",
              help="Per-sample input shape [default: the model's].")  # fmt: skip
@click.option("--k", type=click.IntRange(min=1), default=4, show_default=True,
              help="Kernels per layer (timm names only; a saved file has its own).")  # fmt: skip
@click.option("--strategy", type=click.Choice(["auto", *STRATEGIES]), default="auto",
              show_default=True, help="Force one strategy in every dynamic layer.")  # fmt: skip
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--train/--no-train", default=True, help="Also time one training step.")
@click.option("--memory/--no-memory", default=True, help="Measure the step's peak memory.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the figures as JSON.")  # fmt: skip
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
    json_path: Path | None,
    architecture: str | None,
) -> None:
    """Time MODEL static vs dynamic: eval latency, a training step and its peak memory."""
    from rich.console import Console

    from ..io import atomic_write_text, check_output_path
    from .convert_cmd import explicit_options
    from .model_request import is_saved_file

    if is_saved_file(model) and explicit_options(ctx, ["k"]):
        raise DynconvertError(
            f"{model} is a saved dynconvert model with its own K; --k applies to timm model "
            "names only",
            usage=True,
        )
    if json_path is not None:
        # before the measurement, which takes minutes
        check_output_path(json_path, (Path(model) if is_saved_file(model) else None,))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pair = _load_pair(model, architecture, k, strategy)
    console = Console()
    with console.status("measuring (static and dynamic interleaved)..."):
        result = _measure(
            model, pair, batch_size, input_size, k, rounds, train, memory, strategy, architecture
        )
    console.print(_table(result))
    if json_path is not None:
        atomic_write_text(json.dumps(result, indent=1), json_path)
        console.print(f"wrote {json_path}")
