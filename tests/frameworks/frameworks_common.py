"""What the framework tests share: a tiny model, fixed batches, and Lookahead written out in plain
torch as the independent reference (AdamW, then every k steps ``slow.lerp_(fast, alpha)`` and
``fast.copy_(slow)``, which the fused op equals bitwise)."""

from __future__ import annotations

import os

import torch
from torch import nn

# No hub and no telemetry: every model here is built from a config, and nothing may be downloaded.
# Set before transformers/huggingface_hub are imported, which read them at import time.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

K = 3
ALPHA = 0.5
LR = 1e-2


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(count: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [
        (torch.randn(size, 6, generator=generator), torch.randn(size, 3, generator=generator))
        for _ in range(count)
    ]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).float(), y)


class PlainLookahead:
    """Lookahead around AdamW in plain torch, one tensor at a time."""

    def __init__(self, params, k: int = K, alpha: float = ALPHA, lr: float = LR) -> None:
        self.params = list(params)
        self.inner = torch.optim.AdamW(self.params, lr=lr)
        self.k, self.alpha = k, alpha
        self.slow = [p.detach().clone() for p in self.params]
        self.count = 0

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.count += 1
        if self.count == self.k:
            self.count = 0
            for slow, fast in zip(self.slow, self.params):
                slow.lerp_(fast, self.alpha)
                fast.copy_(slow)


def plain_run(data, accumulate: int = 1, k: int = K, autocast: torch.dtype | None = None):
    """make_model() trained on ``data`` with PlainLookahead, ``accumulate`` micro-batches per step
    (each loss divided by ``accumulate``, as the frameworks do), optionally under CPU autocast."""
    model = make_model()
    opt = PlainLookahead(model.parameters(), k=k)
    for i, batch in enumerate(data, 1):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = loss_of(model, batch)
        (loss / accumulate if accumulate > 1 else loss).backward()
        if i % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return model, opt


def assert_equal_tensors(actual, expected, what: str = "tensor") -> None:
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"{what} {i} differs by {(a - e).abs().max().item():.3g}"
