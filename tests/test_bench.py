"""The lookahead-bench package: --help and argument errors and the config they resolve to, the
workloads' traffic and placement, the floor timed with each workload (read at its fastest round,
described alike everywhere), the spread statistic and the extra rounds and flags of noisy rows,
the check against torch, the memory a run says it needs against what it takes, and tiny runs of
both benchmarks with their tables, JSON and plot."""

import dataclasses
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lookahead_cuda.bench import floor, memory, sync, timing
from lookahead_cuda.bench.cli import main, parse_args
from lookahead_cuda.bench.config import BenchConfig
from lookahead_cuda.bench.floor import CACHE_LINE, FloorCopy, floor_buffers, floor_copy
from lookahead_cuda.bench.impls import IMPLEMENTATIONS, Implementation, Sync
from lookahead_cuda.bench.presets import PRESETS, custom_preset
from lookahead_cuda.bench.timing import Rounds, Timing, iqr_over_median, measure_interleaved
from lookahead_cuda.bench.workload import Workload

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tensors", "3"], "--tensors and --numel go together"),
        (["--tensors", "0", "--numel", "5"], "must be at least 1"),
        (["--reps", "0"], "--reps must be at least 1"),
        (["--alpha", "1.5"], "--alpha must be in (0, 1]"),
        (["--slow-dtype", "float16", "--fast-dtype", "float32"], "unsupported --slow-dtype"),
        (["--preset", "nope"], "invalid choice"),
        (["--impl", "nope"], "invalid choice"),
        (["--device", "nonsense"], "--device"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--e2e", "--misaligned"], "--misaligned places the sync benchmark's tensors"),
        (["--momentum", "1.0"], "--momentum must be in [0, 1)"),
        (["--reps", "5", "--max-reps", "4"], "--max-reps must be at least --reps (5)"),
        (["--max-spread", "0"], "--max-spread must be above 0"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _help_entries(capsys) -> dict[str, str]:
    """``--help``'s text for each option but -h, by option, its wrapped lines joined."""
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = re.split(r"\n(?:options|optional arguments):\n", capsys.readouterr().out)[1]
    entries = re.split(r"\n  (?=-)", text)[1:]
    return {e.split()[0]: " ".join(e.split()) for e in entries if not e.startswith("-h")}


def test_help_states_each_default_once(capsys):
    entries = _help_entries(capsys)
    assert {"--device", "--slow-dtype", "--momentum", "--json", "--e2e"} <= set(entries)
    for option, text in entries.items():
        assert text.count("(default:") == 1, f"{option}: {text}"
        assert "(default: None)" not in text and "(default: False)" not in text, text
    assert "(default: float32)" in entries["--fast-dtype"]
    assert "(default: cuda if available, else cpu)" in entries["--device"]


def test_help_says_what_momentum_0_means_for_each_benchmark(capsys):
    text = _help_entries(capsys)["--momentum"]
    assert "0: Lookahead's lerp" in text
    assert "With --e2e, the momentum of the SNOO rows, where 0 stands for 0.9" in text
    assert text.endswith("(default: 0)")


def test_gpu_only_preset_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--preset", "llama-7b"])
    assert "needs a GPU" in capsys.readouterr().err


def test_presets_have_the_real_models_sizes():
    assert PRESETS["gpt2"].numel == 124_439_808 and len(PRESETS["gpt2"].shapes) == 148
    assert PRESETS["resnet50"].numel == 25_557_032
    assert PRESETS["llama-7b"].numel == 6_738_415_616 and len(PRESETS["llama-7b"].shapes) == 291


def test_parse_args_resolves_a_frozen_config():
    config = parse_args(["--device", "cpu", "--fast-dtype", "bfloat16", "--slow-dtype", "float32"])
    assert isinstance(config, BenchConfig)
    assert config.device == CPU
    assert (config.slow_dtype, config.fast_dtype) == (torch.float32, torch.bfloat16)
    assert config.list_dtypes == (torch.float32, torch.bfloat16)
    assert config.impls == tuple(IMPLEMENTATIONS)
    assert [p.name for p in config.presets] == [n for n, p in PRESETS.items() if not p.gpu_only]
    assert not config.misaligned and config.json_path is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.reps = 3  # type: ignore[misc]


def test_parse_args_defaults_and_custom_workloads():
    config = parse_args(["--device", "cpu", "--preset", "gpt2", "--tensors", "2", "--numel", "7"])
    assert config.slow_dtype == config.fast_dtype == torch.float32
    assert [p.name for p in config.presets] == ["gpt2", "custom"]
    assert config.presets[1].shapes == ((7,), (7,))
    assert [p.name for p in parse_args(["--device", "cpu", "--e2e"]).presets] == ["gpt2"]
    config = parse_args(["--device", "cpu", "--misaligned", "--impl", "loop", "--json", "x.json"])
    assert config.misaligned and config.impls == ("loop",) and config.json_path == "x.json"


def test_iqr_over_median_ignores_an_outlier():
    # Linear quartiles of [1, 2, 3, 4, 100] are 2 and 4; the median is 3.
    assert iqr_over_median([1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx(2 / 3)
    assert iqr_over_median([100.0, 4.0, 3.0, 2.0, 1.0]) == pytest.approx(2 / 3)
    assert iqr_over_median([2.0, 2.0, 2.0]) == 0.0
    assert iqr_over_median([5.0]) == 0.0
    assert Timing((1.0, 2.0, 3.0, 4.0, 100.0)).spread == pytest.approx(2 / 3)
    assert Timing((1.0, 2.0, 3.0, 4.0, 100.0)).median == 3.0
    assert Timing((1.0, 2.0, 3.0, 4.0, 100.0)).quartiles == (2.0, 4.0)
    assert Timing((1.0, 2.0, 3.0, 4.0, 100.0)).best == 1.0


def _scripted(monkeypatch, **series):
    """measure_interleaved's functions by name, each timed as the next value of its series."""
    monkeypatch.setattr(timing, "_time_call", lambda fn, device: fn())
    return {name: iter(values).__next__ for name, values in series.items()}


def test_rounds_go_on_while_a_spread_is_too_large_and_stop_at_the_cap(monkeypatch):
    fns = _scripted(monkeypatch, quiet=itertools.repeat(1.0), noisy=itertools.cycle([1.0, 3.0]))
    timings = measure_interleaved(fns, CPU, Rounds(reps=4, max_reps=12, max_spread=0.2), warmup=0)
    assert [len(t.samples) for t in timings.values()] == [12, 12]
    assert timings["noisy"].spread > 0.2 and timings["quiet"].spread == 0.0


def test_rounds_stop_once_a_burst_is_outvoted(monkeypatch):
    # Two slow rounds in the first four; from the ninth round on, the third quartile is 1.0.
    burst = itertools.chain([1.0, 3.0, 1.0, 3.0], itertools.repeat(1.0))
    fns = _scripted(monkeypatch, quiet=itertools.repeat(1.0), burst=burst)
    timings = measure_interleaved(fns, CPU, Rounds(reps=4, max_reps=50, max_spread=0.2), warmup=0)
    assert len(timings["burst"].samples) == 9 and timings["burst"].spread == 0.0
    fns = _scripted(monkeypatch, quiet=itertools.repeat(1.0))
    quiet = measure_interleaved(fns, CPU, Rounds(reps=4, max_reps=50, max_spread=0.2), warmup=0)
    assert len(quiet["quiet"].samples) == 4


def test_workload_traffic_counts_every_list_read_and_written():
    preset = custom_preset(3, 1000)
    workload = Workload(preset, (torch.float32, torch.bfloat16), CPU)
    assert workload.bytes_per_element == 6
    assert workload.set_bytes == 3000 * 6
    assert workload.traffic_bytes == 3000 * 2 * (4 + 2)
    lists = workload.random_lists()
    assert [[t.dtype for t in ts] for ts in lists] == [[torch.float32] * 3, [torch.bfloat16] * 3]
    assert workload.leading(2500).preset.shapes == ((1000,), (1000,))
    assert workload.leading(10).preset.shapes == ((1000,),)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_misaligned_workloads_place_every_tensor_off_16_bytes(dtype):
    workload = Workload(custom_preset(4, 33), (dtype, dtype), CPU, misaligned=True)
    lists = workload.random_lists()
    copies = workload.copy_lists(lists)
    for t in [*lists[0], *lists[1], *copies[0], *copies[1]]:
        assert t.data_ptr() % 16 != 0 and t.is_contiguous() and t.shape == (33,)
    assert all(torch.equal(a, b) for a, b in zip(lists[0] + lists[1], copies[0] + copies[1]))
    aligned = Workload(custom_preset(4, 33), (dtype, dtype), CPU).random_lists()
    assert all(t.data_ptr() % 16 == 0 for t in aligned[0] + aligned[1])


@pytest.mark.parametrize("traffic", [4096, 1 << 20, 6 * 12_345 * 2])
def test_floor_buffers_move_the_workloads_traffic_apart_in_one_allocation(traffic):
    for copy in (floor_copy(CPU), FloorCopy("torch copy_", 2, lambda a, b: b.copy_(a))):
        a, b = floor_buffers(copy, CPU, traffic)
        assert a.dtype == b.dtype == torch.float32 and a.numel() == b.numel()
        assert 0 <= copy.passes * a.nbytes - traffic < copy.passes * 4
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        distance = b.data_ptr() - a.data_ptr()
        assert distance >= a.nbytes + (3 << 20)
        assert distance % CACHE_LINE == 0 and (distance // CACHE_LINE) % 2 == 1


def test_cpu_floor_is_a_swap():
    copy = floor_copy(CPU)
    a, b = floor_buffers(copy, CPU, 4096)
    before_a, before_b = a.clone(), b.clone()
    copy.run(a, b)
    assert torch.equal(a, before_b) and torch.equal(b, before_a)


def test_the_floor_is_described_alike_everywhere(capsys):
    described = " ".join(floor.DESCRIPTION.split())
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert described in " ".join(capsys.readouterr().out.split())
    root = Path(__file__).resolve().parent.parent
    for readme in (root / "README.md", root / "bench" / "README.md"):
        assert described in " ".join(readme.read_text().split()), readme
    # The table says it too: test_tiny_run_writes_table_and_json.


def _config(**changes) -> BenchConfig:
    config = parse_args(["--device", "cpu", "--tensors", "3", "--numel", "1000", "--reps", "3"])
    return dataclasses.replace(config, **changes)


@pytest.mark.parametrize("misaligned", [False, True])
def test_check_against_torch_sees_the_timed_placement(monkeypatch, misaligned):
    pointers = []

    def spy(lists, settings):
        pointers.extend(t.data_ptr() for ts in lists for t in ts)
        IMPLEMENTATIONS["fused"].update(lists, settings)

    monkeypatch.setitem(IMPLEMENTATIONS, "spy", Implementation(spy, bitwise=True))
    workload = Workload(custom_preset(3, 1000), (torch.float32,) * 2, CPU, misaligned)
    sync.check_against_torch(workload, ["spy"], Sync(0.5))
    assert len(pointers) == 6
    assert all((p % 16 != 0) == misaligned for p in pointers)


@pytest.mark.parametrize("misaligned", [False, True])
def test_check_against_torch_catches_a_wrong_implementation(monkeypatch, misaligned):
    def wrong(lists, settings):
        slow, fast = lists
        for s, f in zip(slow, fast):
            s.copy_(f)

    monkeypatch.setitem(IMPLEMENTATIONS, "wrong", Implementation(wrong, bitwise=False))
    workload = Workload(custom_preset(2, 100), (torch.float32,) * 2, CPU, misaligned)
    with pytest.raises(AssertionError, match="wrong disagrees with torch"):
        sync.check_against_torch(workload, ["wrong"], Sync(0.5))


def test_floor_rotates_through_as_many_copies_as_the_tensors(monkeypatch):
    swap = floor_copy(CPU)
    used = []

    def recording_swap(a, b):
        used.append(a.data_ptr())
        swap.run(a, b)

    monkeypatch.setattr(sync, "floor_copy", lambda device: FloorCopy("spy", 4, recording_swap))
    workload = Workload(custom_preset(3, 1000), (torch.float32,) * 2, CPU)
    config = _config(reps=9, max_reps=9, warmup=1)
    results = sync.bench_workload(workload, config, 5 * workload.set_bytes, lambda _: None)
    assert [r.copies for r in results] == [5] * 4
    assert len(used) == 10 and len(set(used[:5])) == 5 and used[5:] == used[:5]


@pytest.mark.parametrize("dtypes", [[], ["--fast-dtype", "bfloat16", "--slow-dtype", "float32"]])
def test_tiny_run_writes_table_and_json(tmp_path, capsys, dtypes):
    out = tmp_path / "results.json"
    argv = [
        "--device",
        "cpu",
        "--tensors",
        "3",
        "--numel",
        "1000",
        "--reps",
        "2",
        "--json",
        str(out),
        *dtypes,
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"floor: {floor.DESCRIPTION}\n" in printed
    assert "IQR/med" in printed
    for impl in ("fused", "foreach", "loop", "floor"):
        assert f"custom         {impl}" in printed
    report = json.loads(out.read_text())
    assert {"device", "torch", "threads", "results", "floor"} <= set(report)
    assert report["floor"] == {
        "description": floor.DESCRIPTION,
        "copy": "in-place swap",
        "rotation_bytes": report["floor"]["rotation_bytes"],
    }
    assert [r["impl"] for r in report["results"]] == ["fused", "foreach", "loop", "floor"]
    keys = {
        "preset",
        "impl",
        "fast_dtype",
        "slow_dtype",
        "numel",
        "tensors",
        "rounds",
        "median_ms",
        "q1_ms",
        "q3_ms",
        "best_ms",
        "spread",
        "gbps",
        "ratio_to_floor",
        "copies",
        "misaligned",
        "flags",
    }
    for r in report["results"]:
        assert keys <= set(r)
        assert r["numel"] == 3000 and r["tensors"] == 3 and r["median_ms"] > 0
        assert r["spread"] >= 0 and not r["misaligned"]


def test_each_workload_has_its_own_floor(tmp_path):
    out = tmp_path / "results.json"
    argv = ["--device", "cpu", "--preset", "many-small", "--tensors", "2", "--numel", "5000"]
    assert main([*argv, "--reps", "2", "--impl", "fused", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["preset"], r["impl"]) for r in results] == [
        ("many-small", "fused"),
        ("many-small", "floor"),
        ("custom", "fused"),
        ("custom", "floor"),
    ]
    for fused, floor_row in (results[:2], results[2:]):
        traffic = 2 * fused["numel"] * (4 + 4)
        best = floor_row["best_ms"]
        assert floor_row["ratio_to_floor"] == pytest.approx(floor_row["median_ms"] / best)
        assert floor_row["gbps"] == pytest.approx(traffic / (floor_row["median_ms"] / 1e3) / 1e9)
        assert fused["ratio_to_floor"] == pytest.approx(fused["median_ms"] / best)
        assert fused["copies"] == floor_row["copies"] >= 1


def test_the_floor_is_its_fastest_round_and_rows_below_or_above_it_by_noise_are_flagged(
    monkeypatch,
):
    # One round is a call of fused, then of the floor; each takes the next of ``times``.
    monkeypatch.setattr(timing, "_time_call", lambda fn, device: (fn(), next(times))[1])
    workload = Workload(custom_preset(3, 1000), (torch.float32,) * 2, CPU)
    config = _config(impls=("fused",), reps=4, max_reps=4, warmup=0)

    def bench() -> list[sync.Result]:
        return sync.bench_workload(workload, config, workload.set_bytes, lambda _: None)

    times = itertools.cycle([2.0, 2.0, 2.0, 2.2])  # fused 2; the floor 2 or 2.2
    fused, floor_row = bench()
    assert floor_row.best_ms == 2000 and floor_row.median_ms == 2100
    assert fused.ratio_to_floor == 1.0 and floor_row.ratio_to_floor == pytest.approx(1.05)
    assert fused.flags == floor_row.flags == []
    times = itertools.cycle([1.0, 2.0, 1.7, 2.0])  # fused's median 1.35 is 0.675x the floor
    fused, floor_row = bench()
    assert fused.ratio_to_floor == pytest.approx(0.675) and sync.BELOW_FLOOR in fused.flags
    assert floor_row.flags == []
    times = itertools.cycle([3.0, 2.0, 3.0, 4.0])  # the floor's median 3 is 1.5x its best
    fused, floor_row = bench()
    assert fused.spread == 0 and fused.flags == [sync.BUSY]
    assert floor_row.flags == [timing.NOISY, sync.BUSY]


def test_misaligned_run(tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--device", "cpu", "--tensors", "3", "--numel", "1001", "--reps", "2", "--misaligned"]
    dtypes = ["--fast-dtype", "bfloat16", "--slow-dtype", "float32"]
    assert main([*argv, *dtypes, "--json", str(out)]) == 0
    assert "not 16-byte aligned" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["misaligned"]
    assert [r["impl"] for r in report["results"]] == ["fused", "foreach", "loop", "floor"]
    assert all(r["misaligned"] and r["median_ms"] > 0 for r in report["results"])


def test_end_to_end_mode(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    argv = [
        "--device",
        "cpu",
        "--e2e",
        "--tensors",
        "4",
        "--numel",
        "5000",
        "--reps",
        "2",
        "--k",
        "2",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "AdamW(fused=True)" in printed and "+SNOO ms" in printed
    rows = json.loads(out.read_text())["e2e"]
    assert [r["optimizer"] for r in rows] == ["AdamW(foreach=True)", "AdamW(fused=True)"]
    assert all(r["step_ms"] > 0 and r["snoo_step_ms"] > 0 and r["k"] == 2 for r in rows)
    assert all(r["momentum"] == 0.9 for r in rows)


def test_the_outer_momentum_sync_has_three_lists_and_six_passes(tmp_path):
    config = _config(momentum=0.9)
    assert config.list_dtypes == (torch.float32,) * 3
    workload = Workload.of(config.presets[0], config)
    assert workload.bytes_per_element == 12 and workload.traffic_bytes == 24 * workload.numel
    out = tmp_path / "snoo.json"
    argv = ["--device", "cpu", "--tensors", "3", "--numel", "3000", "--reps", "2", "--momentum"]
    assert main([*argv, "0.9", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["momentum"] == 0.9
    assert [r["impl"] for r in report["results"]] == ["fused", "foreach", "loop", "floor"]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_every_momentum_implementation_is_checked_against_the_papers_update(impl, monkeypatch):
    workload = Workload(custom_preset(3, 777), (torch.float32,) * 3, CPU)
    sync.check_against_torch(workload, [impl], Sync(0.7, 0.9))

    def lerp_only(lists, settings):
        IMPLEMENTATIONS[impl].update(lists[:2], Sync(settings.alpha))

    monkeypatch.setitem(IMPLEMENTATIONS, "lerp-only", Implementation(lerp_only, bitwise=False))
    with pytest.raises(AssertionError, match="lerp-only disagrees"):
        sync.check_against_torch(workload, ["lerp-only"], Sync(0.7, 0.9))


def _sleepy(monkeypatch):
    """An implementation named "sleepy": the fused op, then a sleep of 0 or 30 ms in turn, so that
    its rounds spread far beyond any --max-spread whatever else runs on the machine."""
    naps = itertools.cycle([0.0, 0.03])

    def sleepy(lists, settings):
        IMPLEMENTATIONS["fused"].update(lists, settings)
        time.sleep(next(naps))

    monkeypatch.setitem(IMPLEMENTATIONS, "sleepy", Implementation(sleepy, bitwise=True))


def test_a_noisy_row_is_timed_up_to_the_cap_and_flagged(tmp_path, capsys, monkeypatch):
    _sleepy(monkeypatch)
    out = tmp_path / "results.json"
    argv = ["--device", "cpu", "--tensors", "2", "--numel", "1000", "--impl", "fused", "sleepy"]
    assert main([*argv, "--reps", "4", "--max-reps", "7", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("custom         sleepy"))
    assert "noisy" in row.split("  ")[-1].split(", ") and "      7" in row
    assert "noisy: IQR/med still above 20% after up to 7 rounds" in printed
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert "noisy" in rows["sleepy"]["flags"] and rows["sleepy"]["spread"] > 0.2
    assert {r["rounds"] for r in rows.values()} == {7}  # the workload's rows share their rounds


def test_plot_draws_each_rows_quartiles(tmp_path, monkeypatch):
    axes = pytest.importorskip("matplotlib.axes")
    _sleepy(monkeypatch)
    drawn = []
    bar = axes.Axes.bar

    def spy(self, x, height, *args, **kwargs):
        drawn.append((list(height), kwargs["yerr"]))
        return bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(axes.Axes, "bar", spy)
    png, out = tmp_path / "bars.png", tmp_path / "results.json"
    argv = ["--device", "cpu", "--tensors", "2", "--numel", "100", "--reps", "4"]
    assert main([*argv, "--impl", "sleepy", "--plot", str(png), "--json", str(out)]) == 0
    assert png.stat().st_size > 0
    results = json.loads(out.read_text())["results"]
    assert len(drawn) == len(results) == 2  # sleepy and the floor, one workload
    for (heights, (below, above)), r in zip(drawn, results):
        to_ratio = r["ratio_to_floor"] / r["median_ms"]
        assert heights == [r["ratio_to_floor"]]
        assert below[0] == pytest.approx((r["median_ms"] - r["q1_ms"]) * to_ratio)
        assert above[0] == pytest.approx((r["q3_ms"] - r["median_ms"]) * to_ratio)
    assert drawn[0][1][1][0] > 0  # the sleepy row's spread is drawn, not zero


def test_rotation_copies_are_capped():
    workload = Workload(custom_preset(1, 1), (torch.float32,) * 2, CPU)
    config = _config(reps=1, max_reps=1, warmup=0)
    results = sync.bench_workload(workload, config, 1 << 40, lambda _: None)
    assert {r.copies for r in results} == {sync.MAX_COPIES}


# Runs lookahead-bench in a fresh process and prints the growth of its resident memory from just
# before the run to the run's peak, then the run's own stdout. The peak is the process's own
# VmHWM: ru_maxrss would also count the memory of pytest, which the child was forked from.
_MEASURE_PEAK = """
import sys
from lookahead_cuda.bench.cli import main
def kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
before = kib("VmRSS")
main(sys.argv[1:])
print("GROWTH", (kib("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize(
    "argv",
    [["--impl", "fused"], ["--impl", "loop", "--momentum", "0.9"], ["--e2e", "--k", "1"]],
    ids=["sync", "momentum-loop", "e2e"],
)
def test_the_printed_memory_is_what_the_run_allocates(tmp_path, argv):
    # 64 MiB tensors: above glibc's largest mmap threshold, so every one is mapped and unmapped
    # and resident memory follows what the run holds.
    out = tmp_path / "run.json"
    run = ["--device", "cpu", "--tensors", "1", "--numel", str(1 << 24), "--reps", "1"]
    run += ["--max-reps", "1", "--warmup", "0", "--json", str(out), *argv]
    printed = subprocess.run(
        [sys.executable, "-c", _MEASURE_PEAK, *run], capture_output=True, text=True, check=True
    ).stdout
    (planned,) = (w["planned_bytes"] for w in json.loads(out.read_text())["memory"]["workloads"])
    assert f"memory: about {planned / 1e9:.1f} GB at the peak (custom;" in printed
    growth = int(re.search(r"GROWTH (\d+)", printed).group(1))
    assert 0.8 < growth / planned < 1.25, (growth, planned)


def test_the_readmes_say_what_the_default_run_needs():
    config = parse_args(["--device", "cpu"])
    peak = f"{max(memory.planned_bytes(preset, config) for preset in config.presets) / 1e9:.1f}"
    root = Path(__file__).resolve().parent.parent
    readme, bench_readme = (
        " ".join((folder / "README.md").read_text().split()) for folder in (root, root / "bench")
    )
    assert f"The default CPU run needs about {peak} GB" in readme
    assert f"({peak} GB for the default CPU run)" in bench_readme


def test_a_workload_that_does_not_fit_is_skipped(tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.json"
    argv = ["--device", "cpu", "--preset", "many-small", "--tensors", "2", "--numel", "1000"]
    argv += ["--reps", "1", "--impl", "fused", "--json", str(out)]
    # many-small needs 0.7 GB, the custom workload 0.2 GB (64 rotated copies, each with a floor).
    monkeypatch.setattr(memory, "available_bytes", lambda device: 400_000_000)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "; 0.4 GB available\nskipped many-small: it needs about 0.7 GB, more than" in printed
    report = json.loads(out.read_text())
    assert [(w["preset"], w["skipped"]) for w in report["memory"]["workloads"]] == [
        ("many-small", True),
        ("custom", False),
    ]
    assert {r["preset"] for r in report["results"]} == {"custom"}
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    assert main(argv) == 1
    assert "nothing to time: no workload fits the memory available" in capsys.readouterr().out
