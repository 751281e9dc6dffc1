"""The benchmark's results as text tables and as a bar chart."""

from __future__ import annotations

import torch

from lookahead_cuda.bench import floor, memory
from lookahead_cuda.bench.e2e import StepResult
from lookahead_cuda.bench.sync import BELOW_FLOOR, BELOW_FLOOR_RATIO, BUSY, FLOOR, Result, SyncRun
from lookahead_cuda.bench.timing import NOISY


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    plural = "" if threads == 1 else "s"
    return f"cpu ({threads} thread{plural}, {torch.backends.cpu.get_cpu_capability()})"


def format_bytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.0f} MB"


def describe_memory(needs: list[tuple[str, int]], available: int | None) -> str:
    """The run's peak memory (the largest workload's: they are allocated and freed in turn), what
    the device has, and the workloads skipped for want of it."""
    name, peak = max(needs, key=lambda need: need[1])
    have = "an unknown amount" if available is None else format_bytes(available)
    lines = [
        f"memory: about {format_bytes(peak)} at the peak ({name}; workloads are allocated and "
        f"freed one after another); {have} available"
    ]
    lines += [
        f"skipped {skipped}: it needs about {format_bytes(bytes_)}, more than is available"
        for skipped, bytes_ in needs
        if not memory.fits(bytes_, available)
    ]
    return "\n".join(lines)


def describe_floor(run: SyncRun) -> str:
    return (
        f"floor: {floor.DESCRIPTION}\n"
        f"workloads under {run.rotation_bytes >> 20} MiB rotate through copies of their tensors "
        "(and of the floor's buffers), so that they are timed from memory, not cache"
    )


def legend(flags: set[str], max_spread: float, max_reps: int) -> list[str]:
    """What each flag in a table's ``flags`` column means, for the flags it shows."""
    meaning = {
        NOISY: f"{NOISY}: IQR/med still above {100 * max_spread:g}% after up to {max_reps} rounds "
        "(other work on the machine slowed some of them): the row's times and ratios are not to "
        "be trusted; rerun on a quieter machine or with more --reps",
        BUSY: f"{BUSY}: the floor's median is more than {100 * max_spread:g}% above its fastest "
        "round (half its rounds or more ran that much slower: the machine was busy), so every "
        "x floor of the workload is inflated by as much; rerun on a quieter machine",
        BELOW_FLOOR: f"{BELOW_FLOOR}: median under {BELOW_FLOOR_RATIO} x the floor, the fastest "
        "the machine moved the same bytes in the same rounds, which no sync can beat: a "
        "measurement error, not a result",
    }
    return [text for flag, text in meaning.items() if flag in flags]


def format_table(results: list[Result], max_spread: float, max_reps: int) -> str:
    """One row per implementation and workload. ``IQR/med`` is the interquartile range of the
    rounds over their median; ``best ms`` the fastest round (the floor row's is the floor);
    ``x floor`` the median over the workload's own floor; ``flags`` say why a row is not to be
    trusted, explained under the table."""
    header = (
        f"{'preset':<15}{'impl':<9}{'slow/fast':<19}{'tensors':>8}{'elements':>10}{'rounds':>7}"
        f"{'median ms':>11}{'IQR/med':>9}{'best ms':>11}{'GB/s':>8}{'x floor':>9}"
        f"{'vs foreach':>11}{'vs loop':>9}  flags"
    )
    lines = [header, "-" * len(header)]
    by_key = {(r.preset, r.impl): r for r in results}
    for r in results:

        def speedup(baseline: str, r: Result = r) -> str:
            other = by_key.get((r.preset, baseline))
            if r.impl == FLOOR or other is None:
                return ""
            return f"{other.median_ms / r.median_ms:.2f}x"

        lines.append(
            f"{r.preset:<15}{r.impl:<9}{r.slow_dtype + '/' + r.fast_dtype:<19}{r.tensors:>8}"
            f"{r.numel / 1e6:>9.1f}M{r.rounds:>7}{r.median_ms:>11.3f}{100 * r.spread:>8.1f}%"
            f"{r.best_ms:>11.3f}{r.gbps:>8.1f}{r.ratio_to_floor:>9.2f}{speedup('foreach'):>11}"
            f"{speedup('loop'):>9}"
            f"  {', '.join(r.flags)}".rstrip()
        )
    lines += legend({flag for r in results for flag in r.flags}, max_spread, max_reps)
    return "\n".join(lines)


def format_steps(results: list[StepResult], max_spread: float, max_reps: int) -> str:
    """One row per inner optimizer; ``IQR/med`` is the largest of its three step times'."""
    header = (
        f"{'preset':<15}{'inner optimizer':<26}{'k':>3}{'rounds':>7}{'step ms':>10}"
        f"{'+Lookahead ms':>15}{'overhead':>16}{'+SNOO ms':>10}{'overhead':>16}{'IQR/med':>9}"
        "  flags"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lookahead = f"{r.overhead_ms:.2f} ({r.overhead_pct:.1f}%)"
        snoo = f"{r.snoo_overhead_ms:.2f} ({r.snoo_overhead_pct:.1f}%)"
        lines.append(
            f"{r.preset:<15}{r.optimizer:<26}{r.k:>3}{r.rounds:>7}{r.step_ms:>10.2f}"
            f"{r.lookahead_step_ms:>15.2f}{lookahead:>16}{r.snoo_step_ms:>10.2f}{snoo:>16}"
            f"{100 * r.spread:>8.1f}%  {', '.join(r.flags)}".rstrip()
        )
    if results:
        lines.append(f"SNOO: outer momentum {results[0].momentum}, outer learning rate 0.7")
    lines += legend({flag for r in results for flag in r.flags}, max_spread, max_reps)
    return "\n".join(lines)


def error_bar(r: Result) -> tuple[float, float]:
    """How far the row's first and third quartiles lie below and above its median, in its
    ``x floor`` units: the spread the plot draws around each bar."""
    per_ms = r.ratio_to_floor / r.median_ms
    return (r.median_ms - r.q1_ms) * per_ms, (r.q3_ms - r.median_ms) * per_ms


def plot(results: list[Result], path: str, title: str) -> None:
    """A bar per row, its median over the workload's floor, with an error bar over the quartiles
    of its rounds; flagged rows hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    presets = list(dict.fromkeys(r.preset for r in results))
    impls = list(dict.fromkeys(r.impl for r in results))
    width = 0.8 / len(impls)
    figure, axes = plt.subplots(figsize=(max(6, 1.8 * len(presets)), 4))
    # The legend's swatches are plain: a hatched one would say that impl is flagged everywhere.
    swatches = []
    for i, impl in enumerate(impls):
        rows = [
            (j, r)
            for j, p in enumerate(presets)
            for r in results
            if (r.preset, r.impl) == (p, impl)
        ]
        xs = [j + (i - (len(impls) - 1) / 2) * width for j, _ in rows]
        bars = axes.bar(
            xs,
            [r.ratio_to_floor for _, r in rows],
            width,
            yerr=list(zip(*(error_bar(r) for _, r in rows))),
            capsize=3,
        )
        swatches.append(Patch(facecolor=bars.patches[0].get_facecolor(), label=impl))
        for bar, (_, r) in zip(bars, rows):
            if r.flags:
                bar.set_hatch("//")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(presets)), presets)
    axes.set_ylabel("median time / the workload's floor\n(error bars: quartiles; hatched: flagged)")
    axes.set_title(title)
    axes.legend(handles=swatches)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
