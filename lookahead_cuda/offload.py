"""The slow update with the slow weights in host memory and the fast ones on an accelerator.

The fast weights travel to the host in chunks, the CPU kernel updates each chunk there, and the
result travels back. Transfers go on a side stream through two pinned staging buffers, so that the
CPU works on one chunk while the next comes down and the previous one goes up; device memory holds
nothing extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

#: Bytes of fast weights per chunk: large enough that each transfer runs at full PCIe speed, small
#: enough that the first chunk's wait and the last one's return are short next to the whole.
CHUNK_BYTES = 32 << 20


def runs_by_bytes(sizes: Sequence[int], limit: int) -> Iterator[range]:
    """Ranges of consecutive indices whose sizes (bytes) add up to about ``limit``; a larger one
    is a run of its own."""
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            yield range(start, i)
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield range(start, len(sizes))


class StagingBuffers:
    """Two reusable host buffers, pinned when the fast weights are on CUDA, grown as needed, and the
    bytes of fast weights each chunk moves; one set per optimizer, so that optimizers syncing from
    different threads do not share them."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self.buffers: list[torch.Tensor] = []

    def views(self, slot: int, tensors: Sequence[torch.Tensor], pin: bool) -> list[torch.Tensor]:
        dtype = tensors[0].dtype
        numel = sum(t.numel() for t in tensors)
        while len(self.buffers) <= slot:
            self.buffers.append(torch.empty(0, dtype=dtype))
        buffer = self.buffers[slot]
        if buffer.dtype != dtype or buffer.numel() < numel or buffer.is_pinned() != pin:
            buffer = torch.empty(numel, dtype=dtype, pin_memory=pin)
            self.buffers[slot] = buffer
        views, offset = [], 0
        for t in tensors:
            views.append(buffer[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        return views


def offloaded_update_(
    fast: Sequence[torch.Tensor],
    update_chunk: Callable[[list[int], list[torch.Tensor]], None],
    staging: StagingBuffers | None = None,
) -> None:
    """Run a sync whose slow tensors live in host memory over fast tensors of one dtype on another
    device (or the CPU): the path of ``Lookahead(slow_device="cpu")``, chosen by that setting
    (lookahead_cuda/functional.py says which update runs on the host).

    ``update_chunk(indices, staged)`` runs the host-side update of the pairs at ``indices``, whose
    fast tensors are ``staged`` (host copies, written back after it returns). The host waits for
    the last chunk to come back, so the caller's stream sees the updated fast weights. Pass the
    same ``staging`` to every call to reuse its pinned buffers.
    """
    if len(fast) == 0:
        return
    staging = staging or StagingBuffers()
    on_cuda = fast[0].device.type == "cuda"
    stream = torch.cuda.Stream(fast[0].device) if on_cuda else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(fast[0].device))
    in_flight: list[tuple[list[int], list[torch.Tensor], torch.cuda.Event | None]] = []

    def send_down(indices: list[int]) -> None:
        staged = staging.views(len(in_flight) % 2, [fast[i] for i in indices], pin=on_cuda)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for i, view in zip(indices, staged):
                view.copy_(fast[i], non_blocking=on_cuda)
            landed = torch.cuda.Event() if stream is not None else None
            if landed is not None:
                landed.record(stream)
        in_flight.append((indices, staged, landed))

    def update_and_send_up(position: int) -> None:
        indices, staged, landed = in_flight[position]
        if landed is not None:
            landed.synchronize()
        update_chunk(indices, staged)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for i, view in zip(indices, staged):
                fast[i].copy_(view, non_blocking=on_cuda)

    # Chunk n + 1 comes down while chunk n is updated; a staging slot is written again only after
    # the stream has sent its previous chunk up (the copies are ordered on the one stream). The
    # side stream is joined however the loop ends, so that no copy of a failed call is still in
    # flight when the caller goes on (or retries).
    chunks = [
        list(run)
        for run in runs_by_bytes([f.numel() * f.element_size() for f in fast], staging.chunk_bytes)
    ]
    try:
        send_down(chunks[0])
        for position in range(len(chunks)):
            if position + 1 < len(chunks):
                send_down(chunks[position + 1])
            update_and_send_up(position)
    finally:
        if stream is not None:
            torch.cuda.current_stream(fast[0].device).wait_stream(stream)
            stream.synchronize()
