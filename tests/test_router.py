"""The router learns to route when routing pays (issue 4's control for a flat router).

On CIFAR-10 the fine-tuned routers stay near uniform (docs/results.md). This test shows that
is the task's answer, not a router that cannot learn: on a task where two kinds of input need
two different kernels, a layer converted from one static conv separates them, and a static
conv cannot fit the task at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert import DynamicConvNd

CHANNELS = 8


def _two_kernel_task(seed: int):
    """Inputs whose mean's sign says which of two random kernels maps them to the target."""
    generator = torch.Generator().manual_seed(seed)
    kernels = torch.randn(2, CHANNELS, CHANNELS, 3, 3, generator=generator) * 0.3

    def batch(n: int):
        kind = torch.randint(0, 2, (n,), generator=generator)
        x = torch.randn(n, CHANNELS, 12, 12, generator=generator)
        x = x + (2.0 * kind - 1.0).view(n, 1, 1, 1)
        y = torch.stack([F.conv2d(x[i : i + 1], kernels[kind[i]], padding=1)[0] for i in range(n)])
        return x, y, kind

    return batch


def _fit(model: nn.Module, batch, steps: int = 300) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        x, y, _ = batch(32)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y, _ = batch(256)
    with torch.no_grad():
        return F.mse_loss(model(x), y).item()


def test_router_specialises_when_two_kernels_are_needed():
    torch.manual_seed(0)
    static_loss = _fit(nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), _two_kernel_task(1))

    torch.manual_seed(0)
    conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
    layer = DynamicConvNd.from_conv(conv, k=4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, CHANNELS, 12, 12)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-5)  # starts as the conv
    batch = _two_kernel_task(1)
    dynamic_loss = _fit(layer, batch)

    assert dynamic_loss < 0.02 * static_loss, (dynamic_loss, static_loss)
    x, _, kind = batch(256)
    with torch.no_grad():
        attention = layer.attention(x)
    per_kind = torch.stack([attention[kind == 0].mean(0), attention[kind == 1].mean(0)])
    # Total-variation distance between the two kinds' mean attention: 0 for a flat router.
    assert 0.5 * (per_kind[0] - per_kind[1]).abs().sum() > 0.9, per_kind
