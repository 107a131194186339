"""ConversionReport: rows, totals, MACs of a small model counted by hand, rich table, JSON."""

import json

import pytest
import timm
import torch
from rich.console import Console
from torch import nn

import dynconvert
from dynconvert import ConversionReport, DynconvertError


def small_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # stem: skipped
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Conv2d(16, 16, 1, groups=4, bias=False),
    )


def router_params(c: int, k: int, hidden: int) -> int:
    return c * hidden + hidden + hidden * k + k


@pytest.fixture
def converted():
    model = small_model()
    params_before = sum(p.numel() for p in model.parameters())
    _, report = dynconvert.convert(model, k=4, ratio=0.25, input_size=(3, 10, 10))
    return model, report, params_before


def test_rows_params_and_hand_counted_macs(converted):
    model, report, params_before = converted
    stem, conv1, conv2 = report.rows
    assert [r.name for r in report.rows] == ["0", "2", "3"]
    assert report.converted_names == ["2", "3"]
    assert (stem.status, conv1.status, conv2.status) == ("skipped", "converted", "converted")
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.stride) == (
        8, 16, [3, 3], [2, 2])  # fmt: skip
    assert conv2.groups == 4 and conv1.calls == 1
    assert conv1.input_shapes == [[8, 10, 10]]

    # stem: 8×10×10 outputs, each 3·3·3 MACs; skipped, so unchanged
    assert stem.params_before == stem.params_after == 8 * 3 * 9 + 8
    assert stem.macs_before == stem.macs_after == 8 * 10 * 10 * 27
    # conv1: 16×5×5 outputs × 8·3·3; router width max(4, round(8/4)) = 4
    w1 = 16 * 8 * 9
    assert conv1.params_before == w1 + 16
    assert conv1.params_after == 4 * w1 + 4 * 16 + router_params(8, 4, 4)
    assert conv1.macs_before == 16 * 25 * 72
    # + pool (8·10·10) + router (8·4 + 4·4) + kernel mixing (4·w1) + bias mixing (4·16)
    assert conv1.macs_after == 16 * 25 * 72 + 800 + 48 + 4 * w1 + 64
    # conv2: grouped 1×1, 16 out × 25 positions × 4 inputs each, no bias; width 4
    assert conv2.params_before == 64
    assert conv2.params_after == 4 * 64 + router_params(16, 4, 4)
    assert conv2.macs_before == 16 * 25 * 4
    assert conv2.macs_after == 1600 + 16 * 25 + (16 * 4 + 4 * 4) + 4 * 64

    # the layers actually built have exactly the reported parameter counts
    for row in (conv1, conv2):
        assert (
            sum(p.numel() for p in model.get_submodule(row.name).parameters()) == row.params_after
        )

    totals = report.totals
    assert totals["convs"] == 3 and totals["converted"] == 2 and totals["skipped"] == 1
    assert totals["params_before"] == sum(r.params_before for r in report.rows)
    assert totals["macs_after"] == sum(r.macs_after for r in report.rows)
    assert totals["macs_ratio"] == pytest.approx(totals["macs_after"] / totals["macs_before"])
    assert totals["model_params_before"] == params_before
    assert totals["model_params_after"] == sum(p.numel() for p in model.parameters())
    assert report.skip_reasons() == {"stem (reads the model input); skip_stem=True": 1}


def test_json_round_trip_and_atomic_write(converted, tmp_path):
    _, report, _ = converted
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["config"]["k"] == 4 and data["input_size"] == [3, 10, 10]
    path = report.to_json(tmp_path / "report.json")
    assert json.loads(path.read_text()) == data
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left
    again = ConversionReport.from_dict(json.loads(path.read_text()))
    assert again.to_dict() == data and again.converted_names == report.converted_names
    with pytest.raises(DynconvertError, match="does not exist"):
        report.to_json(tmp_path / "missing" / "report.json")
    with pytest.raises(ValueError, match="format"):
        ConversionReport.from_dict({"rows": []})


def test_rich_table_has_a_row_per_conv_and_a_totals_row(converted):
    _, report, _ = converted
    console = Console(record=True, width=200)
    report.print(console)
    text = console.export_text()
    assert "Sequential: 2/3 convs converted" in text
    assert "skipped: stem (reads the model input); skip_stem=True" in text
    assert text.count("converted") >= 3
    ratio = report.totals["params_ratio"]
    assert f"(×{ratio:.2f})" in text and "total" in text
    assert "model params:" in text and "3×10×10" in text


def test_unknown_shapes_give_unknown_macs():
    _, report = dynconvert.convert(small_model())  # no input size: nothing to probe with
    assert all(r.macs_before is None and r.macs_after is None for r in report.rows)
    assert report.totals["macs_before"] is None and report.totals["macs_ratio"] is None
    console = Console(record=True, width=200)
    report.print(console)
    text = console.export_text()
    assert "?" in text and "no input size known" in text


def test_timm_default_input_size_and_shared_calls():
    model = timm.create_model("resnet10t", pretrained=False)
    _, report = dynconvert.convert(model)
    assert report.input_size == list(model.pretrained_cfg["input_size"])
    assert all(r.macs_before for r in report.rows)
    # a skipped and a converted model with no dynamic layers would have ratio 1; here > 1
    assert report.totals["macs_ratio"] > 1 and report.totals["params_ratio"] > 1
    assert torch.is_tensor(next(model.parameters()))
