"""``lookahead-bench``: its command line, and the run it starts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from lookahead_cuda.bench import e2e, floor, memory, sync
from lookahead_cuda.bench.config import DTYPES, BenchConfig, dtype_name
from lookahead_cuda.bench.impls import IMPLEMENTATIONS
from lookahead_cuda.bench.presets import PRESETS, Preset, custom_preset
from lookahead_cuda.bench.report import (
    describe_device,
    describe_floor,
    describe_memory,
    format_steps,
    format_table,
    plot,
)
from lookahead_cuda.ops import SUPPORTED_DTYPE_PAIRS
from lookahead_cuda.settings import ALPHA_RANGE, MOMENTUM_RANGE, alpha_in_range, momentum_in_range


def _parser() -> argparse.ArgumentParser:
    # Every help text states its default itself, once: argparse's ArgumentDefaultsHelpFormatter
    # appended a second "(default: None)" to the options whose default is worked out later.
    parser = argparse.ArgumentParser(
        prog="lookahead-bench",
        description="The fused Lookahead sync against torch's foreach ops and the per-parameter "
        "Python loop of most Lookahead wrappers, on real models' shapes, each against its "
        f"workload's memory floor. Floor: {floor.DESCRIPTION}. Spreads are the interquartile "
        "range of the rounds over their median; rows too noisy, of a workload whose floor was "
        "slowed, or below their floor are flagged, as the table explains. Before it allocates, "
        "a run prints the memory it needs and skips a workload that does not fit.",
    )
    parser.add_argument(
        "--preset",
        nargs="+",
        choices=sorted(PRESETS),
        help="workloads (default: every preset that fits the device; gpt2 with --e2e)",
    )
    parser.add_argument(
        "--tensors",
        type=int,
        help="a custom workload of this many tensors, each of --numel elements, timed after the "
        "presets given with --preset (default: no custom workload)",
    )
    parser.add_argument(
        "--numel",
        type=int,
        help="elements per tensor of the custom workload (default: no custom workload)",
    )
    parser.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--fast-dtype",
        choices=list(DTYPES),
        default="float32",
        help="parameter (fast weights) dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--slow-dtype",
        choices=list(DTYPES),
        help="slow weights dtype (default: the fast dtype)",
    )
    parser.add_argument(
        "--impl",
        nargs="+",
        choices=list(IMPLEMENTATIONS),
        default=list(IMPLEMENTATIONS),
        help="implementations to time; the floor is always timed with them (default: all)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="slow-weights step size; with --momentum above 0, the outer learning rate "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=0.0,
        help="outer momentum of the timed sync. 0: Lookahead's lerp (two lists, 4 passes over "
        "memory); above 0: SNOO's Nesterov step on the pseudo-gradient, over a third list of "
        "buffers (6 passes). With --e2e, the momentum of the SNOO rows, where 0 stands for "
        f"{e2e.DEFAULT_MOMENTUM} (DiLoCo's and SNOO's) (default: 0)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=10,
        help="timed rounds (one call of each implementation and the floor per round); the table "
        "gives their median and their interquartile range over the median (default: %(default)s)",
    )
    parser.add_argument(
        "--max-spread",
        type=float,
        default=20.0,
        metavar="PERCENT",
        help="while any row of a workload has an interquartile range over its median above this "
        "percentage, the workload gets one round more, up to --max-reps rounds in all; a row "
        "still above it is flagged noisy (default: %(default)g)",
    )
    parser.add_argument(
        "--max-reps",
        type=int,
        help="the most rounds a workload gets while it is too noisy (default: 3 x --reps)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed rounds before timing (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads, through torch.set_num_threads; on a machine other work shares, 1 "
        "waits for no second thread at each fork/join and times more steadily "
        "(default: torch's choice)",
    )
    parser.add_argument(
        "--misaligned",
        action="store_true",
        help="make every slow and fast tensor a view starting one element into a larger buffer, "
        "so that its data pointer is not 16-byte aligned (times the kernels' handling of "
        "misaligned starts; the floor's buffers stay aligned) (default: off, aligned tensors)",
    )
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="time an AdamW step with and without Lookahead, amortized over k, instead of the "
        "sync (default: off, the sync)",
    )
    parser.add_argument(
        "--k", type=int, default=5, help="Lookahead's k for --e2e (default: %(default)s)"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="write the results as JSON to FILE (default: no JSON)"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="bar chart of the results, with matplotlib (default: no plot)",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    parser = _parser()
    args = parser.parse_args(argv)

    if (args.tensors is None) != (args.numel is None):
        parser.error("--tensors and --numel go together (a custom workload of N tensors of M)")
    if args.tensors is not None and (args.tensors < 1 or args.numel < 1):
        parser.error("--tensors and --numel must be at least 1")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be at least 1 and --warmup at least 0")
    max_reps = 3 * args.reps if args.max_reps is None else args.max_reps
    if max_reps < args.reps:
        parser.error(f"--max-reps must be at least --reps ({args.reps}), got {max_reps}")
    if args.max_spread <= 0:
        parser.error(f"--max-spread must be above 0, got {args.max_spread}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.k < 1:
        parser.error("--k must be at least 1")
    if not alpha_in_range(args.alpha):
        parser.error(f"--alpha must be in {ALPHA_RANGE}, got {args.alpha}")
    if not momentum_in_range(args.momentum):
        parser.error(f"--momentum must be in {MOMENTUM_RANGE}, got {args.momentum}")
    if args.misaligned and args.e2e:
        parser.error("--misaligned places the sync benchmark's tensors; --e2e times a model's own")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {device}")
    fast_dtype = DTYPES[args.fast_dtype]
    slow_dtype = DTYPES[args.slow_dtype] if args.slow_dtype else fast_dtype
    if (slow_dtype, fast_dtype) not in SUPPORTED_DTYPE_PAIRS:
        pairs = ", ".join(f"{dtype_name(s)}/{dtype_name(f)}" for s, f in SUPPORTED_DTYPE_PAIRS)
        parser.error(
            f"unsupported --slow-dtype/--fast-dtype {dtype_name(slow_dtype)}/"
            f"{dtype_name(fast_dtype)}; supported: {pairs}"
        )
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'lookahead_cuda[plot]'")

    gpu = device.type == "cuda"
    presets: list[Preset]
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

    return BenchConfig(
        presets=tuple(presets),
        device=device,
        fast_dtype=fast_dtype,
        slow_dtype=slow_dtype,
        impls=tuple(args.impl),
        alpha=args.alpha,
        reps=args.reps,
        max_reps=max_reps,
        max_spread=args.max_spread / 100,
        warmup=args.warmup,
        threads=args.threads,
        e2e=args.e2e,
        k=args.k,
        momentum=args.momentum,
        misaligned=args.misaligned,
        json_path=args.json,
        plot_path=args.plot,
    )


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    device_text = describe_device(config.device)
    report: dict[str, Any] = {
        "device": device_text,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "alpha": config.alpha,
        "momentum": config.momentum,
        "reps": config.reps,
        "max_reps": config.max_reps,
        "max_spread": config.max_spread,
        "misaligned": config.misaligned,
        "results": [],
    }
    sync_text = f"alpha {config.alpha}" + (
        f", outer momentum {config.momentum} (SNOO)" if config.momentum > 0 else ""
    )
    print(f"lookahead-bench on {device_text}, torch {torch.__version__}, {sync_text}")
    needs = [(preset.name, memory.planned_bytes(preset, config)) for preset in config.presets]
    available = memory.available_bytes(config.device)
    print(describe_memory(needs, available))
    fits = [memory.fits(bytes_, available) for _, bytes_ in needs]
    report["memory"] = {
        "available_bytes": available,
        "workloads": [
            {"preset": name, "planned_bytes": bytes_, "skipped": not fit}
            for (name, bytes_), fit in zip(needs, fits)
        ],
    }
    config = dataclasses.replace(
        config, presets=tuple(p for p, fit in zip(config.presets, fits) if fit)
    )
    with torch.no_grad():
        if not config.presets:
            print("nothing to time: no workload fits the memory available")
        elif config.e2e:
            steps = e2e.run(config, progress)
            print(format_steps(steps, config.max_spread, config.max_reps))
            report["e2e"] = [asdict(r) for r in steps]
        else:
            run = sync.run(config, progress)
            print(describe_floor(run))
            if config.misaligned:
                print("tensors start one element into their buffers (not 16-byte aligned)")
            print(format_table(run.results, config.max_spread, config.max_reps))
            report["floor"] = {
                "description": floor.DESCRIPTION,
                "copy": run.floor_copy,
                "rotation_bytes": run.rotation_bytes,
            }
            report["results"] = [asdict(r) for r in run.results]
            if config.plot_path:
                plot(run.results, config.plot_path, f"Lookahead sync on {device_text}")
                print(f"plot written to {config.plot_path}")
    if config.json_path:
        with open(config.json_path, "w") as out:
            json.dump(report, out, indent=2)
        print(f"results written to {config.json_path}")
    return 0 if config.presets else 1
