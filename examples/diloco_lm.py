"""DiLoCo against DDP at matched samples seen, on snoo_lm.py's byte-level language model: each run
is `torchrun examples/diloco_train.py` on this machine's CPU (gloo), one worker per process.

    python examples/diloco_lm.py [--workers 2]    # writes examples/diloco_lm.png

Plots the validation loss (DiLoCo's on its slow weights) against the samples all workers have
seen, and prints the bytes each worker sent per optimizer step: DDP all-reduces every gradient at
every step, DiLoCo all-reduces the weights (fp32) or the pseudo-gradients (bf16) every k steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from common import EXAMPLES, save_figure

TRAIN = EXAMPLES / "diloco_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workers: int, steps: int, k: int, eval_every: int, extra: Sequence[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(workers),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            str(TRAIN),
            "--steps",
            str(steps),
            "--k",
            str(k),
            "--eval-every",
            str(eval_every),
            "--out",
            str(out),
            *extra,
        ]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if finished.returncode != 0 or not out.exists():
            sys.exit(f"{' '.join(command)} failed:\n{finished.stdout}\n{finished.stderr}")
        print(finished.stdout.strip().splitlines()[-1])
        return json.loads(out.read_text())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run, to check the example")
    parser.add_argument("--out", type=Path, default=EXAMPLES, help="folder for the PNG")
    parser.add_argument("--workers", type=int, default=2, help="processes (2-4 here)")
    args = parser.parse_args(argv)
    steps, ks, eval_every = (6, (2, 3), 3) if args.quick else (600, (10, 30), 60)
    runs = {"DDP": run(args.workers, steps, 1, eval_every, ["--mode", "ddp"])}
    for k in ks:
        runs[f"DiLoCo, k={k}"] = run(args.workers, steps, k, eval_every, ["--mode", "diloco"])
    k = ks[-1]
    runs[f"DiLoCo, k={k}, bf16 pseudo-gradients"] = run(
        args.workers,
        steps,
        k,
        eval_every,
        ["--mode", "diloco", "--pseudo-gradient-dtype", "bfloat16"],
    )
    ddp_bytes = runs["DDP"]["bytes_per_step"]
    print(f"{'run':<38}{'final loss':>11}{'bytes/step/worker':>19}{'vs DDP':>9}{'seconds':>9}")
    for name, result in runs.items():
        ratio = ddp_bytes / result["bytes_per_step"] if result["bytes_per_step"] else float("inf")
        print(
            f"{name:<38}{result['curve']['validation'][-1]:>11.4f}"
            f"{result['bytes_per_step']:>19,.0f}{ratio:>8.1f}x{result['seconds']:>9.0f}"
        )
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, result in runs.items():
        samples = [s * result["samples"] / result["steps"] for s in result["curve"]["steps"]]
        axes.plot(samples, result["curve"]["validation"], marker=".", label=name)
    axes.set_xlabel(f"samples seen by all {args.workers} workers")
    axes.set_ylabel("validation loss (nats/byte)")
    axes.legend()
    save_figure(
        figure,
        args.out,
        "diloco_lm.png",
        f"DiLoCo vs DDP, {args.workers} CPU workers, {runs['DDP']['parameters'] / 1e3:.0f}k "
        "parameters",
    )


if __name__ == "__main__":
    main()
