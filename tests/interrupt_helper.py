"""Runs the dynconvert CLI with a write made to stop at a known point, for test_interrupts.py.

``python interrupt_helper.py MODE ARGS...``, MODE one of:

- ``slow-save``: ``torch.save`` writes part of the file, prints ``WRITING <temporary>`` to
  stdout and waits (up to a minute) for the test to send a signal: a signal during a save,
  without racing real work.
- ``term-after-rename``: right after the rename that puts a file in place, the process sends
  itself SIGTERM: the signal arrives after the final rename.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from dynconvert.cli import main


def slow_save(obj, f, *args, **kwargs) -> None:
    f.write(b"PK half a file")
    f.flush()
    print(f"WRITING {f.name}", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise SystemExit("no signal came")


def term_after_rename(replace):
    def replace_then_signal(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    return replace_then_signal


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "slow-save":
        torch.save = slow_save
    elif mode == "term-after-rename":
        os.replace = term_after_rename(os.replace)
    else:
        raise SystemExit(f"unknown mode {mode}")
    sys.exit(main(args))
