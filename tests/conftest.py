import pytest
import torch

DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def reference_update_(slow: list[torch.Tensor], fast: list[torch.Tensor], alpha: float) -> None:
    """The op's definition in plain torch, one tensor at a time."""
    for s, f in zip(slow, fast):
        s.lerp_(f.to(s.dtype), alpha)
        f.copy_(s)
