"""``lookahead-bench``: the fused Lookahead update against torch's foreach ops, the per-parameter
Python loop of most Lookahead wrappers, and the memory-bandwidth floor, on real models' shapes."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lookahead_cuda import Lookahead, lookahead_update_
from lookahead_cuda.bench.presets import PRESETS, Preset, custom_preset
from lookahead_cuda.bench.timing import (
    copy_bandwidth,
    last_level_cache_bytes,
    measure_interleaved,
)
from lookahead_cuda.ops import SUPPORTED_DTYPE_PAIRS, foreach_update_

IMPLS = ("fused", "foreach", "loop")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# A workload smaller than this many times the last-level cache is timed on several copies of its
# tensors in turn, so that it is timed from memory rather than from cache.
CACHE_MULTIPLE = 4
MAX_COPIES = 64
CHECK_NUMEL = 1 << 28

TensorLists = tuple[list[torch.Tensor], list[torch.Tensor]]


def loop_update_(slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float) -> None:
    """The per-parameter update of most public Lookahead wrappers."""
    for s, f in zip(slow, fast):
        s.add_(f - s, alpha=alpha)
        f.copy_(s)


UPDATES: dict[str, Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], float], None]] = {
    "fused": lookahead_update_,
    "foreach": foreach_update_,
    "loop": loop_update_,
}


@dataclass
class Result:
    preset: str
    impl: str
    fast_dtype: str
    slow_dtype: str
    numel: int
    tensors: int
    median_ms: float
    spread: float
    gbps: float
    ratio_to_floor: float


@dataclass
class StepResult:
    preset: str
    optimizer: str
    k: int
    step_ms: float
    lookahead_step_ms: float
    overhead_ms: float
    overhead_pct: float


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lookahead-bench",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        nargs="+",
        choices=sorted(PRESETS),
        default=None,
        help="workloads (default: all that fit the device; gpt2 with --e2e)",
    )
    parser.add_argument("--tensors", type=int, help="custom workload: number of tensors")
    parser.add_argument("--numel", type=int, help="custom workload: elements per tensor")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--fast-dtype",
        choices=list(DTYPES),
        default="float32",
        help="parameter (fast weights) dtype",
    )
    parser.add_argument(
        "--slow-dtype",
        choices=list(DTYPES),
        default=None,
        help="slow weights dtype (default: the fast dtype)",
    )
    parser.add_argument(
        "--impl",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        help="implementations to time (the floor is always reported)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="slow-weights step size")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads; default: torch's choice)",
    )
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="time an AdamW step with and without Lookahead, amortized over k",
    )
    parser.add_argument("--k", type=int, default=5, help="Lookahead's k for --e2e")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="bar chart of the results (matplotlib)")
    args = parser.parse_args(argv)

    if (args.tensors is None) != (args.numel is None):
        parser.error("--tensors and --numel go together (a custom workload of N tensors of M)")
    if args.tensors is not None and (args.tensors < 1 or args.numel < 1):
        parser.error("--tensors and --numel must be at least 1")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be at least 1 and --warmup at least 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.k < 1:
        parser.error("--k must be at least 1")
    if not 0.0 < args.alpha <= 1.0:
        parser.error(f"--alpha must be in (0, 1], got {args.alpha}")
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    args.fast_dtype = DTYPES[args.fast_dtype]
    args.slow_dtype = DTYPES[args.slow_dtype] if args.slow_dtype else args.fast_dtype
    if (args.slow_dtype, args.fast_dtype) not in SUPPORTED_DTYPE_PAIRS:
        pairs = ", ".join(f"{dtype_name(s)}/{dtype_name(f)}" for s, f in SUPPORTED_DTYPE_PAIRS)
        parser.error(
            f"unsupported --slow-dtype/--fast-dtype {dtype_name(args.slow_dtype)}/"
            f"{dtype_name(args.fast_dtype)}; supported: {pairs}"
        )
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'lookahead_cuda[plot]'")

    gpu = args.device.type == "cuda"
    if args.preset is not None:
        for name in args.preset:
            if PRESETS[name].gpu_only and not gpu:
                parser.error(f"preset {name} needs a GPU (its tensors do not fit a CPU run)")
        presets = [PRESETS[name] for name in args.preset]
    elif args.tensors is not None:
        presets = []
    elif args.e2e:
        presets = [PRESETS["gpt2"]]
    else:
        presets = [p for p in PRESETS.values() if gpu or not p.gpu_only]
    if args.tensors is not None:
        presets.append(custom_preset(args.tensors, args.numel))
    args.presets = presets
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_lists(preset: Preset, args: argparse.Namespace) -> TensorLists:
    def random(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, device=args.device, dtype=dtype)

    slow = [random(shape, args.slow_dtype) for shape in preset.shapes]
    fast = [random(shape, args.fast_dtype) for shape in preset.shapes]
    return slow, fast


def working_sets(preset: Preset, args: argparse.Namespace, bytes_per_set: int) -> list[TensorLists]:
    copies = min(MAX_COPIES, max(1, math.ceil(args.min_working_set / max(bytes_per_set, 1))))
    return [make_lists(preset, args) for _ in range(copies)]


def check_against_torch(preset: Preset, args: argparse.Namespace) -> None:
    """Before timing: every implementation gives torch's result on this workload's shapes (the
    fused op bitwise; the loop's formula rounds differently, so to within the dtype's precision).
    The check takes the workload's leading tensors up to CHECK_NUMEL elements, so that it fits
    beside a 7B model's tensors on the device."""
    shapes, numel = [], 0
    for shape in preset.shapes:
        if shapes and numel + math.prod(shape) > CHECK_NUMEL:
            break
        shapes.append(shape)
        numel += math.prod(shape)
    reference = make_lists(Preset(preset.name, preset.description, tuple(shapes)), args)
    expected = tuple([t.clone() for t in ts] for ts in reference)
    for s, f in zip(*expected):
        s.lerp_(f.to(s.dtype), args.alpha)
        f.copy_(s)
    # The loop rounds s + a(f - s) where torch rounds f - (1 - a)(f - s): a few ulps of the inputs
    # (randn, so of magnitude up to ~5) apart.
    eps = torch.finfo(args.fast_dtype).eps
    for impl in args.impl:
        slow, fast = ([t.clone() for t in ts] for ts in reference)
        UPDATES[impl](slow, fast, args.alpha)
        for got, want in zip(slow + fast, expected[0] + expected[1]):
            if impl == "loop":
                same = torch.allclose(got, want.to(got.dtype), rtol=4 * eps, atol=16 * eps)
            else:
                same = torch.equal(got, want)
            if not same:
                raise AssertionError(f"{impl} disagrees with torch on {preset.name}")


def bench_preset(preset: Preset, args: argparse.Namespace, bandwidth: float) -> list[Result]:
    itemsizes = args.slow_dtype.itemsize + args.fast_dtype.itemsize
    bytes_moved = 2 * preset.numel * itemsizes  # each element: read both, write both
    # The timed tensors are allocated first, as a model's parameters are, before the check's
    # temporaries come and go: where the allocator places slow and fast relative to each other
    # changes how fast memory streams them.
    sets = working_sets(preset, args, preset.numel * itemsizes)
    check_against_torch(preset, args)
    floor = bytes_moved / bandwidth

    def result(impl: str, median: float, spread: float) -> Result:
        return Result(
            preset.name,
            impl,
            dtype_name(args.fast_dtype),
            dtype_name(args.slow_dtype),
            preset.numel,
            len(preset.shapes),
            median * 1e3,
            spread,
            bytes_moved / median / 1e9,
            median / floor,
        )

    copies = f", rotating {len(sets)} copies of the tensors" if len(sets) > 1 else ""
    progress(f"  {preset.name}: {', '.join(args.impl)}, {args.reps} rounds{copies}")
    # Consecutive calls, whichever implementation makes them, take the next copy in turn, so none
    # runs on tensors the call before it has just left in cache.
    next_set = itertools.cycle(sets)
    timings = measure_interleaved(
        {
            impl: (lambda update=UPDATES[impl]: update(*next(next_set), args.alpha))
            for impl in args.impl
        },
        args.device,
        args.reps,
        args.warmup,
    )
    results = [result(impl, t.median, t.spread) for impl, t in timings.items()]
    results.append(result("floor", floor, 0.0))
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


def bench_step(preset: Preset, args: argparse.Namespace) -> list[StepResult]:
    """AdamW's step time with and without Lookahead around it, Lookahead amortized over k steps
    (k - 1 plain steps and one that syncs). On CUDA also with capturable AdamW and Lookahead, run
    eagerly and replayed from a CUDA graph of one step (the sync decided on the device)."""
    params = [
        torch.randn(shape, device=args.device, dtype=args.fast_dtype, requires_grad=True)
        for shape in preset.shapes
    ]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    slow_dtype = args.slow_dtype if args.slow_dtype != args.fast_dtype else None
    # (label, AdamW arguments, Lookahead arguments, replayed from a CUDA graph)
    variants: list[tuple[str, dict[str, bool], dict[str, bool], bool]] = [
        ("AdamW(foreach=True)", {"foreach": True}, {}, False),
        ("AdamW(fused=True)", {"fused": True}, {}, False),
    ]
    if args.device.type == "cuda":
        capturable = {"foreach": True, "capturable": True}
        variants += [
            ("AdamW(capturable), eager", capturable, {"capturable": True}, False),
            ("AdamW(capturable), graph", capturable, {"capturable": True}, True),
        ]
    results = []
    for label, adamw, lookahead, graph in variants:
        inner = torch.optim.AdamW(params, lr=1e-4, **adamw)
        wrapped_inner = torch.optim.AdamW(params, lr=1e-4, **adamw)
        wrapped = Lookahead(wrapped_inner, k=args.k, slow_dtype=slow_dtype, **lookahead)
        progress(f"  {preset.name}: {label} step, with and without Lookahead")
        wrapped.step()  # takes the slow weights, outside the timing
        plain_step, lookahead_step = inner.step, wrapped.step
        if graph:
            plain_step, lookahead_step = _replayed(inner.step), _replayed(wrapped.step)
        # k steps of each per round, interleaved: Lookahead's k includes exactly one sync.
        timings = measure_interleaved(
            {
                "plain": lambda step=plain_step: [step() for _ in range(args.k)],
                "lookahead": lambda step=lookahead_step: [step() for _ in range(args.k)],
            },
            args.device,
            args.reps,
            min(args.warmup, 1),
        )
        plain, cycle = timings["plain"], timings["lookahead"]
        step_ms, lookahead_ms = plain.median / args.k * 1e3, cycle.median / args.k * 1e3
        results.append(
            StepResult(
                preset.name,
                label,
                args.k,
                step_ms,
                lookahead_ms,
                lookahead_ms - step_ms,
                100 * (lookahead_ms - step_ms) / step_ms,
            )
        )
    return results


def format_table(results: list[Result]) -> str:
    header = (
        f"{'preset':<15}{'impl':<9}{'slow/fast':<19}{'tensors':>8}{'elements':>10}"
        f"{'median ms':>11}{'spread':>8}{'GB/s':>8}{'x floor':>9}{'vs foreach':>11}"
        f"{'vs loop':>9}"
    )
    lines = [header, "-" * len(header)]
    by_key = {(r.preset, r.impl): r for r in results}
    for r in results:

        def speedup(baseline: str, r: Result = r) -> str:
            other = by_key.get((r.preset, baseline))
            if r.impl == "floor" or other is None:
                return ""
            return f"{other.median_ms / r.median_ms:.2f}x"

        lines.append(
            f"{r.preset:<15}{r.impl:<9}{r.slow_dtype + '/' + r.fast_dtype:<19}{r.tensors:>8}"
            f"{r.numel / 1e6:>9.1f}M{r.median_ms:>11.3f}{100 * r.spread:>7.1f}%{r.gbps:>8.1f}"
            f"{r.ratio_to_floor:>9.2f}{speedup('foreach'):>11}{speedup('loop'):>9}"
        )
    return "\n".join(lines)


def format_steps(results: list[StepResult]) -> str:
    header = (
        f"{'preset':<15}{'inner optimizer':<26}{'k':>3}{'step ms':>10}"
        f"{'+Lookahead ms':>15}{'overhead ms':>13}{'overhead':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.preset:<15}{r.optimizer:<26}{r.k:>3}{r.step_ms:>10.2f}{r.lookahead_step_ms:>15.2f}"
            f"{r.overhead_ms:>13.2f}{r.overhead_pct:>9.1f}%"
        )
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
    axes.set_ylabel("time / memory floor (lower is better)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device_text = describe_device(args.device)
    report: dict[str, Any] = {
        "device": device_text,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": [],
    }
    print(f"lookahead-bench on {device_text}, torch {torch.__version__}, alpha {args.alpha}")
    with torch.no_grad():
        if args.e2e:
            steps = []
            for preset in args.presets:
                steps += bench_step(preset, args)
            print(format_steps(steps))
            report["e2e"] = [asdict(r) for r in steps]
        else:
            args.min_working_set = CACHE_MULTIPLE * last_level_cache_bytes(args.device)
            progress("measuring the copy bandwidth")
            bandwidth, copy_name = copy_bandwidth(args.device, args.min_working_set, args.reps)
            print(
                f"memory floor: {bandwidth / 1e9:.1f} GB/s ({copy_name}, read + write); "
                f"workloads under {args.min_working_set >> 20} MiB rotate through copies"
            )
            results: list[Result] = []
            for index, preset in enumerate(args.presets, 1):
                progress(f"[{index}/{len(args.presets)}] {preset.name}: {preset.description}")
                results += bench_preset(preset, args, bandwidth)
            print(format_table(results))
            report["floor"] = {"gbps": bandwidth / 1e9, "copy": copy_name}
            report["results"] = [asdict(r) for r in results]
            if args.plot:
                plot(results, args.plot, f"Lookahead sync on {device_text}")
                print(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"results written to {args.json}")
    return 0
