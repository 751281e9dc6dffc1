"""Timing helpers: the cache to time past, round-robin timing of several functions, and the
statistics reported over the repetitions."""

from __future__ import annotations

import glob
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def last_level_cache_bytes(device: torch.device) -> int:
    """Size of the largest cache in front of ``device``'s memory (a common size if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as text:
            value = text.read().strip()
        units = {"K": 1 << 10, "M": 1 << 20}
        sizes.append(int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value))
    return max(sizes, default=32 << 20)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed repetitions."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """The interquartile range over the median (see :func:`iqr_over_median`)."""
        return iqr_over_median(self.samples)


def iqr_over_median(samples: Sequence[float]) -> float:
    """The interquartile range of ``samples`` divided by their median: a relative spread that one or
    two stray repetitions (a neighbour's burst on a shared host) do not decide, as they decided half
    the range. The quartiles interpolate linearly between the sorted samples (numpy's default), so
    [1, 2, 3, 4, 100] has quartiles 2 and 4 and spread 2/3; fewer than two samples have none."""
    if len(samples) < 2:
        return 0.0
    first, _, third = statistics.quantiles(samples, n=4, method="inclusive")
    return (third - first) / statistics.median(samples)


def measure_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int
) -> dict[str, Timing]:
    """Time several functions round-robin, one call of each per repetition, so that a machine whose
    speed drifts during the run (a shared host) weighs on all of them alike. Each call is timed
    alone: CUDA events around it on the current stream, synchronised before it starts."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_time_call(fn, device))
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin
