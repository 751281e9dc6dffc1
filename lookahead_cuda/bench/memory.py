"""The memory a run needs, known before it allocates any, and the memory the device has free: so
that the run says what it needs, and skips a workload that would not fit rather than fail (or
swap) half-way."""

from __future__ import annotations

import os

import torch

from lookahead_cuda.bench import e2e, sync
from lookahead_cuda.bench.config import BenchConfig
from lookahead_cuda.bench.presets import Preset
from lookahead_cuda.bench.workload import Workload


def planned_bytes(preset: Preset, config: BenchConfig) -> int:
    """The most memory the run holds at once for ``preset`` (workloads run one after another,
    each freeing its tensors before the next allocates)."""
    if config.e2e:
        return e2e.planned_bytes(preset, config)
    workload = Workload.of(preset, config)
    return sync.planned_bytes(workload, config, sync.rotation_bytes_of(config.device))


def fits(needed: int, available: int | None) -> bool:
    """Whether a workload that needs ``needed`` bytes runs; when what is available cannot be read,
    it does."""
    return available is None or needed <= available


def available_bytes(device: torch.device) -> int | None:
    """Memory the device can give this process now, or None where that cannot be read: free
    device memory on CUDA; on the CPU, what Linux counts as available (free and reclaimable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
