import pytest
import torch

from lookahead_cuda.ops import SUPPORTED_DTYPE_PAIRS

# The extension's own table (csrc/dtype_pairs.h); tests that every pair of it works.
DTYPE_PAIRS = list(SUPPORTED_DTYPE_PAIRS)


def pytest_report_header() -> str:
    # Which CPU kernels torch runs (ATEN_CPU_CAPABILITY may lower it): tests marked cpu_capability
    # depend on it, and tests/test_cpu_capabilities.py reads this line back.
    return f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def reference_update_(slow: list[torch.Tensor], fast: list[torch.Tensor], alpha: float) -> None:
    """The op's definition in plain torch, one tensor at a time."""
    for s, f in zip(slow, fast):
        s.lerp_(f.to(s.dtype), alpha)
        f.copy_(s)


def steps_on_sin_gradients(opt: torch.optim.Optimizer, count: int) -> None:
    """``count`` steps of ``opt`` with gradients made from the parameters (sin(3p)): a short run
    without a model, for tests that change parameters in place between steps."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for _ in range(count):
        for p in params:
            p.grad = torch.sin(3 * p.detach())
        opt.step()
