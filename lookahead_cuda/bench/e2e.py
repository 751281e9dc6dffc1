"""The end-to-end benchmark (``--e2e``): an AdamW step alone, inside Lookahead, and inside SNOO
(Lookahead with outer momentum), the sync amortized over the k steps between two syncs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lookahead_cuda import Lookahead
from lookahead_cuda.bench.config import BenchConfig
from lookahead_cuda.bench.presets import Preset
from lookahead_cuda.bench.timing import NOISY, measure_interleaved

# The outer momentum of the SNOO rows when --momentum does not give one: DiLoCo's and SNOO's.
DEFAULT_MOMENTUM = 0.9


@dataclass
class StepResult:
    preset: str
    optimizer: str
    k: int
    step_ms: float
    lookahead_step_ms: float
    overhead_ms: float
    overhead_pct: float
    momentum: float
    snoo_step_ms: float
    snoo_overhead_ms: float
    snoo_overhead_pct: float
    rounds: int
    #: The largest interquartile range over the median of the three step times.
    spread: float
    #: NOISY when that spread is above the run's --max-spread after the last round.
    flags: list[str]


def planned_bytes(preset: Preset, config: BenchConfig) -> int:
    """The most memory :func:`bench_step` holds at once, known before it allocates any: the
    parameters and their gradients, three AdamW (alone, in Lookahead, in SNOO) with two moments
    each, a foreach step's temporaries (a tensor per parameter), Lookahead's and SNOO's slow
    copies and SNOO's momentum buffers. One inner optimizer's set is freed before the next's is
    made."""
    fast = preset.numel * config.fast_dtype.itemsize
    slow = preset.numel * config.slow_dtype.itemsize
    return (2 + 3 * 2 + 1) * fast + 3 * slow


def run(config: BenchConfig, progress: Callable[[str], None]) -> list[StepResult]:
    results: list[StepResult] = []
    for preset in config.presets:
        results += bench_step(preset, config, progress)
    return results


def _replayed(step: Callable[[], Any]) -> Callable[[], None]:
    """step captured once in a CUDA graph (after warm-up on a side stream, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def bench_step(
    preset: Preset, config: BenchConfig, progress: Callable[[str], None]
) -> list[StepResult]:
    """AdamW's step time alone, inside Lookahead and inside SNOO, the wrappers amortized over k
    steps (k - 1 plain steps and one that syncs). On CUDA also with capturable AdamW and
    Lookahead, run eagerly and replayed from a CUDA graph of one step (the sync decided on the
    device)."""
    params = [
        torch.randn(shape, device=config.device, dtype=config.fast_dtype, requires_grad=True)
        for shape in preset.shapes
    ]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    slow_dtype = config.slow_dtype if config.slow_dtype != config.fast_dtype else None
    # (label, AdamW arguments, Lookahead arguments, replayed from a CUDA graph)
    variants: list[tuple[str, dict[str, bool], dict[str, bool], bool]] = [
        ("AdamW(foreach=True)", {"foreach": True}, {}, False),
        ("AdamW(fused=True)", {"fused": True}, {}, False),
    ]
    if config.device.type == "cuda":
        capturable = {"foreach": True, "capturable": True}
        variants += [
            ("AdamW(capturable), eager", capturable, {"capturable": True}, False),
            ("AdamW(capturable), graph", capturable, {"capturable": True}, True),
        ]
    k = config.k
    momentum = config.momentum or DEFAULT_MOMENTUM
    results = []
    for label, adamw, lookahead, graph in variants:
        plain = torch.optim.AdamW(params, lr=1e-4, **adamw)
        steps: dict[str, Callable[[], Any]] = {"plain": plain.step}
        for name, outer in (("lookahead", {}), ("snoo", {"momentum": momentum, "alpha": 0.7})):
            wrapped = Lookahead(
                torch.optim.AdamW(params, lr=1e-4, **adamw),
                k=k,
                slow_dtype=slow_dtype,
                **lookahead,
                **outer,
            )
            wrapped.step()  # takes the slow weights (and makes SNOO's buffers), outside the timing
            steps[name] = wrapped.step
        progress(f"  {preset.name}: {label} step, alone, in Lookahead and in SNOO")
        if graph:
            steps = {name: _replayed(step) for name, step in steps.items()}
        # k steps of each per round, interleaved: the wrappers' k include exactly one sync.
        timings = measure_interleaved(
            {name: lambda step=step: [step() for _ in range(k)] for name, step in steps.items()},
            config.device,
            config.rounds,
            min(config.warmup, 1),
        )
        step_ms, lookahead_ms, snoo_ms = (
            timings[name].median / k * 1e3 for name in ("plain", "lookahead", "snoo")
        )
        spread = max(timing.spread for timing in timings.values())
        results.append(
            StepResult(
                preset.name,
                label,
                k,
                step_ms,
                lookahead_ms,
                lookahead_ms - step_ms,
                100 * (lookahead_ms - step_ms) / step_ms,
                momentum,
                snoo_ms,
                snoo_ms - step_ms,
                100 * (snoo_ms - step_ms) / step_ms,
                len(timings["plain"].samples),
                spread,
                [NOISY] if spread > config.max_spread else [],
            )
        )
    return results
