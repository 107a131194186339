"""How close is dynconvert to the floor of dynamic convolution on this machine?

Every strategy that mixes kernels (all but the export path) must read the K kernels and write
B mixed ones per layer and call (docs/performance.md, "The floor"). This script measures that
traffic alone, in the same interleaved rounds as the static and the dynamic model:

* ``static``: the timm model, eval, no grad;
* ``static + mixing``: the same forward, then for every converted layer one
  ``(B, K) @ (K, |W|)`` product into a reused buffer, the cheapest form of the mixing;
* ``dynconvert``: the converted model (``auto``).

``(static + mixing) / static`` is a lower bound for any kernel-mixing implementation that
runs the per-sample convs at static speed; the distance of ``dynconvert`` from it is what
the strategies still lose.

    HF_HUB_OFFLINE=1 python benchmarks/floor.py                  # resnet50, batch 1 and 8
    HF_HUB_OFFLINE=1 python benchmarks/floor.py --model mobilenetv2_100 --batch 1 8 32
"""

from __future__ import annotations

import argparse
import copy
import os

import timm
import torch

import dynconvert
from dynconvert.benchmark import interleaved_times, medians
from dynconvert.layers import DynamicConvNd


def mixing_only(model: torch.nn.Module, batch: int) -> callable:
    """One ``(B, K) @ (K, |W|)`` product per dynamic layer of ``model`` into reused buffers."""
    flats = [m.weight.detach().flatten(1) for m in model.modules() if isinstance(m, DynamicConvNd)]
    attn = torch.full((batch, flats[0].shape[0]), 1.0 / flats[0].shape[0])
    size = max(f.shape[1] for f in flats)
    buffer = torch.empty(batch * size)

    def run() -> None:
        for flat in flats:
            torch.mm(attn, flat, out=buffer[: batch * flat.shape[1]].view(batch, flat.shape[1]))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    static = timm.create_model(args.model, pretrained=False).eval()
    dynamic, _ = dynconvert.convert(copy.deepcopy(static), k=args.k, skip_stem=True)
    dynamic.eval()
    n_weights = sum(m.weight[0].numel() for m in dynamic.modules() if isinstance(m, DynamicConvNd))
    print(f"{args.model}: {n_weights / 1e6:.1f} M dynamic conv weights, K={args.k}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| batch | static | static + mixing (floor) | dynconvert | dynconvert / floor |")
    print("| --- | --- | --- | --- | --- |")
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224)
        mix = mixing_only(dynamic, batch)

        def static_call(x=x):
            return static(x)

        def floor_call(x=x, mix=mix):
            static(x)
            mix()

        def dynamic_call(x=x):
            return dynamic(x)

        with torch.inference_mode():
            dynamic(x)  # the autotuner measures here, not in the rounds
            times = medians(
                interleaved_times(
                    {"static": static_call, "floor": floor_call, "dynamic": dynamic_call},
                    rounds=args.rounds,
                )
            )
        base = times["static"]
        print(
            f"| {batch} | 1.00 ({1e3 * base:.0f} ms) | {times['floor'] / base:.2f} | "
            f"{times['dynamic'] / base:.2f} | {times['dynamic'] / times['floor']:.2f} |"
        )


if __name__ == "__main__":
    main()
