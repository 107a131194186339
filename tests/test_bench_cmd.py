"""``dynconvert bench``: runs end to end on a tiny timm model and reports what it measured."""

from __future__ import annotations

import json

import pytest
import torch

from dynconvert.benchmark import interleaved_times, static_twin
from dynconvert.cli import main
from dynconvert.layers import DynamicConv2d, autotune


def test_bench_tiny_timm_model_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(autotune, "_enabled", False)  # the cost model: no timing of layers
    out = tmp_path / "bench.json"
    args = ["bench", "test_resnet", "-b", "2", "--input-size", "3", "32", "32", "--rounds", "1"]
    assert main([*args, "--no-memory", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["batch"] == 2 and result["input"] == [3, 32, 32]
    assert set(result["eval_ms"]) == set(result["train_ms"]) == {"static", "dynamic"}
    assert all(v > 0 for v in result["eval_ms"].values())
    assert "eval latency" in capsys.readouterr().out


def test_bench_rejects_bad_batch_size():
    assert main(["bench", "test_resnet", "--batch-size", "0"]) == 2


def test_static_twin_computes_the_uniform_router_function():
    layer = DynamicConv2d(4, 6, 3, padding=1, k=3)
    twin = static_twin(torch.nn.Sequential(layer))[0]
    assert type(twin) is torch.nn.Conv2d
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():  # the router starts uniform: the dynamic layer is the mean kernel
        assert torch.allclose(twin(x), layer(x), atol=1e-5)


def test_interleaved_times_round_robin():
    order = []
    calls = {name: (lambda n=name: order.append(n)) for name in "abc"}
    times = interleaved_times(calls, rounds=2, warmup=1)
    assert order == list("abc") * 3
    assert {n: len(t) for n, t in times.items()} == {"a": 2, "b": 2, "c": 2}


@pytest.mark.parametrize("spec", ["nonexistent_model_xyz"])
def test_bench_unknown_model_is_one_line_error(spec, capsys):
    assert main(["bench", spec, "--no-train"]) != 0
    assert "error:" in capsys.readouterr().err
