"""The memory floor: the plainest streaming pass that moves a workload's bytes, timed in the same
rounds as the workload's implementations so that the machine's drifting bandwidth weighs on it as
on them, and read at its fastest round.

Why its fastest round, when rows are read at their median: the pass moves the same bytes as a
sync with no arithmetic, so a sync can at best tie with it, and the fused op does; interference on
a shared host only ever adds time, so the fastest round is the machine's undisturbed rate (STREAM
reports its best rate for the same reason). Compared median to median, the two tie within their
noise and the fused op landed below its floor at random (0.84-0.88x on gpt2 and llama-7b-layer in
one run); the CPU pass, compiled for baseline x86-64, also moves 16 bytes per instruction where
the fused loops, compiled for AVX2, move 32, and streams a few per cent slower."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lookahead_cuda import _C

CACHE_LINE = 64

#: What the floor is, in the words of --help, the printed table and both READMEs.
DESCRIPTION = (
    "the fastest round of a plain streaming pass over the workload's bytes (each element of every "
    "list read once and written once, no arithmetic: an in-place swap of two float32 buffers on "
    "a CPU, copy_ between two on a GPU), timed in the same rounds as the implementations; "
    "x floor is a row's median time over it"
)


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


def _placement(copy: FloorCopy, traffic_bytes: int) -> tuple[int, int]:
    """The elements of each buffer over which ``copy`` moves ``traffic_bytes``, and where the
    second one starts in their allocation."""
    numel = max(1, math.ceil(traffic_bytes / copy.passes / 4))
    offset_lines = (math.ceil(numel * 4 / CACHE_LINE) + (3 << 20) // CACHE_LINE) | 1
    return numel, offset_lines * CACHE_LINE // 4


def buffer_bytes(copy: FloorCopy, traffic_bytes: int) -> int:
    """Bytes :func:`floor_buffers` allocates for ``copy`` to move ``traffic_bytes``."""
    numel, offset = _placement(copy, traffic_bytes)
    return (offset + numel) * 4


def floor_buffers(
    copy: FloorCopy, device: torch.device, traffic_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 buffers over which ``copy`` moves ``traffic_bytes`` (to within 16 bytes).

    They are views of one allocation, a few MiB and an odd number of cache lines apart: two
    separately allocated buffers can land a power of two apart, in the same DRAM banks, and then
    stream at half speed (seen on the CPU machine: 17 against 42 GB/s), which would put the floor
    too low."""
    numel, offset = _placement(copy, traffic_bytes)
    buffer = torch.empty(offset + numel, dtype=torch.float32, device=device).uniform_()
    return buffer[:numel], buffer[offset:]
