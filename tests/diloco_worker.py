"""One process of the DiLoCo tests in test_diloco.py (not a test module itself): each process
trains its own replica on its own rows of every global batch, with no DDP, and
Lookahead(process_group=WORLD) averages the replicas at each sync.

Run as `python diloco_worker.py SCENARIO OUT_DIR` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set; writes OUT_DIR/SCENARIO-RANK.pt and leaves through os._exit (see
distributed_worker.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed_worker import global_batches, make_model, run_worker, train
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from lookahead_cuda import Lookahead

K = 3
STEPS = 11  # ends between two syncs
SETTINGS = {"k": K, "alpha": 0.7, "momentum": 0.9}
LR = 0.05


def build(**extra: Any) -> tuple[nn.Module, Lookahead]:
    model = make_model()
    if dist.get_rank() != 0:
        # A different start on every other process: Lookahead starts every replica from process
        # 0's weights, as DDP does.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(dist.get_rank()))
    inner = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return model, Lookahead(inner, process_group=dist.group.WORLD, **{**SETTINGS, **extra})


def state(model: nn.Module, opt: Lookahead) -> dict:
    params = list(model.parameters())
    ours = [opt.lookahead_state[p] for p in params]
    return {
        "fast": [p.detach().clone() for p in params],
        "slow": [o["slow_param"].clone() for o in ours],
        "momentum": [o["outer_momentum"].clone() for o in ours],
        "step": int(ours[0]["step"]),
    }


# With k = 4 and fragments=2: the model's four tensors, cut by bytes, the first weight (16 x 6) in
# fragment 0 and the rest in fragment 1.
STREAMED_FRAGMENTS = [[0], [1, 2, 3]]


def streamed_scenario(rank: int, world: int, **streaming: Any) -> dict:
    model, opt = build(**streaming)
    if opt._workers.fragments == 2:
        assert opt._planner.plan(0, opt.param_groups[0]).fragment_of == [0, 1, 1, 1]
    losses = []
    for x, y in global_batches(STEPS, world):
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {**state(model, opt), "losses": losses}


def train_scenario(rank: int, world: int, **extra) -> dict:
    model, opt = build(**extra)
    train(model, opt, global_batches(STEPS, world), rank, world)
    return state(model, opt)


def resume_scenario(
    rank: int, world: int, out: Path, distributed: bool, saved_at: int = 7, **extra: Any
) -> dict:
    """Steps, a checkpoint mid-cycle after ``saved_at`` steps (a plain state_dict saved by process
    0, or torch.distributed.checkpoint), more steps; then the same steps again from the checkpoint
    in fresh objects: each process must resume its own replica (fast weights, inner momentum)."""
    data = global_batches(13, world)
    model, opt = build(**extra)
    train(model, opt, data[:saved_at], rank, world)
    path = out / ("dcp" if distributed else "checkpoint.pt")
    if distributed:
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    else:
        saved = opt.state_dict()  # every process calls it: it gathers the workers' replicas
        if extra.get("sync_delay"):  # the average in flight travels with the checkpoint
            assert any("lookahead_in_flight_average" in e for e in saved["state"].values())
        if rank == 0:
            torch.save(saved, path)
    dist.barrier()
    train(model, opt, data[saved_at:], rank, world)
    straight = state(model, opt)

    # No model weights are loaded: the checkpoint itself must put each worker's replica back.
    model, opt = build(**extra)
    if distributed:
        loaded = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(loaded, checkpoint_id=path)
        set_optimizer_state_dict(model, opt, loaded["optim"])
    else:
        opt.load_state_dict(torch.load(path, weights_only=True))
    counter = int(opt.lookahead_state[next(model.parameters())]["step"])
    train(model, opt, data[saved_at:], rank, world)
    return {"straight": straight, "resumed": state(model, opt), "counter_at_load": counter}


def guard_scenario(rank: int, world: int) -> dict:
    """A blow-up in one process only, then a sync: every process restores, none averages it."""
    model, opt = build(nonfinite="restore")
    data = global_batches(5, world)
    train(model, opt, data[:4], rank, world)  # one sync at step 3
    before = state(model, opt)
    if rank == world - 1:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    opt.sync()
    return {"before": before, "after": state(model, opt), "restores": opt.nonfinite_restores}


SKIPPED_STEP = 2  # under GradScaler, the last process's inner step 2 has an inf gradient


def grad_scaler_scenario(rank: int, world: int) -> dict:
    """Under GradScaler (inner SGD, which leaves scaling to it), the last process skips a step
    the others take; every process still counts it, and all sync together."""
    model, opt = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    counts = []
    for step, (x, y) in enumerate(global_batches(STEPS, world), 1):
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x[rows]), y[rows])).backward()
        if step == SKIPPED_STEP and rank == world - 1:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        counts.append(int(opt.lookahead_state[next(model.parameters())]["step"]))
    return {**state(model, opt), "counts": counts, "scale": scaler.get_scale()}


DISAGREEMENTS = ("alpha", "k", "restore", "extra-parameter", "transposed", "rejected-sync")


def disagreement_scenario(case: str, rank: int, world: int) -> dict:
    """Workers alike but for one thing on the last one (``case``); each returns the error it
    raised, if any, and the step it raised at (0: the constructor)."""
    odd = rank == world - 1
    torch.manual_seed(3)
    shapes = [(8, 2) if odd and case == "transposed" else (2, 8), (5,)]
    params = [nn.Parameter(torch.randn(shape, dtype=torch.float64)) for shape in shapes]
    if odd and case == "extra-parameter":
        params.append(nn.Parameter(torch.randn(3, dtype=torch.float64)))
    settings = dict(SETTINGS)
    if odd:
        settings.update({"alpha": {"alpha": 0.5}, "k": {"k": K + 1}}.get(case, {}))
        if case == "restore":
            settings["nonfinite"] = "restore"
    step = 0
    try:
        opt = Lookahead(torch.optim.SGD(params, lr=LR), process_group=dist.group.WORLD, **settings)
        for step in range(1, STEPS + 1):
            if odd and case == "rejected-sync" and step == K:
                params[0].data = torch.randn(
                    3, 3, dtype=torch.float64
                )  # its slow copy no longer fits
            for p in params:
                p.grad = torch.sin(3 * p.detach())
            opt.step()
    except ValueError as error:
        return {"error": str(error), "step": step}
    return {"error": None, "step": step}


def uneven_state_scenario(rank: int, world: int, out: Path) -> dict:
    """AdamW whose last parameter gets no gradient on the last worker, so the workers' inner
    states differ (that worker has none for it); a checkpoint mid-cycle, then the same steps
    straight and from the checkpoint in fresh objects."""
    data = global_batches(13, world)

    def run(model: nn.Module, opt: Lookahead, batches: list) -> None:
        for x, y in batches:
            rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            opt.zero_grad()
            nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            if rank == world - 1:
                list(model.parameters())[-1].grad = None
            opt.step()

    def build_adamw() -> tuple[nn.Module, Lookahead]:
        model = make_model()
        inner = torch.optim.AdamW(model.parameters(), lr=LR)
        return model, Lookahead(inner, process_group=dist.group.WORLD, **SETTINGS)

    model, opt = build_adamw()
    run(model, opt, data[:7])
    saved = opt.state_dict()  # a collective: the workers must gather the same entries
    if rank == 0:
        torch.save(saved, out / "uneven.pt")
    dist.barrier()
    run(model, opt, data[7:])
    straight = state(model, opt)
    inner_entries = len(opt.optimizer.state)

    model, opt = build_adamw()
    opt.load_state_dict(torch.load(out / "uneven.pt", weights_only=True))
    loaded_entries = len(opt.optimizer.state)
    run(model, opt, data[7:])
    return {
        "straight": straight,
        "resumed": state(model, opt),
        "inner_entries": (inner_entries, loaded_entries),
    }


def result_of(scenario: str, out: Path, rank: int, world: int) -> dict:
    if scenario == "train":
        return train_scenario(rank, world)
    if scenario == "bf16":
        return train_scenario(rank, world, pseudo_gradient_dtype=torch.bfloat16)
    if scenario == "offload":
        return train_scenario(rank, world, slow_device="cpu")
    if scenario in ("resume", "resume-dcp"):
        return resume_scenario(rank, world, out, distributed=scenario == "resume-dcp")
    if scenario in ("resume-streamed", "resume-streamed-dcp"):
        # Saved 5 steps in, one step into the second cycle: fragment 0's average is in flight.
        streamed = {"k": 4, "fragments": 2, "sync_delay": 1}
        distributed = scenario.endswith("dcp")
        return resume_scenario(rank, world, out, distributed, saved_at=5, **streamed)
    if scenario == "guard":
        return guard_scenario(rank, world)
    if scenario == "grad-scaler":
        return grad_scaler_scenario(rank, world)
    if scenario == "int8":
        return streamed_scenario(rank, world, pseudo_gradient_dtype=torch.int8)
    if scenario == "streamed-int8":
        int8 = {"pseudo_gradient_dtype": torch.int8}
        return streamed_scenario(rank, world, k=4, fragments=2, sync_delay=1, **int8)
    if scenario.startswith("streamed-"):
        delay = int(scenario.removeprefix("streamed-"))
        return streamed_scenario(rank, world, k=4, fragments=2, sync_delay=delay)
    if scenario.startswith("disagree-"):
        return disagreement_scenario(scenario.removeprefix("disagree-"), rank, world)
    if scenario == "uneven-state":
        return uneven_state_scenario(rank, world, out)
    raise ValueError(f"unknown scenario {scenario}")


if __name__ == "__main__":
    run_worker(result_of)
