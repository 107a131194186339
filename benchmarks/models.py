"""Whole-model cost of dynamic convolution: static vs batch-folded vs dynconvert, one run.

For timm resnet50, mobilenetv2_100 and efficientnet_b0 (random weights), every conv but the
stem dynamic, K=4:

* conversion time of ``dynconvert.convert``;
* eval latency at batch 1 and 8, candidates interleaved round-robin, median of rounds;
* one training step (forward + backward + SGD) at batch 32, interleaved likewise;
* the peak memory of that step, each variant in a fresh subprocess (see
  ``dynconvert.benchmark.peak_memory_of``: peak resident set above the memory in use before
  the step, after a warm-up step and ``malloc_trim``).

    python benchmarks/models.py                          # everything (long on 2 cores)
    python benchmarks/models.py --quick                  # resnet50, 3 rounds, batch 1/8/32
    python benchmarks/models.py --models resnet50 --no-train --rounds 5
    python benchmarks/models.py --models efficientnet_b0 --quick --input-size 3 96 96  # smoke
    python benchmarks/models.py --device cuda --channels-last --amp bf16   # the GPU table

On CUDA, timings synchronise after every call and the peak memory of a step is
``torch.cuda.max_memory_allocated`` above what was allocated before it.

Depthwise convs are dynamic too (the batch-folded reference runs them as ``groups = B·C``);
timm's ``BatchNormAct2d`` stays as it is. ``efficientnet_b0`` and ``mobilenetv2_100`` use
plain ``Conv2d`` with symmetric padding; the ``tf_*`` ports use ``Conv2dSame``, which both
dynconvert and the reference pad per input size. ``--lean-backward off`` measures the
dynconvert variant with autograd keeping the mixed kernels.

Writes ``--out`` (Markdown) and the same path with ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _reference import BatchFoldedConv2d, swap_convs

from dynconvert.benchmark import (
    cuda_sync,
    device_name,
    eval_call,
    input_for,
    interleaved_times,
    load_pair,
    medians,
    peak_memory_of,
    train_step,
    write_results,
)
from dynconvert.engine.autotune import autotune_enabled
from dynconvert.engine.lean_backward import lean_backward_enabled, set_lean_backward
from dynconvert.finetune.models import to_channels_last
from dynconvert.finetune.precision import AMP_DTYPES

MODELS = ["resnet50", "mobilenetv2_100", "efficientnet_b0"]
VARIANTS = ["static", "batch-folded", "dynconvert"]


def build_variants(
    name: str, k: int, device: str = "cpu", channels_last: bool = False
) -> tuple[dict[str, torch.nn.Module], float]:
    static, dynamic, seconds = load_pair(name, k)  # converted on CPU: the time users see
    folded = swap_convs(copy.deepcopy(dynamic), BatchFoldedConv2d)
    models = {"static": static, "batch-folded": folded, "dynconvert": dynamic}
    models = {v: m.to(device) for v, m in models.items()}
    if channels_last:  # the reference's 5-D kernels refuse Module.to's conversion
        models = {v: to_channels_last(m) for v, m in models.items()}
    return models, seconds


def example(model: torch.nn.Module, batch: int, args: argparse.Namespace) -> torch.Tensor:
    x = input_for(model, batch, args.input_size)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def memory_child(name: str, variant: str, batch: int, args: argparse.Namespace) -> None:
    models, _ = build_variants(name, args.k, args.device, args.channels_last)
    model = models.pop(variant)
    del models
    x = example(model, batch, args)
    step = train_step(model, x, amp=AMP_DTYPES.get(args.amp))
    step()  # warm-up: autotune and lazily created state
    peak = peak_memory_of(step, x.device)
    print(json.dumps({"peak_bytes": peak, "lean_backward": lean_backward_enabled()}))


def measure_model(name: str, args: argparse.Namespace) -> dict:
    models, convert_s = build_variants(name, args.k, args.device, args.channels_last)
    result: dict = {"model": name, "convert_s": convert_s, "eval": {}, "train": None}
    amp, sync = AMP_DTYPES.get(args.amp), cuda_sync(torch.device(args.device))
    for batch in args.eval_batch:
        x = example(models["static"], batch, args)
        calls = {v: eval_call(m, x, amp) for v, m in models.items()}
        for call in calls.values():  # autotune happens here, outside the timed rounds
            call()
        samples = interleaved_times(calls, rounds=args.rounds, warmup=0, sync=sync)
        times = summary(samples, args.stat)
        result["eval"][batch] = {
            "ms": {v: t * 1e3 for v, t in times.items()},
            "samples_ms": {v: [t * 1e3 for t in ts] for v, ts in samples.items()},
        }
        print(name, "eval", batch, {v: round(t / times["static"], 2) for v, t in times.items()},
              f"static {times['static'] * 1e3:.0f} ms", flush=True)  # fmt: skip
    if args.train:
        x = example(models["static"], args.train_batch, args)
        steps = {v: train_step(m, x, amp=amp) for v, m in models.items()}
        samples = interleaved_times(steps, rounds=args.train_rounds, warmup=1, sync=sync)
        times = summary(samples, args.stat)
        print(name, "train", {v: round(t / times["static"], 2) for v, t in times.items()},
              f"static {times['static'] * 1e3:.0f} ms", flush=True)  # fmt: skip
        memory = {}
        if args.memory:
            for v in models:
                child = [str(Path(__file__)), "--memory-child", name, v, str(args.train_batch)]
                child += ["--k", str(args.k), "--device", args.device]
                child += ["--channels-last"] if args.channels_last else []
                child += ["--amp", args.amp] if args.amp else []
                if args.input_size:
                    child += ["--input-size", *map(str, args.input_size)]
                measured = run_isolated_script(child)
                if measured["lean_backward"] != lean_backward_enabled():
                    raise RuntimeError("memory subprocess ran with another lean-backward setting")
                memory[v] = measured["peak_bytes"]
        result["train"] = {
            "batch": args.train_batch,
            "ms": {v: t * 1e3 for v, t in times.items()},
            "samples_ms": {v: [t * 1e3 for t in ts] for v, ts in samples.items()},
            "peak_bytes": memory,
        }
        print(name, "peak MiB", {v: round(b / 2**20) for v, b in memory.items()}, flush=True)
    return result


def summary(samples: dict[str, list[float]], stat: str) -> dict[str, float]:
    return medians(samples) if stat == "median" else {n: min(v) for n, v in samples.items()}


def run_isolated_script(args: list[str]) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | measure | static | batch-folded | dynconvert | dynconvert vs batch-folded |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = [(f"eval B={b}", e["ms"]) for b, e in r["eval"].items()]
        if r["train"]:
            rows.append((f"train step B={r['train']['batch']}", r["train"]["ms"]))
        for label, ms in rows:
            base = ms["static"]
            lines.append(
                f"| {r['model']} | {label} | 1.00 ({base:.0f} ms) | "
                f"{ms['batch-folded'] / base:.2f} | {ms['dynconvert'] / base:.2f} | "
                f"{ms['batch-folded'] / ms['dynconvert']:.2f}× faster |"
            )
        mem = (r["train"] or {}).get("peak_bytes")
        if mem:
            base = mem["static"]
            lines.append(
                f"| {r['model']} | peak memory of the step | 1.00 ({base / 2**20:.0f} MiB) | "
                f"{mem['batch-folded'] / base:.2f} | {mem['dynconvert'] / base:.2f} | |"
            )
        if r["convert_s"] is not None:
            lines.append(f"| {r['model']} | conversion time | | | {r['convert_s']:.2f} s | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=None, metavar="NAME",
        help=f"timm names (default: {' '.join(MODELS)}; with --quick: resnet50)",
    )  # fmt: skip
    parser.add_argument("--eval-batch", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--train-rounds", type=int, default=3)
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--stat", choices=["median", "min"], default="median",
        help="summary of the rounds; min resists load from other processes better",
    )  # fmt: skip
    parser.add_argument(
        "--input-size", nargs=3, type=int, default=None, metavar=("C", "H", "W"),
        help="per-sample input (default: the model's pretrained_cfg, 3 224 224)",
    )  # fmt: skip
    parser.add_argument(
        "--lean-backward", choices=["on", "off"], default=None,
        help="dynconvert's memory-lean backward (default: DYNCONVERT_LEAN_BACKWARD, else on; "
        "off: autograd keeps the mixed kernels)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="3 rounds, 2 train rounds; resnet50 unless --models names others",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None, help="autocast dtype")
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last inputs and weights"
    )
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "VARIANT", "BATCH"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/models.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.lean_backward:  # the environment carries it into the memory subprocesses
        os.environ["DYNCONVERT_LEAN_BACKWARD"] = "1" if args.lean_backward == "on" else "0"
        set_lean_backward(args.lean_backward == "on")
    if args.memory_child:
        name, variant, batch = args.memory_child
        memory_child(name, variant, int(batch), args)
        return 0
    if args.quick:
        args.rounds, args.train_rounds = 3, 2
        args.models = args.models or ["resnet50"]
    args.models = args.models or MODELS
    started = time.time()
    load_before = os.getloadavg()
    results = [measure_model(name, args) for name in args.models]
    meta = {
        "machine": platform.processor() or platform.machine(),
        "device": device_name(torch.device(args.device)),
        "amp": args.amp,
        "channels_last": args.channels_last,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "rounds": args.rounds,
        "train_rounds": args.train_rounds,
        "input_size": args.input_size or "pretrained_cfg",
        "lean_backward": lean_backward_enabled(),
        "autotune": autotune_enabled(),
        "stat": args.stat,
        "seconds": round(time.time() - started, 1),
        "glibc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    write_results(args.out, markdown(results), meta, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
