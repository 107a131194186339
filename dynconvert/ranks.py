"""Which process reports under ``torchrun``: rank 0 writes and prints, the others stay quiet.

Read from the ``RANK`` variable torchrun sets, so it holds before (and without) a process
group, and importing it costs no torch import (the CLI's ``--help`` stays fast).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator


def is_main_process() -> bool:
    """Rank 0 under torchrun (``RANK``), or a plain process: the one that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def warnings_on_main_only() -> Iterator[None]:
    """Ignore warnings inside the block on ranks other than 0 (rank 0 reports them once)."""
    with warnings.catch_warnings():
        if not is_main_process():
            warnings.simplefilter("ignore")
        yield
