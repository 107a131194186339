"""The engine's run-time switches, in one object: read at every forward, set by the user.

``autotune.set_autotune`` and ``lean_backward.set_lean_backward`` are the public setters; the
environment gives the defaults at import (``DYNCONVERT_AUTOTUNE=0``,
``DYNCONVERT_LEAN_BACKWARD=0``: off).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import tuning


def _on_unless_disabled(variable: str) -> bool:
    """A switch that the environment variable turns off with 0, false, no or off."""
    return os.environ.get(variable, "1").strip().lower() not in {"0", "false", "no", "off"}


@dataclass
class Switches:
    #: Time the eligible strategies of ``'auto'`` layers (else the cost model decides).
    autotune: bool
    #: Layers with fewer multiply-adds per call use the cost model even when ``autotune``.
    min_macs: int
    #: Run recorded forwards under the memory-lean backward (``lean_backward.py``).
    lean_backward: bool


SWITCHES = Switches(
    autotune=_on_unless_disabled("DYNCONVERT_AUTOTUNE"),
    min_macs=tuning.MIN_MACS,
    lean_backward=_on_unless_disabled("DYNCONVERT_LEAN_BACKWARD"),
)
