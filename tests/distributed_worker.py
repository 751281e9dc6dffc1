"""One process of the multi-process tests in test_distributed.py (not a test module itself).

Run as `python distributed_worker.py SCENARIO OUT_DIR` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set; writes OUT_DIR/SCENARIO-RANK.pt and leaves through os._exit, so that a gloo
teardown abort after the results are written cannot fail the test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from lookahead_cuda import Lookahead

K = 3
STEPS = 20
PER_RANK = 4
LR = 0.01


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def global_batches(steps: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    batch = PER_RANK * world_size
    return [
        (
            torch.randn(batch, 6, generator=generator, dtype=torch.float64),
            torch.randn(batch, 3, generator=generator, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def train(model: nn.Module, opt: torch.optim.Optimizer, data, rank: int, world: int) -> None:
    for x, y in data:
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()


def shard(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def build(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """(model to train, optimizer, module whose parameters are the weights)."""
    model = make_model()
    if kind == "fsdp":
        model = shard(model)
        return model, Lookahead(torch.optim.Adam(model.parameters(), lr=LR), k=K), model
    ddp = DistributedDataParallel(model)
    if kind == "zero":
        inner = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=LR)
        return ddp, Lookahead(inner, k=K), model
    return ddp, Lookahead(torch.optim.Adam(model.parameters(), lr=LR), k=K), model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def weights(module: nn.Module, opt: Lookahead) -> dict[str, list[torch.Tensor]]:
    params = list(module.parameters())
    return {
        "fast": [full(p) for p in params],
        "slow": [full(opt.lookahead_state[p]["slow_param"]) for p in params],
        "slow_types": [type(opt.lookahead_state[p]["slow_param"]).__name__ for p in params],
        "local_numel": [
            opt.lookahead_state[p]["slow_param"].to_local().numel()
            if hasattr(p, "to_local")
            else p.numel()
            for p in params
        ],
    }


def train_scenario(kind: str, rank: int, world: int) -> dict:
    model, opt, module = build(kind)
    train(model, opt, global_batches(STEPS, world), rank, world)
    return weights(module, opt)


def resume_scenario(kind: str, rank: int, world: int, checkpoint: Path) -> dict:
    """N steps, a distributed checkpoint, M more; then the M steps again from the checkpoint in
    fresh objects. N = 7 stops mid-cycle, so the resumed run's first sync needs the counter."""
    data = global_batches(13, world)
    model, opt, module = build(kind)
    train(model, opt, data[:7], rank, world)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=checkpoint,
    )
    train(model, opt, data[7:], rank, world)
    straight = weights(module, opt)

    model, opt, module = build(kind)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    counter = opt.lookahead_state[next(module.parameters())]["step"].item()
    train(model, opt, data[7:], rank, world)
    return {"straight": straight, "resumed": weights(module, opt), "counter_at_load": counter}


def restore_scenario(rank: int, world: int) -> dict:
    """A non-finite value in one process's shard only, then a sync: every process restores."""
    model = shard(make_model())
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=LR), k=K, nonfinite="restore")
    train(model, opt, global_batches(2, world), rank, world)
    first = next(model.parameters())
    if rank == 0:
        with torch.no_grad():
            first.to_local().view(-1)[0] = float("nan")
    opt.sync()
    return {
        "restores": opt.nonfinite_restores,
        "restored": all(
            torch.equal(p.to_local(), opt.lookahead_state[p]["slow_param"].to_local())
            for p in model.parameters()
        ),
        "initial": [p.detach() for p in make_model().parameters()],
        **weights(model, opt),
    }


def run_worker(result_of: Callable[[str, Path, int, int], dict]) -> None:
    """A worker's life: join the gloo group, compute ``result_of(scenario, out, rank, world)``,
    write it to OUT_DIR/SCENARIO-RANK.pt, and leave through os._exit (see the module docstring)."""
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A test of what must not hang sets a short collective timeout, to fail rather than wait.
    timeout = timedelta(seconds=float(os.environ.get("COLLECTIVE_TIMEOUT_S", 1800)))
    dist.init_process_group("gloo", timeout=timeout)
    try:
        result = result_of(scenario, out, rank, world)
        torch.save(result, out / f"{scenario}-{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def result_of(scenario: str, out: Path, rank: int, world: int) -> dict:
    if scenario.startswith("resume-"):
        kind = scenario.removeprefix("resume-")
        return resume_scenario(kind, rank, world, out / f"checkpoint-{kind}")
    if scenario == "restore-fsdp":
        return restore_scenario(rank, world)
    return train_scenario(scenario, rank, world)


if __name__ == "__main__":
    run_worker(result_of)
