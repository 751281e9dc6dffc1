"""The CUDA kernels run on the CPU: tests/cuda_emulation compiles the device code of csrc/cuda/ with
the host compiler and runs every block and thread of a launch in an emulated grid, checking each
access. Built here from this tree's csrc/ (so an edited kernel is what runs), never part of the
installed package."""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

TESTS = Path(__file__).resolve().parent
SOURCES = TESTS / "cuda_emulation"
CSRC = TESTS.parent / "csrc"
# The host code of the ops that the emulated backend shares with the real ones.
CSRC_SOURCES = ["validation.cpp", "aten_path.cpp", "dtype_pairs.cpp"]
FLAGS = [
    "-O2",
    "-DLOOKAHEAD_CUDA_EMULATION",
    "-DCUDART_VERSION=13000",  # the runtime emulated: CUDA 13, with its 32,764-byte parameters
    "-ffp-contract=off",  # the device code fuses where it says so (fma), as nvcc does
    "-fvisibility=hidden",  # lookahead_cuda._C has the same host functions
    "-Wno-unknown-pragmas",  # #pragma unroll
    # The runtime's handlers are the emulation's own (undefined_behaviour.cpp).
    "-fsanitize=signed-integer-overflow,shift,bounds,integer-divide-by-zero",
]
# LOOKAHEAD_EMULATION_COVERAGE=1 builds it for gcov instead, to see what of the device code the
# tests run: after the tests, `gcov -l -p -o BUILD/X.o BUILD/X.cpp` for each object X of the build
# folder (torch's extensions folder), and the csrc/ headers' .gcov files of all of them merged.
COVERAGE_FLAGS = ["--coverage", "-O0"]

H200_SMS = 132
# Registers per thread of each kernel, from LOOKAHEAD_PTXAS_VERBOSE=1 (nvcc 13.0, sm_90): they set
# how many 512-thread blocks an SM holds, so the grid an H200 gets.
REGISTERS = {
    ("sync", torch.float32, torch.float32): 50,
    ("sync", torch.float64, torch.float64): 48,
    ("sync", torch.float16, torch.float16): 54,
    ("sync", torch.bfloat16, torch.bfloat16): 56,
    ("sync", torch.float32, torch.float16): 64,
    ("sync", torch.float32, torch.bfloat16): 46,
    ("heavy ball", torch.float32, torch.float32): 64,
    ("heavy ball", torch.float64, torch.float64): 48,
    ("heavy ball", torch.float16, torch.float16): 54,
    ("heavy ball", torch.bfloat16, torch.bfloat16): 60,
    ("heavy ball", torch.float32, torch.float16): 40,
    ("heavy ball", torch.float32, torch.bfloat16): 40,
    ("nesterov", torch.float32, torch.float32): 48,
    ("nesterov", torch.float64, torch.float64): 48,
    ("nesterov", torch.float16, torch.float16): 56,
    ("nesterov", torch.bfloat16, torch.bfloat16): 55,
    ("nesterov", torch.float32, torch.float16): 40,
    ("nesterov", torch.float32, torch.bfloat16): 44,
    ("nonfinite", torch.float32, torch.float32): 60,
    ("nonfinite", torch.float64, torch.float64): 32,
    ("nonfinite", torch.float16, torch.float16): 28,
    ("nonfinite", torch.bfloat16, torch.bfloat16): 28,
}


def h200_grid(kernel: str, slow: torch.dtype, fast: torch.dtype) -> int:
    """What resident_blocks() gives on an H200: 132 SMs, each with 64K registers (allocated to a
    thread in multiples of 8) and 2048 threads."""
    registers = -(-REGISTERS[(kernel, slow, fast)] // 8) * 8
    return H200_SMS * min(2048 // 512, 65536 // (registers * 512))


def _build_name(flags: list[str]) -> str:
    """One build per tree, torch and flags; ninja keeps it up to date with the tree's sources,
    headers included, so a rerun compiles nothing and an edited kernel only what includes it."""
    key = " ".join([str(TESTS.parent), torch.__version__, *flags])
    return f"lookahead_cuda_emulation_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@cache
def load() -> ModuleType:
    coverage = os.environ.get("LOOKAHEAD_EMULATION_COVERAGE") == "1"
    flags = FLAGS + (COVERAGE_FLAGS if coverage else [])
    return cpp_extension.load(
        name=_build_name(flags),
        sources=[str(p) for p in sorted(SOURCES.glob("*.cpp"))]
        + [str(CSRC / name) for name in CSRC_SOURCES],
        extra_cflags=flags,
        extra_ldflags=COVERAGE_FLAGS[:1] if coverage else [],
        extra_include_paths=[str(CSRC)],
    )
