"""DiLoCo's side of Lookahead (``Lookahead(process_group=...)``): what it accepts, how its workers
start from one point, and how a state dict holds every worker's replica.

Workers train replicas with no communication between syncs, so everything that must agree across
them is decided here, once: the arguments, the broadcast of the first worker's weights, and the
gathering of each worker's fast weights and inner state into one state dict (and back).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

AVERAGED_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


class Workers:
    """The DiLoCo group of one Lookahead, shared by the parts that talk to it.

    Attributes:
        group: the torch.distributed process group, or None (no DiLoCo). It does not travel with
            a pickled or copied optimizer: set ``opt.process_group`` again.
        pseudo_gradient_dtype: the dtype the average travels in (None: the slow dtype).
    """

    def __init__(self, group: Any, pseudo_gradient_dtype: torch.dtype | None) -> None:
        self.group = group
        self.pseudo_gradient_dtype = pseudo_gradient_dtype

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "group": None}


def check_arguments(
    process_group: Any, pseudo_gradient_dtype: torch.dtype | None, capturable: bool
) -> None:
    """Raise unless the constructor's DiLoCo arguments can work together."""
    if process_group is None:
        if pseudo_gradient_dtype is not None:
            raise ValueError(
                "pseudo_gradient_dtype is the dtype the pseudo-gradients are averaged over the "
                "workers in; it needs a process_group"
            )
        return
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        raise ValueError("process_group needs torch.distributed initialized (init_process_group)")
    if not isinstance(process_group, distributed.ProcessGroup):
        raise TypeError(
            f"Invalid process_group: {process_group!r}; expected a torch.distributed process "
            "group (torch.distributed.group.WORLD, or one from new_group)"
        )
    if pseudo_gradient_dtype not in AVERAGED_DTYPES:
        raise ValueError(
            f"Invalid pseudo_gradient_dtype: {pseudo_gradient_dtype!r}; expected None (average "
            "the fast weights in the slow dtype), torch.float32, torch.bfloat16 or torch.float16"
        )
    if capturable:
        raise ValueError(
            "process_group averages over the workers at each sync with a collective that the host "
            "calls, which a capturable step never does; use one or the other"
        )


def check_step() -> None:
    """Raise inside a compiled step: the sync's collectives are decided on the host."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "Lookahead(process_group=...) cannot run in a compiled step yet: its syncs call a "
            "collective that the host decides on; compile the model, not the optimizer step"
        )


def check_replicas(group_index: int, sharded_over: Any) -> None:
    """Raise if a param group holds shards (FSDP2's DTensors) rather than whole replicas."""
    if sharded_over is not None:
        raise ValueError(
            f"param group {group_index} holds DTensors (FSDP2): each worker holds shards, which "
            "Lookahead(process_group=...) cannot average into a replica's outer step; average "
            "over workers that each hold whole parameters, or drop process_group"
        )


def broadcast_from_first_worker(params: Iterable[torch.Tensor], group: Any) -> None:
    """DiLoCo's workers start from one point, the group's first process's weights: at
    construction, as DDP does, and when slow weights are taken (of weights loaded since)."""
    source = torch.distributed.get_global_rank(group, 0)
    with torch.no_grad():
        for param in params:
            torch.distributed.broadcast(param.detach(), source, group=group)


def worker_of(group: Any) -> tuple[int, int] | None:
    """(this process's rank in ``group``, the group's size), or None without a group."""
    if group is None:
        return None
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def gathered(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Every worker's ``tensor``, stacked: a collective, so every process of ``group`` calls it
    (state_dict() under a process group is one, as torch's full state dicts under FSDP are)."""
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def row(value: Any, worker: tuple[int, int] | None, where: str) -> torch.Tensor:
    """This worker's row of an entry stacked over the workers that saved it."""
    if worker is None:
        raise ValueError(
            f"{where} holds the replicas of a DiLoCo group of workers; load it into "
            "Lookahead(process_group=...) on as many processes"
        )
    rank, world = worker
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != world:
        described = (
            f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            if isinstance(value, torch.Tensor)
            else f"a {type(value).__name__}"
        )
        raise ValueError(
            f"{where} must stack {world} workers' tensors (this process group's size), got "
            f"{described}"
        )
    return value[rank]
