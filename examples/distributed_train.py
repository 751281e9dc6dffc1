"""Lookahead on several processes: DDP (default) or FSDP2 (--fsdp), with a distributed checkpoint.

    torchrun --nproc-per-node 2 examples/distributed_train.py [--fsdp] [--steps 50]

Uses NCCL and one GPU per process when CUDA is available, else gloo on the CPU. A small regression
model on random data; each process draws its own batches. Rank 0 prints the loss; at the end the
optimizer state (slow weights and step counters included) goes to a distributed checkpoint, which
is loaded back into fresh objects.
"""

from __future__ import annotations

import argparse
import os
import tempfile

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
from torch.nn.parallel import DistributedDataParallel

from lookahead_cuda import Lookahead


def build(fsdp: bool, device: torch.device) -> tuple[nn.Module, Lookahead]:
    torch.manual_seed(0)  # the same initial weights on every process
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 1)).to(device)
    if fsdp:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)  # parameters become DTensors; slow weights are sharded alike
        fully_shard(model)
    else:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None
        )
    optimizer = Lookahead(torch.optim.AdamW(model.parameters(), lr=3e-3), k=5, alpha=0.5)
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    device = device or torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model, optimizer = build(args.fsdp, device)
    target = nn.Linear(32, 1).to(device)  # the function to learn, the same on every process
    generator = torch.Generator(device).manual_seed(1 + rank)
    for step in range(args.steps):
        x = torch.randn(64, 32, device=device, generator=generator)
        with torch.no_grad():
            y = target(x)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 10 == 9:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        path = [os.path.join(scratch, "ckpt")]
        dist.broadcast_object_list(path)  # rank 0's directory for all: one machine here
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        dcp.save(state, checkpoint_id=path[0])
        fresh_model, fresh_optimizer = build(args.fsdp, device)
        loaded = {
            "model": get_model_state_dict(fresh_model),
            "optim": get_optimizer_state_dict(fresh_model, fresh_optimizer),
        }
        dcp.load(loaded, checkpoint_id=path[0])
        set_model_state_dict(fresh_model, loaded["model"])
        set_optimizer_state_dict(fresh_model, fresh_optimizer, loaded["optim"])
        if rank == 0:
            print("checkpoint saved and loaded back", flush=True)
        dist.barrier()  # the directory is rank 0's: it stays until every process has loaded
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
