"""``dynconvert bench`` and the benchmark helpers: end to end on tiny models, and the baselines
of ``benchmarks/`` compute the same function as the dynamic layer."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from timm.layers import Conv2dSame

from dynconvert.benchmark import interleaved_times
from dynconvert.cli import main
from dynconvert.engine import SWITCHES, autotune
from dynconvert.finetune import static_twin
from dynconvert.layers import DynamicConv2d, DynamicConv2dSame


def test_bench_tiny_timm_model_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(SWITCHES, "autotune", False)  # the cost model: no timing of layers
    out = tmp_path / "bench.json"
    args = ["bench", "test_resnet", "-b", "2", "--input-size", "3,32,32", "--rounds", "1"]
    assert main([*args, "--no-memory", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["batch"] == 2 and result["input"] == [3, 32, 32]
    assert set(result["eval_ms"]) == set(result["train_ms"]) == {"static", "dynamic"}
    assert all(v > 0 for v in result["eval_ms"].values())
    assert "eval latency" in capsys.readouterr().out


def test_bench_rejects_bad_batch_size():
    assert main(["bench", "test_resnet", "--batch-size", "0"]) == 2


def test_bench_device_cpu_amp_bf16_end_to_end_with_memory(tmp_path, capsys, monkeypatch):
    """--device/--amp reach the timed passes, the step and the fresh memory processes."""
    from dynconvert import benchmark

    monkeypatch.setattr(SWITCHES, "autotune", False)
    monkeypatch.setenv("DYNCONVERT_AUTOTUNE", "0")  # and in the memory children
    seen = []
    for name in ("eval_call", "train_step"):
        real = getattr(benchmark, name)

        def spy(model, x, *args, _real=real, _name=name, **kwargs):
            seen.append((_name, x.device.type, kwargs.get("amp", args[0] if args else None)))
            return _real(model, x, *args, **kwargs)

        monkeypatch.setattr(benchmark, name, spy)
    out = tmp_path / "bench.json"
    args = ["bench", "test_resnet", "-b", "2", "--input-size", "3,32,32", "--rounds", "1"]
    assert main([*args, "--device", "cpu", "--amp", "bf16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["amp"] == "bf16"
    assert set(result["peak_bytes"]) == {"static", "dynamic"}  # the children ran, with bf16
    assert all(isinstance(v, int) and v >= 0 for v in result["peak_bytes"].values())
    want = [("eval_call", "cpu", torch.bfloat16)] * 2 + [("train_step", "cpu", torch.bfloat16)] * 2
    assert sorted(seen, key=str) == want
    title = " ".join(capsys.readouterr().out.split())  # rich may wrap the title
    assert "test_resnet on cpu, bf16 autocast: batch 2" in title


@pytest.mark.parametrize(
    ("device", "named"),
    [
        ("gpu", "'gpu' is not a device"),
        ("cuda:x", "'cuda:x' is not a device"),
        ("meta", "cpu or cuda, not 'meta'"),
        pytest.param(
            "cuda",
            "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
        ("cuda:99", "cuda"),  # no GPU, or no 100th one
    ],
)
def test_bench_bad_device_is_one_line_before_any_model_is_built(device, named, capsys, monkeypatch):
    from dynconvert import benchmark
    from dynconvert.cli import bench_cmd

    built = []
    monkeypatch.setattr(bench_cmd, "_load_pair", lambda *a: built.append(a))
    monkeypatch.setattr(benchmark, "load_pair", lambda *a, **k: built.append(a))
    assert main(["bench", "test_resnet", "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device: ") and named in err[0], err
    assert built == []


def test_bench_unsupported_amp_is_one_line_before_any_model_is_built(capsys, monkeypatch):
    from dynconvert.cli import bench_cmd
    from dynconvert.finetune import precision

    built = []
    monkeypatch.setattr(bench_cmd, "_load_pair", lambda *a: built.append(a))
    monkeypatch.setattr(precision, "autocast_supported", lambda device, dtype: False)
    assert main(["bench", "test_resnet", "--amp", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--amp: fp16 autocast is not supported on cpu" in err[0], err
    assert built == []


@pytest.mark.parametrize("input_size", [(3, 24, 24), None])
def test_step_peak_memory_passes_device_and_amp_to_the_memory_child(
    input_size, capsys, monkeypatch
):
    """The argv of ``step_peak_memory`` read back by ``_memory_child``: device, amp, --model
    and the optional trailing C H W land where they belong."""
    from dynconvert import benchmark

    sent = []
    monkeypatch.setattr(
        benchmark, "run_isolated", lambda module, args: sent.append(args) or {"peak_bytes": 7}
    )
    args = ("test_resnet", "dynconvert", 1, 2, input_size, "auto", None, "cpu", "bf16")
    assert benchmark.step_peak_memory(*args) == 7
    seen = {}

    def step(model, x, amp=None):
        dynamic = any(isinstance(m, DynamicConv2d) for m in model.modules())
        seen.update(amp=amp, shape=tuple(x.shape), x=x.device, dynamic=dynamic)
        seen["model"] = next(model.parameters()).device
        return lambda: None

    def peak(step, device):
        seen["peak_on"] = device
        return 5

    monkeypatch.setattr(benchmark, "train_step", step)
    monkeypatch.setattr(benchmark, "peak_memory_of", peak)
    benchmark._memory_child(sent[0])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["device"] == "cpu" and printed["amp"] == "bf16" and printed["peak_bytes"] == 5
    assert seen["amp"] is torch.bfloat16 and seen["dynamic"]
    assert seen["x"].type == seen["model"].type == seen["peak_on"].type == "cpu"
    assert seen["shape"][0] == 1 and (input_size is None or seen["shape"][1:] == input_size)
    benchmark.step_peak_memory("test_resnet", "static", 1, 2, input_size)  # the defaults
    assert sent[1][5:7] == ["cpu", "-"]


def test_static_twin_computes_the_uniform_router_function():
    layer = DynamicConv2d(4, 6, 3, padding=1, k=3)
    twin = static_twin(torch.nn.Sequential(layer))[0]
    assert type(twin) is torch.nn.Conv2d
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():  # the router starts uniform: the dynamic layer is the mean kernel
        assert torch.allclose(twin(x), layer(x), atol=1e-5)


def test_interleaved_times_calls_each_once_per_round_in_changing_orders():
    order = []
    calls = {name: (lambda n=name: order.append(n)) for name in "abcd"}
    times = interleaved_times(calls, rounds=6, warmup=1)
    assert order[:4] == list("abcd")  # the warm-up
    rounds = [order[i : i + 4] for i in range(4, len(order), 4)]
    assert len(rounds) == 6 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # not one fixed order
    assert {n: len(t) for n, t in times.items()} == dict.fromkeys("abcd", 6)
    again = []
    calls = {name: (lambda n=name: again.append(n)) for name in "abcd"}
    interleaved_times(calls, rounds=6, warmup=1)
    assert again == order  # seeded: runs are comparable


def test_interleaved_times_runs_before_ahead_of_each_timed_call_outside_the_timing():
    import time

    calls = {"a": lambda: None, "b": lambda: None}
    times = interleaved_times(calls, rounds=3, warmup=1, before=lambda: time.sleep(0.02))
    assert max(max(t) for t in times.values()) < 0.02  # the sleep is not timed
    seen = []
    interleaved_times(calls, rounds=3, warmup=1, before=lambda: seen.append(1))
    assert len(seen) == 6  # once per timed call, not in the warm-up


@pytest.mark.parametrize("spec", ["nonexistent_model_xyz"])
def test_bench_unknown_model_is_one_line_error(spec, capsys):
    assert main(["bench", spec, "--no-train"]) != 0
    assert "error:" in capsys.readouterr().err


def test_training_step_of_a_converted_efficientnet():
    """SE blocks apply ``SiLU(inplace=True)`` to a dynamic conv's output (lean backward)."""
    from dynconvert.benchmark import input_for, load_pair, train_step

    _, dynamic, _ = load_pair("test_efficientnet", 2)
    assert any(isinstance(m, DynamicConv2d) and m.groups > 1 for m in dynamic.modules())
    x = input_for(dynamic, 2, (3, 32, 32))
    before = [p.detach().clone() for p in dynamic.parameters()]
    train_step(dynamic, x, lr=0.1)()
    changed = [not torch.equal(p, b) for p, b in zip(dynamic.parameters(), before, strict=True)]
    assert sum(changed) > len(changed) // 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: DynamicConv2d(6, 6, 3, padding=1, groups=6),  # depthwise
        lambda: DynamicConv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        lambda: DynamicConv2d(4, 6, 3, stride=2, padding=(1, 2)),
        lambda: DynamicConv2dSame.from_conv(Conv2dSame(8, 8, 5, stride=2, groups=8), 4),
    ],
    ids=["depthwise", "reflect", "asymmetric", "tf-same-depthwise"],
)
def test_benchmark_baselines_compute_the_dynamic_layer(make):
    """benchmarks/_reference.py: batch-folded and timm CondConv2d equal the dynconvert layer."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from _reference import BatchFoldedConv2d, TimmCondConv

    layer = make()
    with torch.no_grad():
        layer.attention.fc2.weight.normal_(0, 1.0)
    x = torch.randn(3, layer.in_channels, 9, 10)
    with torch.no_grad():
        ref = layer(x)
        for baseline in (BatchFoldedConv2d(layer), TimmCondConv(layer)):
            assert rel_err(baseline(x), ref) <= 1e-5, type(baseline).__name__


def test_weight_reorder_benchmark_times_the_same_conv():
    """benchmarks/weight_reorder.py: the prepacked path computes the plain conv."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import torch.nn.functional as F
    from weight_reorder import pack, packed_conv

    for k in (1, 3):
        x, weight = torch.randn(1, 16, 7, 7), torch.randn(32, 16, k, k)
        with torch.no_grad():
            got = packed_conv(x, pack(weight, k // 2, [1, 16, 7, 7]), k // 2)
        assert rel_err(got, F.conv2d(x, weight, padding=k // 2)) <= 1e-5


def test_floor_benchmark_mixings_compute_the_mixed_kernels():
    """benchmarks/floor.py: both timed mixings write Σ_k a_k·W_k (uniform a) of each layer."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from floor import mixing_only, streamed_mixing_only

    model = torch.nn.Sequential(DynamicConv2d(4, 6, 3), DynamicConv2d(6, 8, 1))
    want = model[1].weight.detach().mean(0)
    gemm = mixing_only(model, batch=2)()
    assert gemm.shape == (2, want.numel())
    for row in gemm:
        assert rel_err(row.view_as(want), want) <= 1e-6
    assert rel_err(streamed_mixing_only(model, batch=2)(), want) <= 1e-6


def test_floor_benchmark_routers_see_each_layers_own_input():
    """benchmarks/floor.py: the timed routers give each layer's attention in the model."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from floor import routers_only

    torch.manual_seed(0)
    model = torch.nn.Sequential(DynamicConv2d(4, 6, 3), torch.nn.ReLU(), DynamicConv2d(6, 8, 1))
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.attention.fc2.weight)  # not uniform: inputs matter
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = [model[0].attention(x), model[2].attention(model[1](model[0](x)))]
        got = routers_only(model, x)()
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 1e-6


def test_mixing_benchmark_candidates_mix_the_same_kernels():
    """benchmarks/mixing.py: every timed form computes Σ_k a_bk·W_k (checked for the last b)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import mixing

    n = 3 * mixing.CHUNK + 5  # several slices and a partial one
    runs = mixing.candidates(n, k=4, batch=8)
    assert {"streamed", "GEMM, 2 rows", "GEMM, 8 rows", "chunked"} <= set(runs)
    gen = torch.Generator().manual_seed(0)  # the candidates' own data
    kernels = torch.randn(4, n, generator=gen)
    attn = torch.softmax(torch.randn(8, 4, generator=gen), dim=1)
    want = (attn[-1].double() @ kernels.double()).float()
    for name, run in runs.items():
        assert rel_err(run(), want) <= 1e-6, name


def test_layers_benchmark_counts_page_faults_and_names_them_in_misses():
    """benchmarks/layers.py: every candidate gets a page-fault count; a miss names them."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from layers import auto_summary, run_cell

    result = run_cell("dw3x3", batch=1, mode="eval", rounds=1, k=4, min_sample_ms=0.1)
    faults = result["page_faults_per_call"]
    assert set(faults) == set(result["ratios"])
    assert all(v >= 0 for v in faults.values())
    slow = dict(result, auto_vs_best=1.5, best_forced="dc:grouped")
    line = auto_summary([slow])
    assert "1 of 1 cells" in line and "page faults per call: auto" in line
    assert f"grouped {faults['dc:grouped']:.0f}" in line


def test_cifar_benchmark_reports_each_routers_mean_peak_attention():
    """benchmarks/cifar10_resnet20.py: per-layer mean of the per-sample max attention."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from cifar10_resnet20 import CifarTensors, max_attention_range

    torch.manual_seed(0)
    first, second = DynamicConv2d(3, 4, 3, k=4), DynamicConv2d(4, 4, 1, k=4)
    for param in first.attention.parameters():  # a router that has moved
        torch.nn.init.normal_(param, std=3.0)
    model = torch.nn.Sequential(
        first, second, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)
    )
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    data = CifarTensors(images, torch.zeros(6, dtype=torch.long), augment=False)
    with torch.no_grad():
        want = first.attention(torch.stack([data[i][0] for i in range(6)])).amax(1).mean()
    low, high = max_attention_range(model, images)
    assert low == pytest.approx(0.25, abs=1e-6)  # the untouched router: uniform over K=4
    assert high == pytest.approx(want.item(), rel=1e-5) and high > 0.3
    assert not first._forward_hooks and not first.attention._forward_hooks  # hooks removed


def test_cifar_benchmark_from_scratch_gives_each_layer_k_independent_default_init_kernels():
    """--from-scratch: every dynamic layer's K kernels drawn apart, like nn.Conv2d's own init."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from cifar10_resnet20 import independent_kernels

    torch.manual_seed(0)
    model = torch.nn.Sequential(DynamicConv2d(16, 32, 3, k=4), DynamicConv2d(32, 8, 1, k=4))
    for layer in model:
        layer.weight.data[:] = layer.weight.data[:1]  # as converted with noise 0: K copies
    independent_kernels(model, seed=3)
    for layer in model:
        w = layer.weight.detach()
        bound = 1.0 / w[0, 0].numel() ** 0.5  # nn.Conv2d: U(±1/sqrt(fan_in))
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
        flat = w.flatten(1)
        cos = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
        assert cos[~torch.eye(4, dtype=torch.bool)].abs().max() < 0.1  # independent draws
    again = copy.deepcopy(model)
    independent_kernels(again, seed=3)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(model, again, strict=True))


def test_tune_in_model_benchmark_picks_eligible_strategies_that_compute_the_same():
    """benchmarks/tune_in_model.py: in-place picks come from each layer's candidates."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from tune_in_model import pick_in_model, pinned_copy, strategy_inputs

    from dynconvert.engine import STRATEGIES

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        DynamicConv2d(3, 8, 3, padding=1, padding_mode="reflect"),  # pads before its strategy
        DynamicConv2d(8, 8, 1),
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    enabled, min_macs = SWITCHES.autotune, SWITCHES.min_macs
    autotune.set_autotune(True, min_macs=0)
    try:
        with torch.no_grad():
            inputs = strategy_inputs(model, x)
            assert inputs[model[0]].shape == (2, 3, 14, 14)  # reflect-padded by the layer
            picks = pick_in_model(model, x, rounds=1)
            for index, layer in enumerate(model):
                assert picks[index] in autotune.eligible(layer, inputs[layer], STRATEGIES)
                assert layer.strategy == "auto"  # left as it was
            pinned = pinned_copy(model, picks)
            assert [m.strategy for m in pinned] == [picks[0], picks[1]]
            assert rel_err(pinned(x), model(x)) < 1e-5
    finally:
        autotune.set_autotune(enabled, min_macs=min_macs)
