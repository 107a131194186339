"""What the ``packed`` strategy adds to a whole model: auto with and without it, one run.

Two copies of the converted model are tuned, one with ``packed`` among the candidates and
one without (as before it existed); each layer is then pinned to its pick, and the static
model and both copies are timed interleaved (median of ``--rounds``, eval, no_grad).
Prints each copy's picks and the ratios to static.

    python benchmarks/packed_ab.py                       # resnet50, batch 8 and 1
    python benchmarks/packed_ab.py --models mobilenetv2_100 --batch 1
"""

from __future__ import annotations

import argparse
import copy
import os
from collections import Counter
from unittest import mock

import torch

import dynconvert
from dynconvert.benchmark import interleaved_times, medians
from dynconvert.engine import autotune, prepacked, select_strategy
from dynconvert.layers import DynamicConvNd
from dynconvert.sources import build_timm_model


def tune_and_pin(model: torch.nn.Module, x: torch.Tensor, with_packed: bool) -> Counter:
    """Tune every layer for ``x`` (``packed`` allowed or not), then force its pick."""
    autotune.clear_cache()
    picks: list[str] = []
    layers = [m for m in model.modules() if isinstance(m, DynamicConvNd)]
    handles = [
        m.register_forward_pre_hook(lambda mod, args: picks.append(select_strategy(mod, args[0])))
        for m in layers
    ]  # select_strategy tunes on first sight, then looks up
    allowed = prepacked.available() and with_packed
    with mock.patch.object(prepacked, "_AVAILABLE", allowed), torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    for layer, pick in zip(layers, picks, strict=True):
        layer.strategy = pick
    return Counter(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 1])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds}")
    print("| model | batch | static | auto with packed | auto without packed | picks with packed |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        static = build_timm_model(name, pretrained=False).eval()
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224)
            variants = {"static": static}
            picks = {}
            for with_packed in (True, False):
                dynamic, _ = dynconvert.convert(copy.deepcopy(static), args.k)
                picks[with_packed] = tune_and_pin(dynamic, x, with_packed)
                variants[with_packed] = dynamic.eval()
            prepacked.forget()

            def call(model, x=x):
                def run():
                    with torch.no_grad():
                        model(x)

                return run

            times = medians(
                interleaved_times(
                    {k: call(m) for k, m in variants.items()}, rounds=args.rounds, warmup=2
                )
            )
            base = times["static"]
            shown = ", ".join(f"{s} {n}" for s, n in picks[True].most_common())
            print(f"| {name} | {batch} | 1.00 ({base * 1e3:.0f} ms) | {times[True] / base:.2f} | "
                  f"{times[False] / base:.2f} | {shown} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
