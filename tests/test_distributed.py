"""Lookahead on torch.distributed: 2 gloo processes on the CPU (loopback only) against a
single-process run on the same global batches, for DDP, FSDP2, ZeroRedundancyOptimizer, and
distributed checkpoints. The processes run tests/distributed_worker.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_worker import LR, STEPS, K, global_batches, make_model
from torch import nn

from lookahead_cuda import Lookahead

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)
WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(scenario: str, out: Path, world: int = WORLD, worker: Path = WORKER) -> list[dict]:
    """Runs ``worker SCENARIO OUT`` in ``world`` processes; returns what each one wrote."""
    env = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, str(worker), scenario, str(out)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for worker in workers:
            worker.kill()
    # Judged by the results each process wrote, not by exit codes (see the worker's docstring).
    results = []
    for rank in range(world):
        path = out / f"{scenario}-{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no result:\n" + "\n".join(logs)
        results.append(torch.load(path, weights_only=True))
    return results


def single_process_run(inner_class=torch.optim.Adam) -> tuple[nn.Module, Lookahead]:
    model = make_model()
    opt = Lookahead(inner_class(model.parameters(), lr=LR), k=K)
    for x, y in global_batches(STEPS, WORLD):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def assert_close_to_single_process(result: dict) -> None:
    model, opt = single_process_run()
    # The processes average gradients of their halves of each batch, a single process takes the
    # mean over the whole batch: the same sum in another order, so float64 results agree to
    # rounding, not bitwise.
    for got, p in zip(result["fast"], model.parameters()):
        torch.testing.assert_close(got, p.detach(), rtol=1e-12, atol=1e-12)
    for got, p in zip(result["slow"], model.parameters()):
        torch.testing.assert_close(
            got, opt.lookahead_state[p]["slow_param"], rtol=1e-12, atol=1e-12
        )
    moved = [not torch.equal(s, f) for s, f in zip(result["slow"], result["fast"])]
    assert any(moved), "the run should end between two syncs"


@pytest.mark.parametrize("scenario", ["ddp", "fsdp", "zero"])
def test_matches_a_single_process(scenario, tmp_path):
    results = run_workers(scenario, tmp_path)
    for rank_result in results[1:]:
        for a, b in zip(
            rank_result["fast"] + rank_result["slow"], results[0]["fast"] + results[0]["slow"]
        ):
            assert torch.equal(a, b)
    assert_close_to_single_process(results[0])
    if scenario == "fsdp":
        # Slow weights sharded like the parameters: each process holds half of every tensor.
        model = make_model()
        assert set(results[0]["slow_types"]) == {"DTensor"}
        for result in results:
            halves = [(p.shape[0] + 1) // 2 * p[0].numel() for p in model.parameters()]
            assert result["local_numel"] <= halves and sum(result["local_numel"]) > 0


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_distributed_checkpoint_resumes_exactly(kind, tmp_path):
    for result in run_workers(f"resume-{kind}", tmp_path):
        assert result["counter_at_load"] == 7 % K
        for a, b in zip(
            result["resumed"]["fast"] + result["resumed"]["slow"],
            result["straight"]["fast"] + result["straight"]["slow"],
        ):
            assert torch.equal(a, b)


def test_divergence_guard_agrees_across_shards(tmp_path):
    for result in run_workers("restore-fsdp", tmp_path):
        assert result["restores"] == 1 and result["restored"]
        # No sync before this one: the slow weights, and now the parameters, are the initial ones.
        for fast, initial in zip(result["fast"], result["initial"]):
            assert torch.equal(fast, initial)


@pytest.mark.parametrize("mode", [[], ["--fsdp"]])
def test_torchrun_example(mode):
    """The README's torchrun command, at 10 steps."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(WORKER.parent.parent / "examples" / "distributed_train.py"),
        "--steps",
        "10",
        *mode,
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    # Judged by what rank 0 printed at the very end, for the reason in distributed_worker.py.
    assert "step 10: loss" in run.stdout, run.stdout + run.stderr
    assert "checkpoint saved and loaded back" in run.stdout, run.stdout + run.stderr
