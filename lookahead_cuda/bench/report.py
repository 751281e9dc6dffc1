"""The benchmark's results as text tables and as a bar chart."""

from __future__ import annotations

import torch

from lookahead_cuda.bench.e2e import StepResult
from lookahead_cuda.bench.sync import FLOOR, Result, SyncRun


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def describe_floor(run: SyncRun) -> str:
    return (
        f"floor: {run.floor_copy} of each workload's bytes (read + write), timed in the same rounds"
        f"; workloads under {run.rotation_bytes >> 20} MiB rotate through copies"
    )


def format_table(results: list[Result]) -> str:
    """One row per implementation and workload. ``IQR/med`` is the interquartile range of the
    repetitions over their median; ``x floor`` is the median over the workload's own floor."""
    header = (
        f"{'preset':<15}{'impl':<9}{'slow/fast':<19}{'tensors':>8}{'elements':>10}"
        f"{'median ms':>11}{'IQR/med':>9}{'GB/s':>8}{'x floor':>9}{'vs foreach':>11}"
        f"{'vs loop':>9}"
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
            f"{r.numel / 1e6:>9.1f}M{r.median_ms:>11.3f}{100 * r.spread:>8.1f}%{r.gbps:>8.1f}"
            f"{r.ratio_to_floor:>9.2f}{speedup('foreach'):>11}{speedup('loop'):>9}"
        )
    return "\n".join(lines)


def format_steps(results: list[StepResult]) -> str:
    header = (
        f"{'preset':<15}{'inner optimizer':<26}{'k':>3}{'step ms':>10}"
        f"{'+Lookahead ms':>15}{'overhead':>16}{'+SNOO ms':>10}{'overhead':>16}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lookahead = f"{r.overhead_ms:.2f} ({r.overhead_pct:.1f}%)"
        snoo = f"{r.snoo_overhead_ms:.2f} ({r.snoo_overhead_pct:.1f}%)"
        lines.append(
            f"{r.preset:<15}{r.optimizer:<26}{r.k:>3}{r.step_ms:>10.2f}{r.lookahead_step_ms:>15.2f}"
            f"{lookahead:>16}{r.snoo_step_ms:>10.2f}{snoo:>16}"
        )
    if results:
        lines.append(f"SNOO: outer momentum {results[0].momentum}, outer learning rate 0.7")
    return "\n".join(lines)


def plot(results: list[Result], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r.preset for r in results))
    impls = list(dict.fromkeys(r.impl for r in results))
    width = 0.8 / len(impls)
    figure, axes = plt.subplots(figsize=(max(6, 1.8 * len(presets)), 4))
    for i, impl in enumerate(impls):
        xs, heights = [], []
        for j, preset in enumerate(presets):
            match = [r for r in results if r.preset == preset and r.impl == impl]
            if match:
                xs.append(j + (i - (len(impls) - 1) / 2) * width)
                heights.append(match[0].ratio_to_floor)
        axes.bar(xs, heights, width, label=impl)
    axes.set_xticks(range(len(presets)), presets)
    axes.set_ylabel("time / the workload's memory floor (lower is better)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
