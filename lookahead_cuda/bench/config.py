"""What one ``lookahead-bench`` run measures, resolved once from the command line."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lookahead_cuda.bench.presets import Preset
from lookahead_cuda.bench.timing import Rounds

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class BenchConfig:
    """A run's settings, every default and dependency resolved (the slow dtype, the workloads, the
    device): the benchmarks read it and never change it."""

    presets: tuple[Preset, ...]
    device: torch.device
    fast_dtype: torch.dtype
    slow_dtype: torch.dtype
    impls: tuple[str, ...]
    alpha: float
    reps: int
    #: The most rounds a workload gets while a row's spread is above ``max_spread``.
    max_reps: int
    #: The interquartile range over the median above which a row is re-measured, then flagged.
    max_spread: float
    warmup: int
    threads: int | None
    e2e: bool
    k: int
    #: The outer momentum of the timed sync (0: Lookahead's lerp; above: SNOO's outer step).
    momentum: float
    misaligned: bool
    json_path: str | None
    plot_path: str | None

    @property
    def rounds(self) -> Rounds:
        return Rounds(self.reps, self.max_reps, self.max_spread)

    @property
    def list_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtype of each tensor list a sync updates, in the order the implementations take
        them: how many lists a workload has, and (with the shapes) how many bytes it moves. With
        momentum, the buffers are a third list in the slow dtype."""
        if self.momentum > 0:
            return (self.slow_dtype, self.fast_dtype, self.slow_dtype)
        return (self.slow_dtype, self.fast_dtype)
