"""The CUDA kernels, executed without a GPU: tests/cuda_emulation runs the device code of csrc/cuda/
on the CPU, every block and every thread of each launch that the real launch code picks, with the
block barrier as a barrier, and checks each access as compute-sanitizer would (bounds, reads
included; races; every element written once). Results are compared bit for bit with
exact_reference.py. What only a GPU shows is in the README ("The CUDA kernels without a GPU")."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from fractions import Fraction
from types import ModuleType
from typing import Any

import emulated_cuda
import exact_reference as ref
import numpy as np
import pytest
import torch
from conftest import DTYPE_PAIRS

CHUNK = 65536
BLOCK = 512
PARAMETER_BYTES = 32764  # CUDA 12.1+'s kernel parameter space
TABLE_CAPACITY = {2: 1167, 3: 908, 1: 1634}  # tensors per launch, by lists
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Grids smaller than the chunks: each block's grid-stride loop makes several trips.
ONE_BLOCK = 1
THREE_BLOCKS = 3


@pytest.fixture(scope="module")
def emulation() -> ModuleType:
    return emulated_cuda.load()


# -- data ---------------------------------------------------------------------------------------


def specials(dtype: torch.dtype) -> list[float]:
    info = torch.finfo(dtype)
    values = [0.0, 1.0, info.tiny, info.smallest_normal / 4, info.max, float("inf"), float("nan")]
    return [v for x in values for v in (x, -x)]


def random_values(n: int, dtype: torch.dtype, rng: np.random.Generator) -> torch.Tensor:
    """n non-zero values of both signs and varied magnitude (2^-4 to 2^4), in dtype."""
    values = np.exp2(rng.uniform(-4, 4, n)) * rng.choice([-1.0, 1.0], n)
    return torch.from_numpy(values).to(dtype)


def with_special_pairs(lists: list[torch.Tensor], rng: np.random.Generator) -> None:
    """Puts every combination of special values of the lists' dtypes at random places of the
    lists' tensors (the same places in each list), the first and last element included."""
    n = lists[0].numel()
    combinations = list(itertools.product(*(specials(t.dtype) for t in lists)))
    count = min(n, len(combinations))
    places = rng.permutation(n)[:count].tolist()
    places[: min(2, n)] = [0, n - 1][: min(2, n)]
    start = int(rng.integers(len(combinations)))
    chosen = [combinations[k % len(combinations)] for k in range(start, start + count)]
    for t, values in zip(lists, zip(*chosen)):
        t[places] = torch.tensor(values, dtype=torch.float64).to(t.dtype)


def guarded(emulation: ModuleType, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """values copied into the emulated device's memory, `offset` elements past a 64-byte boundary;
    the elements before them are poison (NaN) that the kernel must not touch."""
    base = emulation.guarded_empty(values.numel() + offset, values.dtype)
    view = base[offset:]
    view.copy_(values)
    return view


def vector_width(*dtypes: torch.dtype) -> int:
    return 16 // max(torch.empty(0, dtype=d).element_size() for d in dtypes)


def boundary_sizes(width: int) -> list[int]:
    """Each edge of apply_chunk and of the chunking: one element, a vector less one, a vector, one
    more, a chunk less one, a chunk, one more, and several chunks and a tail."""
    return [1, width - 1, width, width + 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + width + 3]


# -- checks -------------------------------------------------------------------------------------


def clean(report: Any) -> dict[str, int]:
    """The report's counters, once it is known to hold no violation."""
    assert report.violation_count == 0, "\n".join(report.violations)
    assert report.counters["parameter_bytes"] <= PARAMETER_BYTES
    return dict(report.counters)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal bit patterns (so zeros' signs too); a NaN only needs to be a NaN."""
    got_bits, want_bits = ref.bits(got), ref.bits(want)
    nan = np.isnan(ref.opmath(got)) & np.isnan(ref.opmath(want))
    wrong = np.flatnonzero((got_bits != want_bits) & ~nan)
    if wrong.size:
        i = int(wrong[0])
        pytest.fail(
            f"{what}: {wrong.size} elements differ, first at {i}: got {got[i].item()!r}, "
            f"want {want[i].item()!r}"
        )


def untouched_poison(view: torch.Tensor, offset: int) -> None:
    """The poison before a view (guarded()) is still there."""
    assert view.storage_offset() == offset
    before = torch.as_strided(view, (offset,), (1,), 0)
    assert before.view(torch.uint8).eq(0xFF).all()


def options(emulation: ModuleType, max_grid: int, *expect: str, **more: Any) -> Any:
    return emulation.LaunchOptions(
        max_grid=max_grid, expect=[getattr(emulation.Expect, e) for e in expect], **more
    )


def flag(emulation: ModuleType, value: bool) -> torch.Tensor:
    return guarded(emulation, torch.tensor([value]))


# -- the sync -----------------------------------------------------------------------------------


def run_sync(
    emulation: ModuleType,
    pair: tuple[torch.dtype, torch.dtype],
    sizes: Sequence[int],
    alpha: float,
    max_grid: int,
    offsets: Sequence[tuple[int, int]] | None = None,
    gate: str = "none",
) -> dict[str, int]:
    """One emulated sync of tensors of these sizes (at these element offsets per list), checked
    against the reference; its counters."""
    rng = np.random.default_rng([len(sizes), sum(sizes), int(alpha * 100), len(gate)])
    offsets = offsets or [(0, 0)] * len(sizes)
    slow, fast, want_slow, want_fast = [], [], [], []
    for n, (slow_offset, fast_offset) in zip(sizes, offsets):
        s, f = (random_values(n, dtype, rng) for dtype in pair)
        if n:
            with_special_pairs([s, f], rng)
        restoring = gate == "restoring"
        new_s, new_f = (s, ref.restore(s, f)) if restoring else ref.sync(s, f, alpha)
        if gate == "closed":
            new_s, new_f = s, f
        want_slow.append(new_s)
        want_fast.append(new_f)
        slow.append(guarded(emulation, s, slow_offset))
        fast.append(guarded(emulation, f, fast_offset))
    expect = {
        "none": ("written", "written"),
        "open": ("written", "written"),
        "restoring": ("read", "written"),
        "closed": ("untouched", "untouched"),
    }[gate]
    due = None if gate == "none" else flag(emulation, gate != "closed")
    restore = None if gate == "none" else flag(emulation, gate == "restoring")
    report = emulation.update(
        slow, fast, alpha, due, restore, options(emulation, max_grid, *expect)
    )
    counters = clean(report)
    for i, (s, f) in enumerate(zip(slow, fast)):
        assert_bitwise(s, want_slow[i], f"slow[{i}] ({s.numel()} elements)")
        assert_bitwise(f, want_fast[i], f"fast[{i}] ({f.numel()} elements)")
        untouched_poison(s, offsets[i][0])
        untouched_poison(f, offsets[i][1])
    return counters


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
@pytest.mark.parametrize("alpha", [0.3, 0.75, 1.0])  # both branches of the weight, and weight 1
def test_sync_on_every_boundary_of_the_chunks(emulation, pair, alpha):
    grid = emulated_cuda.h200_grid("sync", *pair)
    counters = run_sync(emulation, pair, boundary_sizes(vector_width(*pair)), alpha, grid)
    chunks = sum(-(-n // CHUNK) for n in boundary_sizes(vector_width(*pair)))
    assert counters["launches"] == 1 and counters["blocks"] == min(chunks, grid)
    assert counters["chunks"] == counters["blocks_with_work"] == chunks
    assert counters["vector_elements"] and counters["tail_elements"]
    assert counters["scalar_only_elements"] and counters["clamped_loads"]
    assert counters["threads"] == BLOCK * counters["blocks"]


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.float32, torch.float16)])
@pytest.mark.parametrize("grid", [ONE_BLOCK, THREE_BLOCKS])
def test_sync_on_grids_smaller_than_the_chunks(emulation, pair, grid):
    sizes = boundary_sizes(vector_width(*pair))
    counters = run_sync(emulation, pair, sizes, 0.5, grid)
    chunks = sum(-(-n // CHUNK) for n in sizes)
    assert counters["blocks"] == grid
    assert counters["max_chunks_per_block"] == -(-chunks // grid)


def misaligned_sizes(width: int) -> list[int]:
    return [1, width - 1, width, 2 * width + 1, CHUNK + width + 1, 2 * CHUNK + 5]


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
def test_sync_peels_a_head_off_views_equally_misaligned(emulation, pair):
    width = vector_width(*pair)
    sizes = [n for _ in range(1, width) for n in misaligned_sizes(width)]
    offsets = [(o, o) for o in range(1, width) for _ in misaligned_sizes(width)]
    counters = run_sync(emulation, pair, sizes, 0.5, THREE_BLOCKS, offsets)
    assert counters["head_elements"] and counters["vector_elements"] and counters["tail_elements"]


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
def test_sync_refuses_the_peel_for_views_misaligned_differently(emulation, pair):
    width = vector_width(*pair)
    sizes = misaligned_sizes(width) * 2
    offsets = [(0, 1)] * len(misaligned_sizes(width)) + [(1, width - 1 if width > 2 else 0)] * len(
        misaligned_sizes(width)
    )
    counters = run_sync(emulation, pair, sizes, 0.5, THREE_BLOCKS, offsets)
    assert counters["vector_loads"] == 0 and counters["scalar_only_elements"]


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
@pytest.mark.parametrize("gate", ["closed", "open", "restoring"])
def test_gated_sync(emulation, pair, gate):
    width = vector_width(*pair)
    grid = emulated_cuda.h200_grid("sync", *pair)
    counters = run_sync(emulation, pair, [width + 1, CHUNK + width + 1], 0.4, grid, gate=gate)
    touched = counters["scalar_reads"] + counters["vector_loads"]
    assert (touched == 0) == (gate == "closed")


# -- the momentum sync --------------------------------------------------------------------------


def run_momentum_sync(
    emulation: ModuleType,
    pair: tuple[torch.dtype, torch.dtype],
    sizes: Sequence[int],
    nesterov: bool,
    max_grid: int,
    offsets: Sequence[int] | None = None,
    gate: str = "none",
) -> dict[str, int]:
    rng = np.random.default_rng([len(sizes), sum(sizes), nesterov, len(gate)])
    offsets = offsets or [0] * len(sizes)
    lr, mu = 0.7, 0.9
    lists: list[list[torch.Tensor]] = [[], [], []]
    wants: list[list[torch.Tensor]] = [[], [], []]
    for n, offset in zip(sizes, offsets):
        s, f, m = (random_values(n, dtype, rng) for dtype in (*pair, pair[0]))
        if n:
            with_special_pairs([s, f, m], rng)
        if gate == "closed":
            new = (s, f, m)
        elif gate == "restoring":
            new = (s, ref.restore(s, f), m)
        else:
            new = ref.momentum_sync(s, f, m, lr, mu, nesterov)
        for k, (t, want) in enumerate(zip((s, f, m), new)):
            lists[k].append(guarded(emulation, t, offset))
            wants[k].append(want)
    expect = {
        "none": ("written",) * 3,
        "open": ("written",) * 3,
        "restoring": ("read", "written", "any"),
        "closed": ("untouched",) * 3,
    }[gate]
    due = None if gate == "none" else flag(emulation, gate != "closed")
    restore = None if gate == "none" else flag(emulation, gate == "restoring")
    report = emulation.momentum_update(
        *lists, lr, mu, nesterov, due, restore, options(emulation, max_grid, *expect)
    )
    counters = clean(report)
    for name, got, want in zip(("slow", "fast", "momentum"), lists, wants):
        for i, (g, w) in enumerate(zip(got, want)):
            assert_bitwise(g, w, f"{name}[{i}] ({g.numel()} elements)")
            untouched_poison(g, offsets[i])
    return counters


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "heavy_ball"])
def test_momentum_sync_on_every_boundary_of_the_chunks(emulation, pair, nesterov):
    grid = emulated_cuda.h200_grid("nesterov" if nesterov else "heavy ball", *pair)
    counters = run_momentum_sync(
        emulation, pair, boundary_sizes(vector_width(*pair)), nesterov, grid
    )
    assert counters["vector_elements"] and counters["tail_elements"]
    assert counters["scalar_only_elements"] and counters["clamped_loads"]


@pytest.mark.parametrize("pair", [(torch.float32, torch.bfloat16), (torch.float64, torch.float64)])
def test_momentum_sync_on_misaligned_views_and_a_tiny_grid(emulation, pair):
    width = vector_width(*pair)
    sizes = [n for _ in range(width) for n in misaligned_sizes(width)]
    offsets = [o for o in range(width) for _ in misaligned_sizes(width)]
    counters = run_momentum_sync(emulation, pair, sizes, True, ONE_BLOCK, offsets)
    assert counters["head_elements"] and counters["max_chunks_per_block"] > 1


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
@pytest.mark.parametrize("gate", ["closed", "open", "restoring"])
def test_gated_momentum_sync(emulation, pair, gate):
    width = vector_width(*pair)
    grid = emulated_cuda.h200_grid("nesterov", *pair)
    sizes = [width + 1, CHUNK + width + 1]
    counters = run_momentum_sync(emulation, pair, sizes, True, grid, gate=gate)
    touched = counters["scalar_reads"] + counters["vector_loads"]
    assert (touched == 0) == (gate == "closed")


# -- found_nonfinite_ ---------------------------------------------------------------------------


def run_found_nonfinite(
    emulation: ModuleType,
    tensors: list[torch.Tensor],
    max_grid: int,
    due: bool | None = None,
    offset: int = 0,
) -> tuple[bool, dict[str, int]]:
    found = flag(emulation, False)
    on_device = [guarded(emulation, t, offset) for t in tensors]
    expect = "untouched" if due is False else "read_only"
    due_flag = None if due is None else flag(emulation, due)
    report = emulation.found_nonfinite(
        on_device, found, due_flag, options(emulation, max_grid, expect)
    )
    counters = clean(report)
    for got, want in zip(on_device, tensors):
        assert_bitwise(got, want, "a checked tensor")
        untouched_poison(got, offset)
    return bool(found), counters


def test_found_nonfinite_hears_every_thread_of_a_block(emulation):
    # One chunk of 8 vectors per thread: the value is in thread t's k-th vector, so only thread t
    # sees it before the barrier.
    width = vector_width(torch.float32)
    vectors_in_flight = 8
    values = random_values(
        BLOCK * vectors_in_flight * width, torch.float32, np.random.default_rng(0)
    )
    lost = []
    for thread in range(BLOCK):
        k = thread % vectors_in_flight
        tensor = values.clone()
        tensor[(thread + k * BLOCK) * width + thread % width] = [np.nan, np.inf, -np.inf][k % 3]
        found, counters = run_found_nonfinite(emulation, [tensor], 1)
        if not found:
            lost.append(thread)
        assert counters.get("barriers") == 1 and counters.get("barrier_ors") == 1
    assert not lost, f"the non-finite value of threads {lost} was lost"
    found, counters = run_found_nonfinite(emulation, [values], 1)
    assert not found and counters.get("barrier_ors") == 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("where", ["nowhere", "head", "vector", "tail", "last"])
def test_found_nonfinite_in_each_part_of_a_chunk(emulation, dtype, where):
    width = vector_width(dtype)
    offset = 1  # each chunk: a head of width - 1 elements, vectors, a tail
    n = 3 * CHUNK + 2 * width + 1
    tensor = random_values(n, dtype, np.random.default_rng(len(where)))
    place = {"head": width - 2, "vector": CHUNK + 7, "tail": CHUNK - 1, "last": n - 1}
    if where != "nowhere":
        tensor[place[where]] = float("nan") if where != "vector" else float("-inf")
    grid = emulated_cuda.h200_grid("nonfinite", dtype, dtype)
    found, counters = run_found_nonfinite(
        emulation, [tensor, tensor[:5].clone()], grid, None, offset
    )
    assert found == (where != "nowhere")
    assert counters["head_elements"] and counters["tail_elements"]
    assert counters["barriers"] == counters["blocks"]


@pytest.mark.parametrize("due", [True, False])
def test_found_nonfinite_when_due_or_not(emulation, due):
    tensor = torch.full((CHUNK + 3,), float("nan"))
    found, counters = run_found_nonfinite(emulation, [tensor], THREE_BLOCKS, due)
    assert found == due
    assert counters.get("barriers", 0) == (counters["blocks"] if due else 0)


# -- several launches ---------------------------------------------------------------------------


def sizes_with_empties(count: int, seed: int) -> list[int]:
    """count sizes from 1 to 40, with an empty tensor every 97."""
    sizes = np.random.default_rng(seed).integers(1, 41, count).tolist()
    for i in range(0, count, 97):
        sizes.insert(i, 0)
    return sizes


def test_sync_over_more_tensors_than_a_table_holds(emulation):
    sizes = sizes_with_empties(TABLE_CAPACITY[2] + 2, 0)
    pair = (torch.float32, torch.bfloat16)
    grid = emulated_cuda.h200_grid("sync", *pair)
    counters = run_sync(emulation, pair, sizes, 0.5, grid)
    assert counters["launches"] == 2


def test_momentum_sync_over_more_tensors_than_a_table_holds(emulation):
    sizes = sizes_with_empties(TABLE_CAPACITY[3] + 2, 1)
    pair = (torch.float16, torch.float16)
    counters = run_momentum_sync(emulation, pair, sizes, False, THREE_BLOCKS)
    assert counters["launches"] == 2


def test_found_nonfinite_over_more_tensors_than_a_table_holds(emulation):
    sizes = sizes_with_empties(TABLE_CAPACITY[1] + 2, 2)
    rng = np.random.default_rng(3)
    tensors = [random_values(n, torch.float64, rng) for n in sizes]
    tensors[-1][-1] = float("inf")  # in the second launch
    found, counters = run_found_nonfinite(emulation, tensors, THREE_BLOCKS)
    assert found and counters["launches"] == 2


def test_table_capacity_and_packing(emulation):
    # Full tables, then one more tensor in a second launch: the packing of a real call.
    slow = [guarded(emulation, torch.ones(1)) for _ in range(TABLE_CAPACITY[2] + 1)]
    fast = [guarded(emulation, torch.zeros(1)) for _ in slow]
    report = emulation.update(
        slow, fast, 0.5, None, None, options(emulation, 1, "written", "written")
    )
    clean(report)
    assert report.table_counts == [TABLE_CAPACITY[2], 1] and report.grids == [1, 1]


# -- index arithmetic beyond 2^31 elements, on tables alone -------------------------------------


def test_tables_of_tensors_beyond_two_billion_elements(emulation):
    numels = [2**31 + 5, 2**33 + 7, 3, *[2**40] * 64, 2**31]
    tables = emulation.pack_phantom(numels)
    chunks = [-(-n // CHUNK) for n in numels]
    packed = [item for table in tables for item in table.items]
    assert packed == list(range(len(numels)))
    assert [len(t.items) for t in tables] == [66, 2]  # 2^30 - 1 chunks at most per launch
    for table in tables:
        counts = [chunks[i] for i in table.items]
        assert table.numel == [numels[i] for i in table.items]
        assert table.first_chunk == list(itertools.accumulate([0, *counts[:-1]]))
        assert table.total_chunks == sum(counts) <= 2**30 - 1


def expected_elements(
    table: Any, grid: int, block: int, thread: int, width: int
) -> dict[int, tuple[int, int, int]]:
    """Per table entry, the (first, last, count) elements that one thread of one block writes in a
    launch over 16-byte aligned tensors, computed here with Python's integers."""
    touched: dict[int, list[int]] = {}
    for c in range(block, table.total_chunks, grid):
        t = max(i for i, first in enumerate(table.first_chunk) if first <= c)
        begin = (c - table.first_chunk[t]) * CHUNK
        n = min(CHUNK, table.numel[t] - begin)
        vectors = n // width
        mine = [
            begin + v * width + j for v in range(thread, vectors, BLOCK) for j in range(width)
        ] + list(range(begin + vectors * width + thread, begin + n, BLOCK))
        touched.setdefault(t, []).extend(mine)
    return {t: (min(e), max(e), len(e)) for t, e in touched.items() if e}


@pytest.mark.parametrize(
    ("numels", "grid_from_total", "blocks"),
    [
        # every chunk its own block: the first and last chunk of each tensor
        ([2**31 + 5, 2**33 + 7, 3], 0, [0, 32767, 32768, 32769, 163841, 163842]),
        # two trips per block, the second past 2^31 elements
        ([2**31 + 5, 2**33 + 7, 3], -(163843 // 2), [0, 1, 81920]),
        # the last chunk of the largest table: its index plus the grid stays below 2^31
        ([2**40] * 64, 0, [0, 63 * 2**24 - 1]),
        ([2**40] * 64, -1, [0, 63 * 2**24 - 2]),
    ],
)
def test_chunk_search_and_offsets_beyond_int32(emulation, numels, grid_from_total, blocks):
    table = emulation.pack_phantom(numels)[0]
    grid = table.total_chunks + grid_from_total
    threads = [0, 1, 255, 511]
    report = emulation.phantom_update(
        numels, options(emulation, grid, blocks=blocks, threads=threads, table=0)
    )
    assert report.violation_count == 0, "\n".join(report.violations)
    assert report.grids == [grid]
    got = {
        (r.thread, r.list, r.item): (r.first, r.last, r.writes) for r in report.records if r.writes
    }
    want = {
        (block * BLOCK + thread, list_, item): span
        for block in blocks
        for thread in threads
        for item, span in expected_elements(table, grid, block, thread, 4).items()
        for list_ in (0, 1)
    }
    assert got == want


# -- the checks themselves ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "expect", "message"),
    [
        ("unwritten", "written", "element 0 was never written"),
        ("shared", "read_only", "which block 0 thread 0 touched"),
        ("out_of_bounds", "read_only", "0 bytes past the end of list 0 of flat item 0"),
        ("misaligned_vector", "read_only", "off its alignment"),
        ("divergent_barrier", "read_only", "returned while block 0 thread 0 waits"),
        ("hang", "read_only", "still running after 1 s, in block 0 thread 5"),
        ("fault", "read_only", "faulted at 0x"),
    ],
)
def test_the_checks_report_each_kind_of_violation(emulation, fault, expect, message):
    tensors = [guarded(emulation, torch.ones(1000))]
    report = emulation.faulty(
        fault,
        tensors,
        flag(emulation, False),
        options(emulation, THREE_BLOCKS, expect, timeout_s=1.0),
    )
    assert report.violation_count > 0
    assert message in report.violations[0], report.violations[0]


# -- the reference itself -----------------------------------------------------------------------


def special_operands(fmt: ref.Format) -> list[float]:
    p, low, high = fmt
    tiny, smallest = 2.0**low, 2.0 ** (low - p + 1)
    largest = float((2 - Fraction(2) ** (1 - p)) * Fraction(2) ** high)
    values = [0.0, 1.0, 3.0, smallest, tiny, tiny - smallest, largest, 2.0 ** (high // 2)]
    values += [float("inf"), float("nan"), 1 + 2.0 ** (1 - p), 2.0 ** -(p // 2)]
    return [v for x in values for v in (x, -x)]


def random_operands(fmt: ref.Format, count: int, rng: np.random.Generator) -> Iterator[float]:
    kind = np.float64 if fmt == ref.FLOAT64 else np.float32
    for _ in range(count):
        yield float(kind(rng.standard_normal() * 2.0 ** rng.integers(-30, 30)))


@pytest.mark.parametrize("fmt", [ref.FLOAT32, ref.FLOAT64], ids=["float32", "float64"])
def test_the_reference_fma_is_rounded_once(fmt):
    rng = np.random.default_rng(0)
    special = special_operands(fmt)
    triples = list(itertools.product(special, special[::3], special[::2]))
    for _ in range(3000):
        a, b, c = random_operands(fmt, 3, rng)
        triples.append((a, b, c))
        triples.append((a, b, -float(Fraction(a) * Fraction(b))))  # cancellation
        triples.append((a, b, float(np.nextafter(a * b, 0)) * -1))
    a, b, c = (
        np.array(x, dtype=np.float64 if fmt == ref.FLOAT64 else np.float32) for x in zip(*triples)
    )
    got = ref.fma(a, b, c)
    for i, triple in enumerate(zip(a.tolist(), b.tolist(), c.tolist())):
        want = ref.fma_exact(*triple, fmt)
        same = (np.isnan(got[i]) and np.isnan(want)) or (
            got[i] == want and np.signbit(got[i]) == np.signbit(want)
        )
        assert same, f"fma{triple} = {got[i]!r}, exactly {want!r}"


@pytest.mark.parametrize(
    ("dtype", "fmt"), [(torch.float16, ref.FLOAT16), (torch.bfloat16, ref.BFLOAT16)]
)
def test_the_reference_rounds_to_half_precision_once(dtype, fmt):
    rng = np.random.default_rng(1)
    values = rng.standard_normal(20000).astype(np.float32) * np.float32(2.0) ** rng.integers(
        -30, 20, 20000
    ).astype(np.float32)
    # exact ties between two half-precision neighbours, both parities
    ties = (np.arange(1, 2000, dtype=np.float32) * 2 + 1) * np.float32(2.0 ** (-fmt.precision))
    values = np.concatenate([values, ties, -ties, np.float32(special_operands(ref.FLOAT32))])
    got = ref.opmath(ref.rounded(values, dtype))
    for x, g in zip(values.tolist(), got.tolist()):
        if np.isnan(x):
            assert np.isnan(g)
        elif x == 0 or np.isinf(x):
            assert g == x and np.signbit(g) == np.signbit(x)
        else:
            assert g == ref.round_fraction(Fraction(x), fmt), f"{x!r} rounded to {g!r}"


# -- the 8-bit pseudo-gradients ------------------------------------------------------------------

QUANTIZATION_SIZES = [1, 1023, 1024, 1025, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5000]


def quantization_inputs(
    emulation: ModuleType, pair: tuple[torch.dtype, torch.dtype], sizes: Sequence[int], seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rng = np.random.default_rng([seed, len(sizes), sum(sizes)])
    slow, fast = [], []
    for n in sizes:
        s = random_values(n, pair[0], rng)
        f = (s.double() + torch.from_numpy(rng.normal(0, 0.1, n))).to(pair[1])
        if n > 3000:  # a non-finite block and a zero one
            f[7] = float("nan")
            f[2048:3072] = s[2048:3072].to(pair[1])
            s[2048:3072] = f[2048:3072].to(pair[0])
        slow.append(guarded(emulation, s))
        fast.append(guarded(emulation, f))
    return slow, fast


def poisoned(emulation: ModuleType, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    fill = 99 if dtype == torch.int8 else float("nan")
    return guarded(emulation, torch.full(shape, fill, dtype=dtype).reshape(-1)).view(shape)


@pytest.mark.parametrize("pair", DTYPE_PAIRS)
@pytest.mark.parametrize("grid", [ONE_BLOCK, THREE_BLOCKS, 264])
def test_quantize_and_average_on_every_boundary_of_the_blocks(emulation, pair, grid):
    sizes = QUANTIZATION_SIZES
    blocks = sum(-(-n // ref.QUANTIZATION_BLOCK) for n in sizes)
    rows = []
    for worker in range(2):
        slow, fast = quantization_inputs(emulation, pair, sizes, worker)
        payload = poisoned(emulation, (sum(sizes),), torch.int8)
        scales = poisoned(emulation, (blocks,), torch.float32)
        report = emulation.quantize(slow, fast, payload, scales, options(emulation, grid))
        counters = clean(report)
        assert counters["launches"] == 1
        want = [ref.quantize(s, f) for s, f in zip(slow, fast)]
        assert np.array_equal(payload.numpy(), np.concatenate([q for q, _ in want]))
        got_scales, want_scales = scales.numpy(), np.concatenate([s for _, s in want])
        assert np.array_equal(np.isnan(got_scales), np.isnan(want_scales))
        finite = ~np.isnan(want_scales)
        assert np.array_equal(got_scales[finite].view(np.int32), want_scales[finite].view(np.int32))
        rows.append((payload, scales))
    payloads = guarded(emulation, torch.stack([p for p, _ in rows]).reshape(-1)).view(2, -1)
    gathered = guarded(emulation, torch.stack([s for _, s in rows]).reshape(-1)).view(2, -1)
    slow, _ = quantization_inputs(emulation, pair, sizes, 7)
    out = [poisoned(emulation, (n,), pair[1]) for n in sizes]
    report = emulation.dequantize_mean(slow, out, payloads, gathered, options(emulation, grid))
    clean(report)
    offset, block = 0, 0
    for s, o, n in zip(slow, out, sizes):
        count = -(-n // ref.QUANTIZATION_BLOCK)
        q_rows = [payloads[w, offset : offset + n].numpy() for w in range(2)]
        s_rows = [gathered[w, block : block + count].numpy() for w in range(2)]
        assert_bitwise(o, ref.dequantize_mean(s, pair[1], q_rows, s_rows), f"out ({n} elements)")
        offset, block = offset + n, block + count


def test_quantize_over_more_tensors_than_a_table_holds(emulation):
    sizes = [3] * 1200  # a table of four lists holds 743 tensors
    slow, fast = quantization_inputs(emulation, (torch.float32, torch.float32), sizes, 0)
    payload = poisoned(emulation, (sum(sizes),), torch.int8)
    scales = poisoned(emulation, (len(sizes),), torch.float32)
    report = emulation.quantize(slow, fast, payload, scales, options(emulation, THREE_BLOCKS))
    assert clean(report)["launches"] == 2
    want = [ref.quantize(s, f) for s, f in zip(slow, fast)]
    assert np.array_equal(payload.numpy(), np.concatenate([q for q, _ in want]))
