"""Every machine-tuned threshold of the engine, in one table.

Each value was set from a measurement; the comment says which. ``docs/performance.md`` has the
history (machines, runs, numbers). The engine reads them as ``tuning.NAME`` at call time, so a
test or an experiment can patch one here. The run-time switches (autotune on or off, its
size floor, the lean backward) are in ``switches.py``.
"""

from __future__ import annotations

# -- mixing (mixing.py, direct.py) -------------------------------------------------------

#: Mixed kernels smaller than this are allocated, not written into the scratch buffer: small
#: products come from the allocator's free lists faster than through ``out=``
#: (docs/performance.md, "Scratch buffers").
SCRATCH_MIN_BYTES = 2**20

#: ``loop`` and ``dense`` mix each sample's kernel just before its conv (streamed) for K
#: kernels of at least this many bytes; below, the K+1 calls cost more than the bandwidth they
#: save over one GEMM (``benchmarks/mixing.py``, docs/performance.md, "The mixing itself is at
#: the memory bandwidth").
STREAM_MIX_MIN_BYTES = 2 * 2**20

#: ... and, at batch sizes above 1, for K kernels of at most this many bytes, so that
#: re-reading them for each sample hits the last-level cache (same measurement, 32 MiB L3).
STREAM_MIX_MAX_BYTES = 16 * 2**20

# -- autotune: what is timed, and how (autotune.py) ---------------------------------------

#: Below this many multiply-adds per call, timing noise exceeds any difference between
#: strategies: the cost model decides (``benchmarks/layers.py``). ``set_autotune(min_macs=)``
#: overrides it at run time.
MIN_MACS = 2_000_000

#: Interleaved timing rounds per candidate, each in a new seeded order (docs/performance.md,
#: "How auto chooses").
ROUNDS = 3

#: Back-to-back calls of one candidate per round, the best one counts: a single call pays for
#: the blocks its predecessor freed (a MobileNetV2 depthwise conv at batch 32 was tuned to
#: ``loop``, 1.6x slower than ``grouped``; docs/performance.md, "How auto chooses").
CALLS_PER_SAMPLE = 2

#: ``static`` (K convs, outputs mixed) does K times a conv's work and keeps a K times larger
#: output for backward; on CPU it is timed only at batch >= 2K on maps of at most this many
#: outputs, where it can beat mixing B kernels (ResNet-50 stage 4 1x1 convs in training).
STATIC_MAX_OUTPUTS = 14 * 14

#: At batch 1 (eval, CPU) ``packed`` is timed only for K kernels of at least this many bytes:
#: below, its extra calls and channels_last copy cost as much as the kernel copy it saves.
#: Timed against dense on every layer, whole mobilenetv2_100 and efficientnet_b0 ran 3-4%
#: slower; with this floor they are unchanged and resnet50 4% faster (docs/performance.md).
PACKED_MIN_BYTES_AT_BATCH_1 = 2 * 2**20

# -- the cost model, used where nothing is timed (autotune.cost_model_choice) -------------

#: Output maps of at most this many positions go to ``unfold`` (its GEMM's long inner
#: dimension beats B small convs: ResNet stage 4, 7x7; ``benchmarks/layers.py`` on CPU).
UNFOLD_MAX_OUTPUTS = 14 * 14

#: Grouped convs with at most this many input channels per group count as depthwise and go to
#: ``grouped`` (same benchmark).
DEPTHWISE_MAX_CHANNELS_PER_GROUP = 4

# -- the packed strategy (prepacked.py) ---------------------------------------------------

#: Packs kept per layer, one per input shape, the oldest dropped first: memory (K times the
#: layer's weights per pack) stays bounded under varying input shapes (docs/performance.md,
#: "packed and memory").
MAX_PACKS_PER_LAYER = 2

#: Elements of the K kernels compared on every call (a few µs): edits through ``.data``
#: (``layer.weight.data.mul_(2)``, old-style init code, numpy views) do not bump
#: ``_version``. The positions are scattered at random (seeded), not strided: a regular stride
#: can fall on a lattice of the kernel (every 36th element of a 4x3x3 block is one tap) and
#: miss a structured edit such as zeroing the centre taps. An edit of a handful of single
#: elements can still go unseen; assign a new tensor or use ``copy_`` under ``no_grad``.
SAMPLED_ELEMENTS = 1024
