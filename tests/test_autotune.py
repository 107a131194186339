"""The one-off autotune: measured once per key, cached, switchable, and numerically neutral."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
from conftest import rel_err

from dynconvert import DynamicConv2d
from dynconvert.engine import STRATEGIES, autotune, prepacked, select_strategy, tuning

#: ``packed`` is timed in eval on CPU where oneDNN is built in (not in training).
EVAL_CANDIDATES = 4 if prepacked.available() else 3


@pytest.fixture(autouse=True)
def _fresh(fresh_autotune):  # conftest.py
    yield


def _layer(**kw) -> DynamicConv2d:
    layer = DynamicConv2d(8, 8, 3, padding=1, k=4, **kw)
    with torch.no_grad():
        layer.attention.fc2.weight.normal_(0, 1.0)
    return layer


def test_second_call_does_not_measure_again():
    layer = _layer()
    x = torch.randn(3, 8, 10, 10)
    with torch.no_grad():
        layer(x)
        first = autotune.stats()["measurements"]
        # grouped, loop, unfold (, packed): each timed ROUNDS times, CALLS_PER_SAMPLE calls
        assert first == EVAL_CANDIDATES * tuning.ROUNDS * tuning.CALLS_PER_SAMPLE
        per_candidate = first // EVAL_CANDIDATES
        layer(x)
        layer(x + 1)
        assert autotune.stats() == {"measurements": first, "lookups": 2}
        # A layer of the same geometry shares the entry.
        _layer()(x)
        assert autotune.stats()["measurements"] == first
        # A new batch size is a new key; so are training mode and dtype.
        layer(x[:2])
        assert autotune.stats()["measurements"] == 2 * first
    layer(x)  # autograd records: forward + backward of grouped, loop, unfold are timed
    assert autotune.stats()["measurements"] == 2 * first + 3 * per_candidate
    assert len(autotune.cache()) == 3
    chosen = set(autotune.cache().values())
    assert chosen <= set(STRATEGIES) - {"static", "dense"}


def test_static_is_timed_only_at_batch_2k_and_more_on_small_maps():
    layer = _layer()  # k=4, 3x3, padding 1: outputs as large as the input map
    with torch.no_grad():
        assert "static" not in autotune.eligible(layer, torch.randn(7, 8, 14, 14), STRATEGIES)
        assert "static" in autotune.eligible(layer, torch.randn(8, 8, 14, 14), STRATEGIES)
        assert "static" not in autotune.eligible(layer, torch.randn(8, 8, 15, 14), STRATEGIES)
        autotune.measure(layer, torch.randn(8, 8, 7, 7), torch.full((8, 4), 0.25),
                         {"static": STRATEGIES["static"]})  # fmt: skip
        assert autotune.stats()["measurements"] == tuning.ROUNDS * tuning.CALLS_PER_SAMPLE


def test_batch_one_times_dense_against_the_batched_strategies_in_eval_and_training():
    layer = _layer()
    x = torch.randn(1, 8, 6, 6)
    per_candidate = tuning.ROUNDS * tuning.CALLS_PER_SAMPLE
    with torch.no_grad():
        assert set(autotune.eligible(layer, x, STRATEGIES)) == {
            "dense",
            "grouped",
            "unfold",
            "loop",
        }
        layer(x)
        assert select_strategy(layer, x) in {"dense", "grouped", "unfold", "loop"}
    assert autotune.stats()["measurements"] == 4 * per_candidate
    layer(x.clone().requires_grad_())  # training: dense, grouped, loop and unfold are timed
    assert autotune.stats()["measurements"] == 8 * per_candidate


def test_results_identical_whichever_strategy_runs():
    layer = _layer()
    x = torch.randn(4, 8, 9, 9)
    with torch.no_grad():
        auto = layer(x)
        assert select_strategy(layer, x) in STRATEGIES
        for name in STRATEGIES:
            if name == "dense":
                continue
            layer.strategy = name
            assert rel_err(layer(x), auto) <= 1e-5, name
    # Gradients too, whichever strategy the tuner picked.
    layer.strategy = "auto"
    xg = x.clone().requires_grad_()
    layer(xg).square().sum().backward()
    auto_grads = [xg.grad.clone(), layer.weight.grad.clone()]
    layer.strategy, layer.weight.grad = "grouped", None
    xg.grad = None
    layer(xg).square().sum().backward()
    assert rel_err(xg.grad, auto_grads[0]) <= 1e-5
    assert rel_err(layer.weight.grad, auto_grads[1]) <= 1e-5


def test_switched_off_uses_the_cost_model():
    autotune.set_autotune(False)
    layer = _layer()
    for shape in [(1, 8, 9, 9), (4, 8, 9, 9), (4, 8, 40, 40)]:
        x = torch.randn(shape)
        with torch.no_grad():
            layer(x)
        assert select_strategy(layer, x) == autotune.cost_model_choice(layer, x)
    assert autotune.stats()["measurements"] == 0
    assert autotune.cost_model_choice(layer, torch.randn(1, 8, 9, 9)) == "dense"


def test_small_layers_skip_measuring():
    autotune.set_autotune(True, min_macs=10**9)
    with torch.no_grad():
        _layer()(torch.randn(2, 8, 9, 9))
    assert autotune.stats()["measurements"] == 0


def test_forced_strategy_and_tracing_never_measure():
    layer = _layer(strategy="unfold")
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        layer(x)
        layer.strategy = "auto"
        traced = torch.jit.trace(layer, x, check_trace=False)
    assert autotune.stats()["measurements"] == 0
    assert rel_err(traced(x[:1]), layer(x[:1])) <= 1e-5  # static path: batch stays dynamic


def test_environment_variable_switches_it_off():
    code = "from dynconvert.engine import autotune; print(autotune.autotune_enabled())"
    env = {**os.environ, "DYNCONVERT_AUTOTUNE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_clearing_the_cache_makes_layers_measure_again():
    """The per-layer memo of the last choice never outlives the cache it came from."""
    layer = _layer()
    x = torch.randn(3, 8, 10, 10)
    with torch.no_grad():
        layer(x)
        measured = autotune.stats()["measurements"]
        assert measured > 0
        autotune.clear_cache()
        layer(x)
        assert autotune.stats()["measurements"] == measured
        assert len(autotune.cache()) == 1
        autotune.set_autotune(False)
        layer(x)  # switched off: the cost model, not the remembered measurement
        assert autotune.stats()["lookups"] == 0


def test_timing_in_training_never_runs_the_users_gradient_hooks():
    layer, twin = _layer(), _layer(strategy="grouped")
    twin.load_state_dict(layer.state_dict())
    seen = []
    layer.weight.register_hook(lambda grad: seen.append(grad.clone()))
    x = torch.randn(4, 8, 10, 10)
    layer(x).square().sum().backward()  # the first call times every candidate
    twin(x).square().sum().backward()
    assert autotune.stats()["measurements"] >= 1
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], twin.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad, rtol=1e-4, atol=1e-5)


def test_the_per_layer_memo_is_kept_by_the_engine_not_on_the_layer():
    """The layer holds no tuning state (nothing of it is pickled with the module), and the
    engine's memo does not keep a deleted layer alive."""
    layer = _layer()
    before = set(vars(layer))
    x = torch.randn(3, 8, 10, 10)
    with torch.no_grad():
        layer(x)
        layer(x)  # answered by the memo
    assert autotune.stats()["lookups"] == 1
    assert set(vars(layer)) == before
    alive = weakref.ref(layer)
    del layer
    gc.collect()
    assert alive() is None
