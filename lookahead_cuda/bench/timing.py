"""Timing and the memory-bandwidth yardstick the benchmark measures against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lookahead_cuda import _C


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


def measure(fn: Callable[[int], object], device: torch.device, reps: int, warmup: int) -> Timing:
    """Time ``fn(i)`` for repetition ``i``: warm-up calls first, then ``reps`` timed ones, each
    alone (CUDA: events around the call on the current stream, synchronised before reading)."""
    for i in range(warmup):
        fn(i)
    samples = []
    if device.type == "cuda":
        for i in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(warmup + i)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(reps):
            begin = time.perf_counter()
            fn(warmup + i)
            samples.append(time.perf_counter() - begin)
    return Timing(tuple(samples))


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> tuple[float, str]:
    """Bytes per second (read plus written) of the fastest plain streaming copy on ``device``, over
    two buffers of ``nbytes`` each, and which copy that was. torch's ``copy_`` into a separate
    buffer also reads every line it overwrites; on the CPU an in-place swap of the two buffers,
    which moves exactly a Lookahead sync's traffic, competes too, so the floor is not measured too
    slowly."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a).uniform_()
    copies: dict[str, tuple[Callable[[int], object], int]] = {
        "torch copy_": (lambda _: b.copy_(a), 2 * a.nbytes),
    }
    if device.type == "cpu":
        copies["in-place swap"] = (lambda _: _C.stream_swap_(a, b), 4 * a.nbytes)
    rates = {
        name: moved / measure(fn, device, reps, warmup=2).median
        for name, (fn, moved) in copies.items()
    }
    name = max(rates, key=rates.__getitem__)
    return rates[name], name
