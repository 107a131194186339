"""Atomic training checkpoints that ``torch.load(weights_only=True)`` reads.

A checkpoint holds only tensors, numbers, strings, lists and dicts: the model, optimizer,
scheduler and grad-scaler states, the position (epoch, global iteration, batch within the
epoch), the temperature schedule, the RNG states of every rank (a list indexed by rank,
gathered to rank 0, which alone writes), the teacher's config, the run's options and its
history so far.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DynconvertError
from ..files import safe_torch_load

FORMAT = "dynconvert.finetune-checkpoint/1"


def model_fingerprint(model: nn.Module) -> list[list]:
    """``[name, shape]`` of every state-dict entry: what a checkpoint must match to load."""
    return [[name, list(t.shape)] for name, t in model.state_dict().items()]


def capture_rng() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(state), gauss],
    }
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng["numpy"] = [name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed the torch, Python and NumPy RNGs (dropout, mixup, anything else global).

    Rank ``r`` of a distributed run uses ``seed + r`` (as timm does), so the ranks draw
    different dropout masks and mixup mixes; a one-process run uses ``seed`` itself.
    """
    seed = (seed + rank) % 2**32  # NumPy takes 32-bit seeds
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def check_writable(path: Path, what: str) -> None:
    """Fail before training when ``path`` cannot be written (missing or read-only folder)."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DynconvertError(f"{what}: {path} is a folder; give a file path", usage=True)
    if not folder.is_dir():
        raise DynconvertError(f"{what}: folder {folder} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-", delete=True):
            pass
    except OSError as exc:
        raise DynconvertError(
            f"{what}: cannot write to {folder} ({exc.strerror}); choose another path"
        ) from None


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Read a checkpoint and check that it was written for this model."""
    path = Path(path)
    if not path.is_file():
        raise DynconvertError(f"resume: checkpoint {path} does not exist", usage=True)
    try:
        state = safe_torch_load(path, map_location="cpu")
    except DynconvertError as exc:
        raise DynconvertError(f"resume: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DynconvertError(f"resume: {path} is not a dynconvert fine-tuning checkpoint")
    expected = model_fingerprint(model)
    if state["fingerprint"] != expected:
        theirs = {name: shape for name, shape in state["fingerprint"]}
        ours = {name: shape for name, shape in expected}
        diff = sorted(set(theirs) ^ set(ours)) or [n for n in ours if ours[n] != theirs.get(n)]
        raise DynconvertError(
            f"resume: {path} was written for another model ({len(theirs)} tensors vs "
            f"{len(ours)}; first difference: {diff[0] if diff else '?'}); resume with the "
            "same model and options"
        )
    return state
