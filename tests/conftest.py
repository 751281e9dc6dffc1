import pytest
import torch

from lookahead_cuda.ops import SUPPORTED_DTYPE_PAIRS

# The extension's own table (csrc/dtype_pairs.h); tests that every pair of it works.
DTYPE_PAIRS = list(SUPPORTED_DTYPE_PAIRS)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def reference_update_(slow: list[torch.Tensor], fast: list[torch.Tensor], alpha: float) -> None:
    """The op's definition in plain torch, one tensor at a time."""
    for s, f in zip(slow, fast):
        s.lerp_(f.to(s.dtype), alpha)
        f.copy_(s)
