"""Never lose work: a run killed by SIGKILL (or stopped by Ctrl-C) mid-epoch and resumed ends
with the weights of an uninterrupted run (CPU, same seed). Real subprocesses, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from finetune_helpers import make_data_dir, write_tinynet

ITERS_PER_EPOCH = 6  # 24 images, batch 4


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dynconvert",
        "finetune",
        "--model",
        "tinynet:tiny",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--input-size",
        "16",
        "--seed",
        "3",
        "--lr",
        "0.05",
        "--checkpoint-every",
        "1",
        "--temperature-start",
        "5",
        "--no-progress",
        *extra,
    ]


def environment(code: Path, sleep: float | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"  # same thread count in every run: same float summation order
    if sleep:
        env["TINYNET_SLEEP"] = str(sleep)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_data_dir(root / "data")
    code = write_tinynet(root)
    reference = root / "reference.pt"
    done = subprocess.run(
        command(data, reference), env=environment(code), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return root, data, code, torch.load(reference, weights_only=True)["state_dict"]


def interrupt_mid_epoch(root: Path, data: Path, code: Path, sig: int, name: str):
    """Start a slowed-down run, wait until a mid-epoch-2 checkpoint exists, send ``sig``."""
    out = root / f"{name}.pt"
    ckpt = root / f"{name}.ckpt"
    proc = subprocess.Popen(
        command(data, out),
        env=environment(code, sleep=0.25),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"run ended before it was interrupted: {proc.stderr.read()}")
            if ckpt.exists():
                state = torch.load(ckpt, weights_only=True)
                if state["iteration"] >= ITERS_PER_EPOCH + 2:
                    break
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out, ckpt, proc.returncode, err


def resume_and_compare(data, code, out, ckpt, reference):
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and 0 < state["batch"] < ITERS_PER_EPOCH  # mid-epoch 2
    assert not out.exists()
    done = subprocess.run(
        command(data, out, "--resume", str(ckpt)),
        env=environment(code),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    resumed = torch.load(out, weights_only=True)["state_dict"]
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert (resumed[key].double() - value.double()).abs().max() <= 1e-6, key


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(setup):
    root, data, code, reference = setup
    out, ckpt, returncode, _ = interrupt_mid_epoch(root, data, code, signal.SIGKILL, "killed")
    assert returncode == -signal.SIGKILL
    assert [p.name for p in root.glob(".*.tmp")] == []  # no half-written files
    resume_and_compare(data, code, out, ckpt, reference)


def test_ctrl_c_saves_the_current_state_and_resume_matches(setup):
    root, data, code, reference = setup
    out, ckpt, returncode, err = interrupt_mid_epoch(root, data, code, signal.SIGINT, "stopped")
    assert returncode != 0, err  # the CLI shell reports the interrupt (click: "aborted")
    assert f"state saved to {ckpt}" in err
    assert err.strip().splitlines()[-1].startswith("error:")
    resume_and_compare(data, code, out, ckpt, reference)


def test_sigterm_saves_the_current_state_and_resume_matches(setup):
    """SIGTERM (what kill and job schedulers send) stops the run as Ctrl-C does."""
    root, data, code, reference = setup
    out, ckpt, returncode, err = interrupt_mid_epoch(root, data, code, signal.SIGTERM, "termed")
    assert returncode == 128 + signal.SIGTERM, err
    assert f"state saved to {ckpt}" in err
    last = err.strip().splitlines()[-1]
    assert last == f"error: interrupted by SIGTERM; {ckpt} saved and complete", err
    assert [p.name for p in root.glob(".*.tmp")] == []
    resume_and_compare(data, code, out, ckpt, reference)
