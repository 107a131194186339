"""Why per-sample convs cost more than their arithmetic on CPU: oneDNN's weight reorder.

A dense conv call on CPU first copies its plain ``(O, I, kh, kw)`` kernel into oneDNN's blocked
layout, every call, then convolves. A static conv at batch B pays that once per call; a
dynamic layer that runs one conv per sample (``loop``/``dense``) pays it B times, on B different
kernels. This script separates the two costs for the ResNet-50 layer shapes, interleaved in
one run (median of ``--rounds``), as ratios to the static conv at the same batch size:

* ``per-sample, own kernels``: B convs at batch 1, each with its own kernel (what ``loop``
  runs once the kernels are mixed);
* ``per-sample, one kernel``: the same B convs all with the static kernel;
* ``per-sample, prepacked``: the same, with the kernel reordered once beforehand
  (``torch.ops.mkldnn._reorder_convolution_weight`` + ``_convolution_pointwise``).

The gap between the last two is the reorder; "prepacked" is what the per-sample convs would
cost if the mixed kernels could be written straight into the blocked layout. Two real
dynamic layers (K=4, router included) follow:

* ``dynconvert loop``: mixes each sample's kernel (plain layout), then ``F.conv2d``;
* ``dynconvert packed``: mixes each sample's kernel straight into the blocked layout
  (``engine/prepacked.py``), which is how it gets close to "prepacked".

    python benchmarks/weight_reorder.py                 # batch 8, 7 rounds
    python benchmarks/weight_reorder.py --batch 1 32 --rounds 5
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dynconvert.benchmark import interleaved_times, medians
from dynconvert.layers import DynamicConv2d

# (out, in, kernel, map): the 3×3 and 1×1 convs of ResNet-50's four stages
SHAPES = [
    (64, 64, 3, 56), (256, 64, 1, 56),
    (128, 128, 3, 28), (512, 128, 1, 28),
    (256, 256, 3, 14), (1024, 256, 1, 14),
    (512, 512, 3, 7), (2048, 512, 1, 7), (512, 2048, 1, 7),
]  # fmt: skip


def pack(weight: torch.Tensor, pad: int, input_shape: list[int]) -> torch.Tensor:
    """``weight`` reordered once into oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, [pad, pad], [1, 1], [1, 1], 1, input_shape
    )


def packed_conv(x: torch.Tensor, packed: torch.Tensor, pad: int) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=pad)`` for a kernel already in the blocked layout."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, None, [pad, pad], [1, 1], [1, 1], 1, "none", [], ""
    )


def candidates(out_ch: int, in_ch: int, k: int, size: int, batch: int) -> dict:
    pad = k // 2
    x = torch.randn(batch, in_ch, size, size)
    weight = torch.randn(out_ch, in_ch, k, k)
    own = torch.randn(batch, out_ch, in_ch, k, k)
    packed = pack(weight, pad, [1, in_ch, size, size])
    samples = [x[b : b + 1] for b in range(batch)]
    layers = {}
    for strategy in ("loop", "packed"):
        layers[strategy] = DynamicConv2d(in_ch, out_ch, k, padding=pad, bias=False, k=4,
                                         strategy=strategy).eval()  # fmt: skip
        with torch.no_grad():
            layers[strategy](x)  # packs the kernels once (packed)

    return {
        "static": lambda: F.conv2d(x, weight, None, 1, pad),
        "per-sample, own kernels": lambda: [
            F.conv2d(xb, own[b], None, 1, pad) for b, xb in enumerate(samples)
        ],
        "per-sample, one kernel": lambda: [F.conv2d(xb, weight, None, 1, pad) for xb in samples],
        "per-sample, prepacked": lambda: [packed_conv(xb, packed, pad) for xb in samples],
        "dynconvert loop": lambda: layers["loop"](x),
        "dynconvert packed": lambda: layers["packed"](x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = None
    rows = []
    with torch.no_grad():
        for batch in args.batch:
            for shape in SHAPES:
                calls = candidates(*shape, batch)
                names = list(calls)
                times = medians(interleaved_times(calls, rounds=args.rounds, warmup=1))
                base = times["static"]
                cells = [f"1.00 ({base * 1e3:.2f} ms)"]
                cells += [f"{times[n] / base:.2f}" for n in names[1:]]
                o, i, k, s = shape
                rows.append(f"| {batch} | {o}×{i}×{k}×{k} @ {s}×{s} | " + " | ".join(cells) + " |")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds}")
    print("| batch | conv | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
