"""Timing and the memory-bandwidth yardstick the benchmark measures against."""

from __future__ import annotations

import glob
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lookahead_cuda import _C


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
        """Half the range between the fastest and slowest repetition, relative to the median."""
        return (max(self.samples) - min(self.samples)) / 2 / self.median


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


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> tuple[float, str]:
    """Bytes per second (read plus written) of the fastest plain streaming copy on ``device``, over
    two buffers of ``nbytes`` each, and which copy that was.

    torch's ``copy_`` into a separate buffer also reads every line it overwrites; on the CPU an
    in-place swap of the two buffers, which moves exactly a Lookahead sync's traffic, competes too.
    The two buffers are views of one allocation, a few MiB and an odd number of cache lines apart:
    two separately allocated buffers can land a power of two apart, in the same DRAM banks, and
    then stream at half speed (seen on the CPU machine: 17 against 42 GB/s), which would measure
    the floor too slowly."""
    numel = nbytes // 4
    gap = (3 << 20) // 4 + 1040 // 4
    buffer = torch.empty(2 * numel + gap, dtype=torch.float32, device=device).uniform_()
    a, b = buffer[:numel], buffer[numel + gap :]
    copies: dict[str, tuple[Callable[[], object], int]] = {
        "torch copy_": (lambda: b.copy_(a), 2 * a.nbytes),
    }
    if device.type == "cpu":
        copies["in-place swap"] = (lambda: _C.stream_swap_(a, b), 4 * a.nbytes)
    timings = measure_interleaved(
        {name: fn for name, (fn, _) in copies.items()}, device, reps, warmup=2
    )
    rates = {name: moved / timings[name].median for name, (_, moved) in copies.items()}
    name = max(rates, key=rates.__getitem__)
    return rates[name], name
