import os

import pytest
import torch

# Tests never reach a model hub; timm models are built with pretrained=False.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_autotune():
    """An empty autotune cache with tuning on for every layer size; restored afterwards."""
    from dynconvert.engine import SWITCHES, autotune

    enabled, min_macs = SWITCHES.autotune, SWITCHES.min_macs
    autotune.clear_cache()
    autotune.set_autotune(True, min_macs=0)
    yield
    autotune.set_autotune(enabled, min_macs=min_macs)
    autotune.clear_cache()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
