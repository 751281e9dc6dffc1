"""A workload as the benchmark times it: a preset's shapes as one tensor list per dtype (slow,
fast), placed on a device, and the memory traffic one sync moves over it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lookahead_cuda.bench.config import BenchConfig
from lookahead_cuda.bench.presets import Preset, Shape

#: One list of tensors per role, in the order of ``BenchConfig.list_dtypes``.
TensorLists = tuple[list[torch.Tensor], ...]


@dataclass(frozen=True)
class Workload:
    preset: Preset
    dtypes: tuple[torch.dtype, ...]
    device: torch.device
    misaligned: bool = False

    @classmethod
    def of(cls, preset: Preset, config: BenchConfig) -> Workload:
        return cls(preset, config.list_dtypes, config.device, config.misaligned)

    @property
    def numel(self) -> int:
        return self.preset.numel

    @property
    def bytes_per_element(self) -> int:
        """Bytes of one element of every list together, which a sync reads once and writes once."""
        return sum(dtype.itemsize for dtype in self.dtypes)

    @property
    def set_bytes(self) -> int:
        """Bytes of one copy of the workload's lists."""
        return self.numel * self.bytes_per_element

    @property
    def allocated_bytes(self) -> int:
        """Bytes one copy of the lists takes as placed: misaligned tensors sit one element into
        their buffers."""
        extra = len(self.preset.shapes) * self.bytes_per_element if self.misaligned else 0
        return self.set_bytes + extra

    @property
    def largest_numel(self) -> int:
        """Elements of the largest tensor: what a per-tensor temporary is at most."""
        return max((math.prod(shape) for shape in self.preset.shapes), default=0)

    @property
    def traffic_bytes(self) -> int:
        """Bytes one sync moves: every element of every list read, then written back."""
        return 2 * self.set_bytes

    def leading(self, max_numel: int) -> Workload:
        """The workload cut to its leading tensors, as many as fit ``max_numel`` elements (at least
        one)."""
        shapes: list[Shape] = []
        numel = 0
        for shape in self.preset.shapes:
            if shapes and numel + math.prod(shape) > max_numel:
                break
            shapes.append(shape)
            numel += math.prod(shape)
        return dataclasses.replace(
            self, preset=dataclasses.replace(self.preset, shapes=tuple(shapes))
        )

    def empty(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        if not self.misaligned:
            return torch.empty(shape, device=self.device, dtype=dtype)
        # One element into a buffer that the allocator aligns (64 bytes on the CPU, 256 on CUDA):
        # the data pointer is then off every 16-byte boundary, as a parameter sliced out of a flat
        # buffer can be, and the kernels' unaligned head and tail paths are what gets timed.
        buffer = torch.empty(math.prod(shape) + 1, device=self.device, dtype=dtype)
        return buffer[1:].view(shape)

    def random_lists(self) -> TensorLists:
        return tuple(
            [self.empty(shape, dtype).normal_() for shape in self.preset.shapes]
            for dtype in self.dtypes
        )

    def copy_lists(self, lists: Sequence[Sequence[torch.Tensor]]) -> TensorLists:
        """Copies of ``lists`` placed as this workload places its tensors (misaligned ones stay
        misaligned, which ``clone`` would not keep)."""
        return tuple([self.empty(t.shape, t.dtype).copy_(t) for t in ts] for ts in lists)
