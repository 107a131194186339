"""Per-layer cost of dynamic convolution, K=4: ratios to a static conv, measured interleaved.

Cells: the 1×1 and 3×3 convs of each ResNet-50 stage (56/28/14/7 maps), a depthwise 3×3 and
a MobileNetV2 inverted-residual block; batch 1, 8, 32; eval forward and train
forward+backward. Candidates, timed round-robin in one run (median of ``--rounds``; each
sample repeats the call until the static one would last ``--min-sample-ms``):

* ``static``: the ``nn.Conv2d`` (or block) itself;
* ``reference``: a plain batch-folded grouped conv (``_reference.py``);
* ``timm``: timm's ``CondConv2d`` driven by the same router;
* ``dc:<name>``: every dynconvert strategy forced, and ``auto``, dynconvert's own choice.

Per cell it prints ``auto/best``: auto's time over the best forced strategy's; the last line
counts the cells where auto is more than 10% slower than that (the goal of issue 6 is none).

    python benchmarks/layers.py                       # full grid
    python benchmarks/layers.py --quick               # a few cells, 3 rounds
    python benchmarks/layers.py --cells s4_3x3 --batch 8 --mode eval --rounds 5
    python benchmarks/layers.py --cells dw3x3 mbv2_block --batch 1 --rounds 1   # smoke
    python benchmarks/layers.py --device cuda --channels-last --amp bf16   # the GPU table

On CUDA every timed sample ends with ``torch.cuda.synchronize``; ``packed`` (oneDNN's
blocked layout) is CPU-only and left out there.

Writes ``--out`` (Markdown) and the same path with ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _reference import BatchFoldedConv2d, TimmCondConv, swap_convs

from dynconvert.benchmark import (
    autocast,
    cuda_sync,
    device_name,
    interleaved_times,
    medians,
    write_results,
)
from dynconvert.engine import STRATEGIES, autotune, select_strategy
from dynconvert.engine.lean_backward import lean_backward_enabled, set_lean_backward
from dynconvert.finetune.models import to_channels_last
from dynconvert.finetune.precision import AMP_DTYPES
from dynconvert.layers import DynamicConv2d


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


def _inverted_residual(channels: int = 32, expand: int = 6) -> nn.Module:
    hidden = channels * expand
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU6(),
        nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU6(),
        nn.Conv2d(hidden, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
    )


# name -> (static module factory, input (C, H, W))
CELLS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {}
for stage, (width, size) in enumerate([(64, 56), (128, 28), (256, 14), (512, 7)], start=1):
    wide = 4 * width
    CELLS[f"s{stage}_1x1_in"] = (lambda w=width, c=wide: _conv(c, w, 1), (wide, size, size))
    CELLS[f"s{stage}_3x3"] = (lambda w=width: _conv(w, w, 3), (width, size, size))
    CELLS[f"s{stage}_1x1_out"] = (lambda w=width, c=wide: _conv(w, c, 1), (width, size, size))
CELLS["dw3x3"] = (lambda: _conv(192, 192, 3, groups=192), (192, 28, 28))
CELLS["mbv2_block"] = (_inverted_residual, (32, 28, 28))

CPU = torch.device("cpu")

#: auto counts as too slow in a cell when its time exceeds the best forced strategy's by this.
AUTO_TOLERANCE = 1.10

QUICK = {"cells": ["s1_3x3", "s2_1x1_in", "s4_3x3", "dw3x3"], "batch": [8], "rounds": 3}


def dynamicize(module: nn.Module, strategy: str, k: int) -> nn.Module:
    """A copy of ``module`` with every Conv2d a DynamicConv2d (a random, non-uniform router)."""
    module = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(0)
    convs = [(n, m) for n, m in module.named_modules() if type(m) is nn.Conv2d]
    for name, conv in convs:
        layer = DynamicConv2d.from_conv(conv, k, strategy=strategy, generator=gen)
        with torch.no_grad():
            layer.attention.fc2.weight.normal_(0, 0.5, generator=gen)
        parent, _, child = name.rpartition(".")
        if not name:
            return layer
        setattr(module.get_submodule(parent) if parent else module, child, layer)
    return module


def _swapped(module: nn.Module, factory) -> nn.Module:
    if isinstance(module, DynamicConv2d):
        return factory(module)
    return swap_convs(copy.deepcopy(module), factory)


def candidates(
    static: nn.Module, batch: int, k: int, train: bool, device: torch.device
) -> dict[str, nn.Module]:
    dyn = dynamicize(static, "auto", k)
    models = {
        "static": static,
        "reference": _swapped(dyn, BatchFoldedConv2d),
        "timm": _swapped(dyn, TimmCondConv),
    }
    for name in STRATEGIES:
        if (name == "dense" and batch != 1) or (
            name == "packed" and (train or device.type != "cpu")
        ):
            continue  # dense: batch 1 only; packed: CPU inference only (else runs as loop)
        forced = copy.deepcopy(dyn)
        for m in forced.modules():
            if isinstance(m, DynamicConv2d):
                m.strategy = name
        models[f"dc:{name}"] = forced
    models["dc:auto"] = dyn
    return {name: m.to(device) for name, m in models.items()}


def _step(
    model: nn.Module, x: torch.Tensor, train: bool, amp: torch.dtype | None = None
) -> Callable[[], object]:
    if not train:

        def run() -> object:
            with torch.no_grad(), autocast(x.device, amp):
                return model(x)

        return run
    xg = x.clone().requires_grad_()
    with autocast(x.device, amp):
        grad = torch.randn_like(model(x))

    def run() -> object:
        with autocast(x.device, amp):
            out = model(xg)
        out.backward(grad)
        model.zero_grad(set_to_none=True)
        xg.grad = None
        return None

    return run


def auto_choice(
    model: nn.Module, x: torch.Tensor, train: bool, amp: torch.dtype | None = None
) -> str:
    """The strategies the auto layers picked, in module order (after warm-up).

    Asked in the cell's mode: training (autograd records) has its own autotune entries.
    """
    picks = []
    hook_handles = []
    for m in model.modules():
        if isinstance(m, DynamicConv2d):

            def hook(mod, args, picks=picks):
                picks.append(select_strategy(mod, args[0]))

            hook_handles.append(m.register_forward_pre_hook(hook))
    with torch.set_grad_enabled(train), autocast(x.device, amp):
        model(x)
    for h in hook_handles:
        h.remove()
    return "+".join(picks)


def _repeat(step: Callable[[], object], times: int, faults: list[int]) -> Callable[[], None]:
    """``step`` ``times`` times; appends the page faults per call of each sample to ``faults``.

    A minor fault is a page the kernel maps on first touch: glibc hands blocks above its
    mmap threshold (16–32 MiB outputs here) back to the system on free, so whether a call
    pays ~1 ms per 6 MB of fresh output depends on what the candidates before it freed.
    """

    def run() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(times):
            step()
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / times)

    return run


def run_cell(
    name: str,
    batch: int,
    mode: str,
    rounds: int,
    k: int,
    stat: str = "median",
    min_sample_ms: float = 10.0,
    device: torch.device = CPU,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict:
    factory, shape = CELLS[name]
    torch.manual_seed(0)
    static = factory().train(mode == "train")
    models = candidates(static, batch, k, mode == "train", device)
    for m in models.values():
        m.train(mode == "train")
    x = torch.randn(batch, *shape).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        for m in models.values():
            to_channels_last(m)  # the references' 5-D kernels refuse Module.to's conversion
    steps = {label: _step(m, x, mode == "train", amp) for label, m in models.items()}
    sync = cuda_sync(device)
    # Two warm-up passes (autotune, oneDNN primitives, glibc's mmap threshold; see
    # autotune.measure), then every sample repeats each call enough times to last about
    # min_sample_ms: one sub-millisecond call is mostly timer and scheduler noise.
    interleaved_times(steps, rounds=0, warmup=2)
    probe = interleaved_times({"static": steps["static"]}, rounds=3, warmup=0, sync=sync)
    probe = probe["static"]
    repeats = max(1, min(200, math.ceil(min_sample_ms / 1e3 / min(probe))))
    faults: dict[str, list[int]] = {label: [] for label in steps}
    repeated = {label: _repeat(step, repeats, faults[label]) for label, step in steps.items()}
    samples = interleaved_times(repeated, rounds=rounds, warmup=0, sync=sync)
    samples = {label: [t / repeats for t in ts] for label, ts in samples.items()}
    times = medians(samples) if stat == "median" else {n: min(v) for n, v in samples.items()}
    base = times["static"]
    forced = {n: t for n, t in times.items() if n.startswith("dc:") and n != "dc:auto"}
    best = min(forced, key=forced.__getitem__)
    choice = auto_choice(models["dc:auto"], x, mode == "train", amp)
    own = f"dc:{choice}" if f"dc:{choice}" in times else None  # one strategy for every layer
    return {
        "cell": name,
        "batch": batch,
        "mode": mode,
        "stat": stat,
        "repeats_per_sample": repeats,
        "samples_ms": {n: [t * 1e3 for t in v] for n, v in samples.items()},
        "static_ms": base * 1e3,
        "ratios": {n: t / base for n, t in times.items()},
        "best_forced": best,
        "auto_vs_best": times["dc:auto"] / times[best],
        "auto_choice": choice,
        # auto against a forced copy of its own choice: the same computation, so anything
        # far from 1.00 is measurement noise, not a wrong choice
        "auto_vs_own_choice": times["dc:auto"] / times[own] if own else None,
        "own_choice": own,
        "page_faults_per_call": {n: statistics.median(v) for n, v in faults.items() if v},
    }


def markdown(results: list[dict]) -> str:
    names = {n for r in results for n in r["ratios"] if n != "static"}
    labels = sorted(names, key=lambda n: (not n.startswith(("ref", "timm")), n != "dc:auto", n))
    head = ["cell", "B", "mode", "static ms", *labels, "auto / best", "auto / own", "auto picks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["cell"], str(r["batch"]), r["mode"], f"{r['static_ms']:.2f}"]
        cells += [f"{r['ratios'][n]:.2f}" if n in r["ratios"] else "–" for n in labels]
        own = r["auto_vs_own_choice"]
        cells += [f"{r['auto_vs_best']:.2f}", "–" if own is None else f"{own:.2f}"]
        cells.append(r["auto_choice"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def auto_summary(results: list[dict]) -> str:
    """One line: in how many cells auto is > 10% slower than the best forced strategy."""
    slow = [r for r in results if r["auto_vs_best"] > AUTO_TOLERANCE]
    line = (
        f"auto more than {AUTO_TOLERANCE - 1:.0%} slower than the best forced strategy in "
        f"{len(slow)} of {len(results)} cells"
    )
    same = [
        r for r in slow
        if r["auto_vs_own_choice"] is not None and r["auto_vs_own_choice"] > AUTO_TOLERANCE
    ]  # fmt: skip
    misses = [r for r in slow if r["best_forced"] != f"dc:{r['auto_choice']}"]
    line += (
        f"; in {len(same)} of them auto is as far from a forced copy of its own choice (the "
        f"same computation: noise), and in {len(misses)} it chose another strategy than the best"
    )
    if slow:
        line += ": " + ", ".join(
            f"{r['cell']} B={r['batch']} {r['mode']} ({_miss(r)})" for r in slow
        )
    return line


def _miss(result: dict) -> str:
    """How far auto is from the best, and the page faults per call of auto, its own pick and
    the best (see _repeat)."""
    faults = result["page_faults_per_call"]
    best, own = result["best_forced"], result["own_choice"]
    shown = dict.fromkeys(n for n in ("dc:auto", own, best) if n in faults)
    counts = ", ".join(f"{n[3:]} {faults[n]:.0f}" for n in shown)
    return f"{result['auto_vs_best']:.2f}× {best}; page faults per call: {counts}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="*", choices=list(CELLS), default=list(CELLS))
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 8, 32])
    parser.add_argument("--mode", nargs="*", choices=["eval", "train"], default=["eval", "train"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--stat", choices=["median", "min"], default="median",
        help="summary of the rounds; min resists load from other processes better",
    )  # fmt: skip
    parser.add_argument(
        "--min-sample-ms", type=float, default=10.0,
        help="repeat each call within a sample until the static one would take this long",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None, help="autocast dtype")
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last inputs and weights"
    )
    parser.add_argument(
        "--lean-backward", choices=["on", "off"], default=None,
        help="dynconvert's memory-lean backward (default: DYNCONVERT_LEAN_BACKWARD, else on)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few cells at batch 8, 3 rounds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/layers.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.batch, args.rounds = QUICK["cells"], QUICK["batch"], QUICK["rounds"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lean_backward:
        set_lean_backward(args.lean_backward == "on")
    device = torch.device(args.device)
    results = []
    started = time.time()
    for mode in args.mode:
        for batch in args.batch:
            for cell in args.cells:
                r = run_cell(
                    cell, batch, mode, args.rounds, args.k, args.stat, args.min_sample_ms,
                    device, AMP_DTYPES.get(args.amp), args.channels_last,
                )  # fmt: skip
                results.append(r)
                ratios = " ".join(f"{n}={v:.2f}" for n, v in r["ratios"].items())
                print(f"{cell:12s} B={batch:<3d} {mode:5s} auto/best={r['auto_vs_best']:.2f} "
                      f"({r['auto_choice']}) {ratios}", flush=True)  # fmt: skip
    meta = {
        "machine": platform.processor() or platform.machine(),
        "device": device_name(device),
        "amp": args.amp,
        "channels_last": args.channels_last,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_at_end": os.getloadavg(),
        "rounds": args.rounds,
        "stat": args.stat,
        "min_sample_ms": args.min_sample_ms,
        "seconds": round(time.time() - started, 1),
        "autotune": autotune.autotune_enabled(),
        "lean_backward": lean_backward_enabled(),
    }
    summary = auto_summary(results)
    meta["auto_slower_than_best"] = sum(r["auto_vs_best"] > AUTO_TOLERANCE for r in results)
    write_results(args.out, f"{markdown(results)}\n\n{summary}", meta, results)
    print(summary)  # again as the last line, after the metadata
    return 0


if __name__ == "__main__":
    sys.exit(main())
