"""Ways to compute ``y_b = conv(x_b, Σ_k a_bk·W_k) + Σ_k a_bk·b_k`` for a batch.

They are numerically the same function; they differ in speed, memory and in what a graph
exporter can express. Each strategy takes the layer, the already padded input and the
attention ``(B, K)``. ``dispatch.select_strategy`` is the seam where the layer picks one; a
user can force a name with ``strategy=``.

* ``grouped``: batch-folded grouped conv, the per-sample training path. The B mixed kernels
  become one conv with ``groups = B·groups``.
* ``loop``: one dense conv per sample with its own mixed kernel (on CPU mixed just before
  its conv, into a cache-resident buffer).
* ``dense``: batch size 1 only; mix once and run one plain conv.
* ``unfold``: im2col + batched GEMM (no im2col for 1×1 convs); see ``unfold.py``.
* ``packed``: ``loop`` with the K kernels kept, and mixed, in oneDNN's blocked layout, so
  the per-sample convs skip the kernel copy oneDNN makes on every call (CPU inference;
  elsewhere it runs ``loop``); see ``prepacked.py``.
* ``static``: export path. Convolution is linear in the kernel, so
  ``conv(x, Σ a_k W_k) = Σ a_k conv(x, W_k)``: one conv with the K kernels stacked on the
  output axis, then a weighted sum. No shape depends on the batch size, so ONNX and
  ``torch.export`` keep a dynamic batch dimension.

``grouped``, ``loop``, ``dense`` and ``static`` are in ``direct.py``.

``'auto'`` measures the eligible strategies once per layer geometry and input shape and
caches the fastest (``autotune.py``; switch off with ``DYNCONVERT_AUTOTUNE=0``). When
autograd records, ``dispatch.run`` wraps the strategy in the memory-lean backward
(``lean_backward.py``), which recomputes the mixed kernels instead of saving them (switch
off with ``DYNCONVERT_LEAN_BACKWARD=0`` or ``lean_backward.set_lean_backward``). Large
temporaries that autograd does not see live in reused buffers (``workspace.py``).
"""

from __future__ import annotations

from .direct import dense, grouped, loop, static
from .prepacked import packed_conv
from .spec import Strategy
from .unfold import unfold_conv

#: Every strategy by the name ``strategy=`` takes (``'auto'`` picks one of them).
STRATEGIES: dict[str, Strategy] = {
    "grouped": grouped,
    "loop": loop,
    "dense": dense,
    "static": static,
    "unfold": unfold_conv,
    "packed": packed_conv,
}
