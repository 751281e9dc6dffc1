"""The memory floor: the plainest streaming copy that moves exactly a workload's bytes, timed in the
same rounds as the workload's implementations so that the machine's drifting bandwidth weighs on
it as on them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lookahead_cuda import _C

CACHE_LINE = 64


@dataclass(frozen=True)
class FloorCopy:
    name: str
    #: Bytes moved per byte of each of the two buffers (read and written, both buffers together).
    passes: int
    #: Runs the copy between the two buffers.
    run: Callable[[torch.Tensor, torch.Tensor], object]


def floor_copy(device: torch.device) -> FloorCopy:
    if device.type == "cpu":
        # torch's copy_ into a separate buffer also reads every line it overwrites (read for
        # ownership); a swap rewrites the lines it has just read, both buffers read once and
        # written once, which is exactly a sync's traffic with no arithmetic.
        return FloorCopy("in-place swap", 4, _C.stream_swap_)
    return FloorCopy("torch copy_", 2, lambda a, b: b.copy_(a))


def floor_buffers(
    copy: FloorCopy, device: torch.device, traffic_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 buffers over which ``copy`` moves ``traffic_bytes`` (to within 16 bytes).

    They are views of one allocation, a few MiB and an odd number of cache lines apart: two
    separately allocated buffers can land a power of two apart, in the same DRAM banks, and then
    stream at half speed (seen on the CPU machine: 17 against 42 GB/s), which would put the floor
    too low."""
    numel = max(1, math.ceil(traffic_bytes / copy.passes / 4))
    offset_lines = (math.ceil(numel * 4 / CACHE_LINE) + (3 << 20) // CACHE_LINE) | 1
    offset = offset_lines * CACHE_LINE // 4
    buffer = torch.empty(offset + numel, dtype=torch.float32, device=device).uniform_()
    return buffer[:numel], buffer[offset:]
