"""How close is dynconvert to the floor of dynamic convolution on this machine?

Every strategy that mixes kernels (all but the export path) must read the K kernels and write
B mixed ones per layer and call (docs/performance.md, "The floor"). This script measures that
traffic alone, in the same interleaved rounds as the static and the dynamic model:

* ``static``: the timm model, eval, no grad;
* ``static + GEMM mixing``: the same forward, then for every converted layer one
  ``(B, K) @ (K, |W|)`` product into a reused buffer (the B mixed kernels reach memory);
* ``static + streamed mixing``: the same forward, then for every converted layer B passes of
  ``Σ_k a_bk·W_k`` into one reused kernel-sized buffer, the way ``loop``, ``dense`` and
  ``packed`` mix (each sample's kernel stays in cache, the K kernels are read B times);
* ``static + GEMM mixing + routers``: the GEMM-mixing floor, then every converted layer's
  router (pool → FC → ReLU → FC → softmax) on a copy of the input that layer saw in the model;
* ``dynconvert``: the converted model (``auto``).

The faster of the two mixings over ``static`` is a lower bound for any implementation that
mixes kernels with PyTorch's own ops and runs the per-sample convs at static speed; the
distance of ``dynconvert`` from it is what the strategies still lose. The routers are part of
the method (the attention must exist before any kernel is mixed), so that column is the
floor of the whole dynamic layer; their inputs are copies, not the activations the previous
layer has just written, so they may come from further away in the cache hierarchy.

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
from dynconvert.engine.mixing import mix_one_into
from dynconvert.layers import DynamicConvNd


def mixing_only(model: torch.nn.Module, batch: int) -> callable:
    """One ``(B, K) @ (K, |W|)`` product per dynamic layer of ``model`` into reused buffers."""
    flats = [m.weight.detach().flatten(1) for m in model.modules() if isinstance(m, DynamicConvNd)]
    attn = torch.full((batch, flats[0].shape[0]), 1.0 / flats[0].shape[0])
    size = max(f.shape[1] for f in flats)
    buffer = torch.empty(batch * size)

    def run() -> torch.Tensor:
        for flat in flats:
            out = torch.mm(
                attn, flat, out=buffer[: batch * flat.shape[1]].view(batch, flat.shape[1])
            )
        return out  # the last layer's mixed kernels, for the tests

    return run


def streamed_mixing_only(model: torch.nn.Module, batch: int) -> callable:
    """B streamed mixes per dynamic layer of ``model``, each into one reused kernel buffer."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, DynamicConvNd)]
    k = weights[0].shape[0]
    coeffs = [[1.0 / k] * k] * batch
    buffer = torch.empty(max(w[0].numel() for w in weights))

    def run() -> torch.Tensor:
        for weight in weights:
            out = buffer[: weight[0].numel()].view_as(weight[0])
            for sample in coeffs:
                mix_one_into(weight, sample, out)
        return out  # the last layer's last mixed kernel, for the tests

    return run


def routers_only(model: torch.nn.Module, x: torch.Tensor) -> callable:
    """Every dynamic layer's router of ``model`` on a copy of the input it sees for ``x``."""
    calls: list[tuple[torch.nn.Module, torch.Tensor]] = []

    def keep_input(layer: torch.nn.Module, args: tuple) -> None:
        calls.append((layer.attention, args[0].detach().clone()))

    layers = [m for m in model.modules() if isinstance(m, DynamicConvNd)]
    hooks = [layer.register_forward_pre_hook(keep_input) for layer in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()

    def run() -> list[torch.Tensor]:
        return [router(inputs) for router, inputs in calls]

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
    print(
        "| batch | static | static + GEMM mixing | static + streamed mixing "
        "| static + GEMM mixing + routers | dynconvert | dynconvert / floor "
        "| dynconvert / floor with routers |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224)
        mix = mixing_only(dynamic, batch)
        stream = streamed_mixing_only(dynamic, batch)
        routers = routers_only(dynamic, x)

        def static_call(x=x):
            return static(x)

        def floor_call(x=x, mix=mix):
            static(x)
            mix()

        def streamed_call(x=x, stream=stream):
            static(x)
            stream()

        def routed_call(x=x, mix=mix, routers=routers):
            static(x)
            mix()
            routers()

        def dynamic_call(x=x):
            return dynamic(x)

        with torch.inference_mode():
            dynamic(x)  # the autotuner measures here, not in the rounds
            times = medians(
                interleaved_times(
                    {
                        "static": static_call,
                        "floor": floor_call,
                        "streamed": streamed_call,
                        "routed": routed_call,
                        "dynamic": dynamic_call,
                    },
                    rounds=args.rounds,
                )
            )
        base = times["static"]
        floor = min(times["floor"], times["streamed"])
        floor_with_routers = floor + times["routed"] - times["floor"]
        print(
            f"| {batch} | 1.00 ({1e3 * base:.0f} ms) | {times['floor'] / base:.2f} | "
            f"{times['streamed'] / base:.2f} | {times['routed'] / base:.2f} | "
            f"{times['dynamic'] / base:.2f} | {times['dynamic'] / floor:.2f} | "
            f"{times['dynamic'] / floor_with_routers:.2f} |"
        )


if __name__ == "__main__":
    main()
