"""Timing helpers: the cache to time past, round-robin timing of several functions (with more
rounds while their spread is large), and the statistics reported over the repetitions."""

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


#: A row's flag when its spread is still above --max-spread after its last round.
NOISY = "noisy"


@dataclass(frozen=True)
class Rounds:
    """How many rounds to time: ``reps``, then one more at a time while any function's spread
    (:func:`iqr_over_median`) is above ``max_spread``, up to ``max_reps`` in all. A neighbour's
    burst of work on a shared host slows a run of consecutive rounds; the quiet rounds after it
    outnumber them in the quartiles, and a burst that outlasts ``max_reps`` rounds leaves the
    spread large for the report to flag."""

    reps: int
    max_reps: int
    max_spread: float


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed repetitions."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        return quartiles(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """The interquartile range over the median (see :func:`iqr_over_median`)."""
        return iqr_over_median(self.samples)


def quartiles(samples: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles, interpolated linearly between the sorted samples (numpy's
    default); one sample is both."""
    if len(samples) < 2:
        return samples[0], samples[0]
    first, _, third = statistics.quantiles(samples, n=4, method="inclusive")
    return first, third


def iqr_over_median(samples: Sequence[float]) -> float:
    """The interquartile range of ``samples`` divided by their median: a relative spread that one or
    two stray repetitions (a neighbour's burst on a shared host) do not decide, as they decided half
    the range. With :func:`quartiles`, [1, 2, 3, 4, 100] has quartiles 2 and 4 and spread 2/3;
    fewer than two samples have none."""
    first, third = quartiles(samples)
    return (third - first) / statistics.median(samples)


def measure_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, rounds: Rounds, warmup: int
) -> dict[str, Timing]:
    """Time several functions round-robin, one call of each per round, so that a machine whose
    speed drifts during the run (a shared host) weighs on all of them alike; as many rounds as
    ``rounds`` says, the same number for every function. Each call is timed alone: CUDA events
    around it on the current stream, synchronised before it starts."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    done = 0
    while done < rounds.reps or (
        done < rounds.max_reps
        and any(iqr_over_median(values) > rounds.max_spread for values in samples.values())
    ):
        for name, fn in fns.items():
            samples[name].append(_time_call(fn, device))
        done += 1
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
