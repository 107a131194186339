"""The engine that computes a dynamic conv fast: strategies, autotune, the lean backward.

The layers (``dynconvert.layers``) hold the parameters and the math; they call :func:`run`
with themselves, the padded input and the attention, and the engine picks and runs a
strategy. The engine never imports the layers: what it reads from one is
:class:`DynamicConvSpec`. Machine-tuned thresholds are in ``tuning.py``, the run-time switches
in ``switches.py`` (set through :func:`set_autotune` and :func:`set_lean_backward`).

Modules, each importing only those above it in this list:
``spec``, ``tuning``, ``switches``, ``context``, ``workspace``, ``layout`` (basics);
``mixing``; ``direct`` (grouped, loop, dense, static), ``unfold``, ``prepacked`` (packed);
``strategies`` (the registry); ``lean_backward``; ``autotune``; ``dispatch`` (:func:`run`).
"""

from .autotune import autotune_enabled, clear_cache, set_autotune
from .context import graph_capture
from .dispatch import run, select_strategy
from .layout import output_memory_format
from .lean_backward import lean_backward_enabled, set_lean_backward
from .mixing import mix_bias, mix_kernels
from .spec import DynamicConvSpec, Strategy
from .strategies import STRATEGIES
from .switches import SWITCHES

__all__ = [
    "STRATEGIES",
    "SWITCHES",
    "DynamicConvSpec",
    "Strategy",
    "autotune_enabled",
    "clear_cache",
    "graph_capture",
    "lean_backward_enabled",
    "mix_bias",
    "mix_kernels",
    "output_memory_format",
    "run",
    "select_strategy",
    "set_autotune",
    "set_lean_backward",
]
