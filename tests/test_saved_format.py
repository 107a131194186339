"""A file saved by dynconvert before the redesign (issue 25) still loads, and computes the same.

``tests/data/saved_before_redesign.pt`` was written by commit 1915d5b (``src/dynconvert``, the
router then ``KernelAttention``, no ``variant`` in the config) from the model :func:`build`
below, converted with K=3 and non-uniform routers; ``saved_before_redesign_io.pt`` holds an
input batch and that model's output for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import rel_err
from torch import nn

import dynconvert
from dynconvert.io import read

DATA = Path(__file__).with_name("data")
SAVED = DATA / "saved_before_redesign.pt"


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )


def test_the_file_is_plain_weights_only_data_with_a_format_version():
    raw = torch.load(SAVED, map_location="cpu", weights_only=True)
    assert raw["format"] == "dynconvert" and isinstance(raw["version"], int)
    assert "variant" not in raw["config"]  # written before variants existed


def test_a_file_saved_before_the_redesign_loads_and_computes_the_same():
    model = dynconvert.load(SAVED, model=build()).eval()
    io = torch.load(DATA / "saved_before_redesign_io.pt", weights_only=True)
    with torch.no_grad():
        out = model(io["input"])
    assert rel_err(out, io["output"]) <= 1e-6
    dynamic = [m for m in model.modules() if isinstance(m, dynconvert.DynamicConvNd)]
    assert len(dynamic) == 3 and all(m.k == 3 for m in dynamic)
    assert read(SAVED)["config"].get("variant", "dy") == "dy"


def test_it_saves_again_with_the_variant_recorded(tmp_path):
    model = dynconvert.load(SAVED, model=build())
    dynconvert.save(model, tmp_path / "again.pt")
    assert read(tmp_path / "again.pt")["config"]["variant"] == "dy"
    again = dynconvert.load(tmp_path / "again.pt", model=build()).eval()
    io = torch.load(DATA / "saved_before_redesign_io.pt", weights_only=True)
    with torch.no_grad():
        assert rel_err(again(io["input"]), io["output"]) <= 1e-6
