"""Ways to mix K kernels for B samples with PyTorch's own ops, and the bandwidth each reaches.

The mixing ``W_b = Σ_k a_bk·W_k`` is pure memory traffic. ``loop``, ``dense`` and ``packed``
mix each sample's kernel right before its conv, into one kernel-sized buffer that stays in
cache (``mixing.mix_one_into``: one ``mul`` and K−1 ``add_``, K passes over the output).
This script asks whether another form of the same arithmetic is faster, per ResNet-50 kernel
shape, mixing all B samples of one layer:

* ``streamed``: B times ``mix_one_into`` into one buffer (what dynconvert runs);
* ``GEMM, G rows``: ``(G, K) @ (K, |W|)`` into G reused buffers, B/G times: each pass over
  the K kernels serves G samples, but writes G mixed kernels that no longer fit in cache;
* ``chunked``: the streamed form over slices small enough for the output to stay in L2.

Before every timed call a 64 MiB buffer is written (outside the timing), so that the K
kernels come from memory as they do in a whole model; candidates run in a new random order
each round, and the median counts. ``GB/s`` counts what the streamed form must move, ``B·(K+1)·|W|``
bytes (K kernels read and one written per sample), over the time.

    python benchmarks/mixing.py                  # batch 8, K=4, 9 rounds
    python benchmarks/mixing.py --batch 8 1 --rounds 15
"""

from __future__ import annotations

import argparse
import os

import torch

from dynconvert.benchmark import interleaved_times, medians
from dynconvert.engine.mixing import mix_one_into

# (name, |W| in elements): the ResNet-50 kernels whose mixing costs most
SHAPES = {
    "128×128×3×3": 128 * 128 * 9,
    "256×256×3×3": 256 * 256 * 9,
    "1024×256×1×1": 1024 * 256,
    "2048×512×1×1": 2048 * 512,
    "512×512×3×3": 512 * 512 * 9,
}
CHUNK = 128 * 1024  # elements: 512 KiB of output per slice


def candidates(n: int, k: int, batch: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    kernels = torch.randn(k, n, generator=gen)
    attn = torch.softmax(torch.randn(batch, k, generator=gen), dim=1)
    coeffs = attn.tolist()
    one = torch.empty(n)
    rows = torch.empty(batch, n)

    # each run returns the last sample's mixed kernel, for the tests
    def streamed() -> torch.Tensor:
        for sample in coeffs:
            mix_one_into(kernels, sample, one)
        return one

    def gemm(group: int):
        def run() -> torch.Tensor:
            for start in range(0, batch, group):
                torch.mm(attn[start : start + group], kernels, out=rows[:group])
            return rows[group - 1]

        return run

    def chunked() -> torch.Tensor:
        for sample in coeffs:
            for start in range(0, n, CHUNK):
                mix_one_into(kernels[:, start : start + CHUNK], sample, one[start : start + CHUNK])
        return one

    runs = {"streamed": streamed}
    for group in sorted({g for g in (2, 4, batch) if g <= batch and batch % g == 0}):
        runs[f"GEMM, {group} rows"] = gemm(group)
    runs["chunked"] = chunked
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    flush = torch.empty(64 * 2**20 // 4)
    print(f"K={args.k}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    for batch in args.batch:
        names = None
        for shape, n in SHAPES.items():
            runs = candidates(n, args.k, batch)
            times = interleaved_times(runs, args.rounds, before=lambda: flush.fill_(1.0))
            ms = {name: 1e3 * t for name, t in medians(times).items()}
            if names is None:
                names = list(runs)
                print(f"\nbatch {batch}: ms to mix one layer's B kernels, median")
                print("| kernel | " + " | ".join(names) + " | streamed GB/s |")
                print("|---|" + "---|" * (len(names) + 1))
            moved = batch * (args.k + 1) * n * 4
            rate = moved / (ms["streamed"] / 1e3) / 1e9
            cells = " | ".join(f"{ms[name]:.2f}" for name in names)
            print(f"| {shape} | {cells} | {rate:.0f} |")


if __name__ == "__main__":
    main()
