"""The sync microbenchmark: each implementation of the Lookahead sync, and the memory floor for the
same bytes, timed round-robin on every workload."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lookahead_cuda.bench.config import BenchConfig, dtype_name
from lookahead_cuda.bench.floor import buffer_bytes, floor_buffers, floor_copy
from lookahead_cuda.bench.impls import (
    IMPLEMENTATIONS,
    Sync,
    reference_scratch_bytes,
    reference_update_,
)
from lookahead_cuda.bench.timing import (
    NOISY,
    Timing,
    last_level_cache_bytes,
    measure_interleaved,
)
from lookahead_cuda.bench.workload import TensorLists, Workload

# A workload smaller than this many times the last-level cache is timed on several copies of its
# tensors (and of its floor's buffers) in turn, so that it is timed from memory rather than cache.
CACHE_MULTIPLE = 4
MAX_COPIES = 64
# The check against torch takes this many of a workload's leading elements at most: several tensors
# of every preset (all of resnet50 and many-small), far beyond any cache, and its three copies sit
# beside a 7B model's tensors on the device. 1 << 28 took the default CPU run to 8.8 GB.
CHECK_NUMEL = 1 << 26
# The floor's copy streams at most this many bytes per call and its time is scaled to the
# workload's traffic: far beyond any cache, yet small enough to sit beside the two lists of a 7B
# model (54 GB in fp32) on the device, which a floor of the same traffic would not.
FLOOR_MAX_TRAFFIC = 8 << 30
FLOOR = "floor"
# allclose's temporaries at once, in tensors of the compared size: the difference, its magnitude,
# the tolerance, and masks.
_COMPARE_TEMPORARIES = 4
# A row whose median is under this many times its floor beat the fastest the machine streamed the
# same bytes in the same rounds: a measurement error, flagged as BELOW_FLOOR rather than reported.
BELOW_FLOOR_RATIO = 0.9
BELOW_FLOOR = "below floor"
# Every row's flag when the floor's median is more than --max-spread above its fastest round: the
# machine's rate varied during the rounds, and every x floor of the workload (a median over that
# fastest round) is inflated by as much, however tightly the row's own rounds agree.
BUSY = "busy"


@dataclass
class Result:
    preset: str
    impl: str
    fast_dtype: str
    slow_dtype: str
    numel: int
    tensors: int
    #: Timed rounds: --reps, or more while a row of the workload was too noisy.
    rounds: int
    median_ms: float
    #: The first and third quartiles of the rounds (what the plot's error bars span).
    q1_ms: float
    q3_ms: float
    #: The fastest round; the floor row's is the workload's floor.
    best_ms: float
    #: Interquartile range over the median, over the rounds.
    spread: float
    gbps: float
    #: Median time over this workload's own floor (floor.DESCRIPTION).
    ratio_to_floor: float
    copies: int
    misaligned: bool
    #: Why the row's figures are not to be trusted (NOISY, BUSY, BELOW_FLOOR), none when they are.
    flags: list[str]


@dataclass(frozen=True)
class SyncRun:
    results: list[Result]
    floor_copy: str
    #: Workloads smaller than this rotate through copies of their tensors.
    rotation_bytes: int


def rotation_bytes_of(device: torch.device) -> int:
    """Workloads smaller than this rotate through copies of their tensors."""
    return CACHE_MULTIPLE * last_level_cache_bytes(device)


def copies_of(workload: Workload, rotation_bytes: int) -> int:
    """How many copies of its tensors (and of its floor's buffers) a workload rotates through."""
    return min(MAX_COPIES, max(1, math.ceil(rotation_bytes / max(workload.set_bytes, 1))))


def planned_bytes(workload: Workload, config: BenchConfig, rotation_bytes: int) -> int:
    """The most memory :func:`bench_workload` holds at once on the device, known before it
    allocates any: the timed copies of the lists and of the floor's buffers throughout, and beside
    them the largest of the check's two stages (the reference's inputs and results while the
    reference's temporaries live; those two and one implementation's results while that
    implementation and the comparison run) and the implementations' temporaries while timed."""
    sync = Sync(config.alpha, config.momentum)
    copy = floor_copy(config.device)
    timed = workload.allocated_bytes + buffer_bytes(copy, _floor_traffic(workload))
    checked = workload.leading(CHECK_NUMEL)
    compared = (
        _COMPARE_TEMPORARIES * checked.largest_numel * max(d.itemsize for d in checked.dtypes)
        if any(_compared_within_precision(impl, sync) for impl in config.impls)
        else 0
    )
    checking = max(
        2 * checked.allocated_bytes + reference_scratch_bytes(checked, sync),
        3 * checked.allocated_bytes
        + max(compared, *(IMPLEMENTATIONS[i].scratch_bytes(checked, sync) for i in config.impls)),
    )
    timing = max(IMPLEMENTATIONS[impl].scratch_bytes(workload, sync) for impl in config.impls)
    return copies_of(workload, rotation_bytes) * timed + max(checking, timing)


def _floor_traffic(workload: Workload) -> int:
    return min(workload.traffic_bytes, FLOOR_MAX_TRAFFIC)


def run(config: BenchConfig, progress: Callable[[str], None]) -> SyncRun:
    rotation_bytes = rotation_bytes_of(config.device)
    results: list[Result] = []
    for index, preset in enumerate(config.presets, 1):
        progress(f"[{index}/{len(config.presets)}] {preset.name}: {preset.description}")
        results += bench_workload(Workload.of(preset, config), config, rotation_bytes, progress)
    return SyncRun(results, floor_copy(config.device).name, rotation_bytes)


def _compared_within_precision(impl: str, sync: Sync) -> bool:
    return not (IMPLEMENTATIONS[impl].bitwise and sync.momentum == 0)


def check_against_torch(workload: Workload, impls: Sequence[str], sync: Sync) -> None:
    """Every implementation gives the reference's result on the workload's leading tensors,
    placed as the timed ones are (misaligned ones too): bitwise where the implementation promises
    it, otherwise to within the dtype's precision."""
    checked = workload.leading(CHECK_NUMEL)
    reference = checked.random_lists()
    expected = checked.copy_lists(reference)
    reference_update_(expected, sync)
    for impl in impls:
        _check_one(impl, checked.copy_lists(reference), expected, sync, workload.preset.name)


def _check_one(
    impl: str, lists: TensorLists, expected: TensorLists, sync: Sync, preset: str
) -> None:
    """One implementation's part of :func:`check_against_torch`, on ``lists``, which die with
    this call: so the check holds three copies of the checked tensors at once, not four."""
    IMPLEMENTATIONS[impl].update(lists, sync)
    for got, want in zip(itertools.chain(*lists), itertools.chain(*expected)):
        if _compared_within_precision(impl, sync):
            # Inputs are randn, of magnitude up to ~5: a few ulps of that.
            eps = torch.finfo(got.dtype).eps
            same = torch.allclose(got, want, rtol=4 * eps, atol=16 * eps)
        else:
            same = torch.equal(got, want)
        if not same:
            raise AssertionError(f"{impl} disagrees with torch on {preset}")


def bench_workload(
    workload: Workload,
    config: BenchConfig,
    rotation_bytes: int,
    progress: Callable[[str], None],
) -> list[Result]:
    copies = copies_of(workload, rotation_bytes)
    # The timed tensors are allocated first, as a model's parameters are, before the check's
    # temporaries come and go: where the allocator places slow and fast relative to each other
    # changes how fast memory streams them.
    sets = [workload.random_lists() for _ in range(copies)]
    copy = floor_copy(config.device)
    floor_traffic = _floor_traffic(workload)
    floors = [floor_buffers(copy, config.device, floor_traffic) for _ in range(copies)]
    sync = Sync(config.alpha, config.momentum)
    check_against_torch(workload, config.impls, sync)

    rotating = f", rotating {copies} copies" if copies > 1 else ""
    progress(
        f"  {', '.join(config.impls)} and the floor, {config.reps} rounds "
        f"(up to {config.max_reps} while noisy){rotating}"
    )
    # Consecutive calls of the implementations, whichever makes them, take the next copy in turn,
    # so none runs on tensors the call before it has just left in cache; the floor cycles through
    # its own copies alike.
    next_set = itertools.cycle(sets)
    next_floor = itertools.cycle(floors)
    fns: dict[str, Callable[[], object]] = {
        impl: (lambda update=IMPLEMENTATIONS[impl].update: update(next(next_set), sync))
        for impl in config.impls
    }
    fns[FLOOR] = lambda: copy.run(*next(next_floor))
    timings = measure_interleaved(fns, config.device, config.rounds, config.warmup)
    scale = workload.traffic_bytes / floor_traffic
    timings[FLOOR] = Timing(tuple(sample * scale for sample in timings[FLOOR].samples))
    floor = timings[FLOOR].best
    busy = timings[FLOOR].median / floor > 1 + config.max_spread

    def result(impl: str, timing: Timing) -> Result:
        q1, q3 = timing.quartiles
        ratio = timing.median / floor
        conditions = {
            NOISY: timing.spread > config.max_spread,
            BUSY: busy,
            BELOW_FLOOR: ratio < BELOW_FLOOR_RATIO,
        }
        return Result(
            preset=workload.preset.name,
            impl=impl,
            fast_dtype=dtype_name(config.fast_dtype),
            slow_dtype=dtype_name(config.slow_dtype),
            numel=workload.numel,
            tensors=len(workload.preset.shapes),
            rounds=len(timing.samples),
            median_ms=timing.median * 1e3,
            q1_ms=q1 * 1e3,
            q3_ms=q3 * 1e3,
            best_ms=timing.best * 1e3,
            spread=timing.spread,
            gbps=workload.traffic_bytes / timing.median / 1e9,
            ratio_to_floor=ratio,
            copies=copies,
            misaligned=workload.misaligned,
            flags=[flag for flag, raised in conditions.items() if raised],
        )

    return [result(impl, timing) for impl, timing in timings.items()]
