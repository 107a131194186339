"""Would choosing strategies inside the model beat the layer autotuner? (Issue 6: not reliably.)

The autotuner (``dynconvert/engine/autotune.py``) times each layer alone, with its K kernels in
cache. This script picks each layer's strategy inside the model instead, then A/B-tests both
sets of picks on the whole model:

1. one eval forward lets the autotuner choose (the "layer tuner" picks);
2. ``--rounds`` times, every layer runs each of its eligible strategies once (forced, in a new
   random order per layer and round), and forward hooks time every dynamic layer in place;
3. each layer keeps the strategy with the least median time (the "in-model" picks);
4. two copies of the model, one pinned to each set of picks, are timed interleaved against
   the static model, ``--repeats`` times.

    HF_HUB_OFFLINE=1 python benchmarks/tune_in_model.py                 # resnet50, batch 8
    HF_HUB_OFFLINE=1 python benchmarks/tune_in_model.py --model mobilenetv2_100 --batch 1

Results of 2026-11-29 are in docs/performance.md ("third session: tuning inside the model").
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F

from dynconvert.benchmark import input_for, interleaved_times, load_pair, medians
from dynconvert.engine import STRATEGIES, SWITCHES, autotune
from dynconvert.layers import DynamicConvNd


def strategy_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict[DynamicConvNd, torch.Tensor]:
    """Each dynamic layer's input as its strategy sees it (padded where the layer pads first)."""
    seen: dict[DynamicConvNd, torch.Tensor] = {}

    def record(layer: DynamicConvNd, inputs: tuple) -> None:
        pad = layer._resolved.pad
        seen[layer] = inputs[0] if pad is None else F.pad(inputs[0], pad, layer._resolved.pad_mode)

    layers = [m for m in model.modules() if isinstance(m, DynamicConvNd)]
    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def pick_in_model(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> dict[int, str]:
    """Layer index → the eligible strategy with the least median time measured in place."""
    inputs = strategy_inputs(model, x)
    layers = list(inputs)
    candidates = {}
    for layer in layers:
        xi = inputs[layer]
        if autotune.multiply_adds(layer, xi) < SWITCHES.min_macs:
            candidates[layer] = [autotune.choose(layer, xi, STRATEGIES)]  # the cost model's
        else:
            candidates[layer] = list(autotune.eligible(layer, xi, STRATEGIES))
    samples: dict[tuple[DynamicConvNd, str], list[float]] = defaultdict(list)
    started: dict[DynamicConvNd, float] = {}
    handles = [
        h
        for layer in layers
        for h in (
            layer.register_forward_pre_hook(
                lambda m, _i: started.__setitem__(m, time.perf_counter())
            ),
            layer.register_forward_hook(
                lambda m, _i, _o: samples[(m, m.strategy)].append(time.perf_counter() - started[m])
            ),
        )
    ]
    rng = random.Random(0)
    width = max(len(c) for c in candidates.values())
    try:
        for _ in range(rounds):
            orders = {layer: rng.sample(c, len(c)) for layer, c in candidates.items()}
            for i in range(width):
                for layer, order in orders.items():
                    layer.strategy = order[i % len(order)]
                model(x)
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            layer.strategy = "auto"
    return {
        index: min(candidates[layer], key=lambda n: statistics.median(samples[(layer, n)]))
        for index, layer in enumerate(layers)
    }


def pinned_copy(model: torch.nn.Module, picks: dict[int, str]) -> torch.nn.Module:
    pinned = copy.deepcopy(model)
    layers = [m for m in pinned.modules() if isinstance(m, DynamicConvNd)]
    for index, name in picks.items():
        layers[index].strategy = name
    return pinned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="in-model tuning rounds")
    parser.add_argument("--ab-rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"))
    args = parser.parse_args()
    torch.manual_seed(0)
    static, dynamic, _ = load_pair(args.model, args.k)
    static.eval(), dynamic.eval()
    x = input_for(static, args.batch, args.input_size)
    with torch.no_grad():
        inputs = strategy_inputs(dynamic, x)  # the layer autotuner chooses here
        layer_tuner = {
            i: autotune.choose(layer, xi, STRATEGIES)
            for i, (layer, xi) in enumerate(inputs.items())
        }
        started = time.perf_counter()
        in_model = pick_in_model(dynamic, x, args.rounds)
        print(f"in-model tuning: {time.perf_counter() - started:.1f} s; "
              f"{sum(layer_tuner[i] != in_model[i] for i in in_model)} of {len(in_model)} "
              f"layers differ; layer tuner {dict(Counter(layer_tuner.values()))}, "
              f"in model {dict(Counter(in_model.values()))}")  # fmt: skip
        variants = {"layer tuner": pinned_copy(dynamic, layer_tuner),
                    "in model": pinned_copy(dynamic, in_model)}  # fmt: skip
        for model in variants.values():
            model(x)
        print("| repeat | static | layer tuner's picks | in-model picks |")
        print("| --- | --- | --- | --- |")
        for repeat in range(args.repeats):
            calls = {"static": lambda: static(x)}
            calls.update({name: (lambda m=m: m(x)) for name, m in variants.items()})
            t = medians(interleaved_times(calls, rounds=args.ab_rounds))
            print(f"| {repeat + 1} | 1.00 ({t['static'] * 1e3:.0f} ms) | "
                  f"{t['layer tuner'] / t['static']:.3f} | {t['in model'] / t['static']:.3f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
