"""DiLoCo's side of Lookahead (``Lookahead(process_group=...)``): what it accepts, how its workers
start from one point and stay in agreement, and how a state dict holds every worker's replica.

Workers train replicas with no communication between syncs, so everything that must agree across
them is decided here, once: the arguments; that every worker has the same settings and parameter
shapes (:meth:`Workers.agree`, at construction and before each sync, so that a worker that
differs, or rejects a sync, raises the same error on every worker instead of hanging one of them
in a collective the others never call); the broadcast of the first worker's weights; and the
gathering of each worker's fast weights and inner state into one state dict (and back).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from lookahead_cuda.keys import SETTINGS, parameter_name

AVERAGED_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.int8)


class Workers:
    """The DiLoCo group of one Lookahead and how its syncs are streamed, shared by the parts that
    talk to it. :meth:`check` checks the constructor's arguments (``ValueError``/``TypeError``);
    :meth:`checked` has every worker raise alike when one rejects them.

    Attributes:
        group: the torch.distributed process group, or None (no DiLoCo). It does not travel with
            a pickled or copied optimizer: set ``opt.process_group`` again.
        pseudo_gradient_dtype: the dtype the average travels in (None: the slow dtype).
        fragments: how many fragments each param group's syncs are streamed in (1: all at once).
        sync_delay: inner steps between the start of a fragment's average and its outer step.
        fragment_mixing: with a delay, the weight of a worker's own fast weights against the
            new global ones when its fragment's outer step is taken.
    """

    def __init__(
        self,
        group: Any,
        pseudo_gradient_dtype: torch.dtype | None,
        fragments: int | Sequence[Sequence[torch.Tensor]] = 1,
        sync_delay: int = 0,
        fragment_mixing: float = 0.5,
    ) -> None:
        if group is not None:  # a group that cannot communicate cannot agree on anything else
            _check_group(group)
        self.group = group
        self.pseudo_gradient_dtype = pseudo_gradient_dtype
        self._given = fragments
        self._assigned: dict[int, int] | None = None  # id(parameter) -> fragment, when given
        self.fragments = len(fragments) if isinstance(fragments, Sequence) else fragments
        self.sync_delay = sync_delay
        self.fragment_mixing = fragment_mixing

    def check(self, capturable: bool) -> None:
        """Raise unless the constructor's DiLoCo arguments can work together."""
        _check_arguments(self.group, self.pseudo_gradient_dtype, capturable)
        fragments = self._given
        if isinstance(fragments, int) and not isinstance(fragments, bool):
            if fragments < 1:
                raise ValueError(f"Invalid fragments: {fragments!r}; expected an integer >= 1")
        elif isinstance(fragments, Sequence) and fragments and not isinstance(fragments, str):
            self._assigned = _assignment(fragments)
        else:
            raise TypeError(
                f"Invalid fragments: {fragments!r}; expected a number of fragments, or a list of "
                "lists of parameters (every parameter in exactly one)"
            )
        delay = self.sync_delay
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"Invalid sync_delay: {delay!r}; expected an integer >= 0")
        mixing = self.fragment_mixing
        if isinstance(mixing, bool) or not isinstance(mixing, (int, float)) or not 0 <= mixing <= 1:
            raise ValueError(f"Invalid fragment_mixing: {mixing!r}; expected a number in [0, 1]")
        self.fragment_mixing = float(mixing)
        if self.group is None and (self.fragments != 1 or delay != 0):
            raise ValueError(
                "fragments and sync_delay stream the syncs of DiLoCo's workers; they need a "
                "process_group"
            )

    def checked(
        self, check: Callable[[], None], describe: Callable[[], list[tuple[str, Any]]]
    ) -> None:
        """``check()``; with a group, every worker then agrees (:meth:`agree`) on ``describe()``
        and on whether any check (``describe()`` included) failed, so that a worker that rejects
        what the others accept raises alike on all of them instead of leaving them in a
        collective."""
        failure, description = None, []
        try:
            check()
            if self.group is not None:
                description = describe()
        except (TypeError, ValueError) as error:
            failure = error
        if self.group is not None:
            self.agree(description, failure)
        if failure is not None:
            raise failure

    def options(self) -> dict[str, Any]:
        """The constructor's DiLoCo arguments, which every worker must give alike."""
        return {
            "pseudo_gradient_dtype": self.pseudo_gradient_dtype,
            "fragments": self.fragments,
            "sync_delay": self.sync_delay,
            "fragment_mixing": self.fragment_mixing,
        }

    def check_period(self, k: int, where: str) -> None:
        """Raise unless k inner steps hold the fragments' syncs, each with its delay."""
        if k % self.fragments:
            raise ValueError(
                f"Invalid k in {where}: {k}; with {self.fragments} fragments it must be a multiple "
                f"of {self.fragments}, so that fragment f syncs every k steps, at (f + 1) * k / "
                f"{self.fragments}"
            )
        if self.sync_delay >= k // self.fragments:
            raise ValueError(
                f"Invalid sync_delay {self.sync_delay} for k = {k} in {where}: a fragment's "
                f"average must start after the previous fragment's sync, so sync_delay < k / "
                f"fragments = {k // self.fragments}"
            )

    def fragment_of(self, group_index: int, params: Sequence[torch.Tensor]) -> list[int]:
        """The fragment of each parameter of a param group: the given lists', or, for a number
        of fragments, contiguous runs of about equal bytes in the group's order."""
        if self._assigned is not None:
            missing = [j for j, p in enumerate(params) if id(p) not in self._assigned]
            if missing:
                raise ValueError(
                    f"fragments: {parameter_name(group_index, missing[0])} is in no fragment; "
                    "every parameter must be in exactly one"
                )
            return [self._assigned[id(p)] for p in params]
        sizes = [p.numel() * p.element_size() for p in params]
        total = sum(sizes) or 1
        fragments, before = [], 0
        for size in sizes:
            # The fragment where the middle of this tensor's bytes falls.
            middle = (before + size / 2) / total
            fragments.append(min(self.fragments - 1, int(middle * self.fragments)))
            before += size
        return fragments

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "group": None}

    def agree(self, description: Sequence[tuple[str, Any]], failure: BaseException | None) -> None:
        """Return if every worker of the group gives the same ``description`` and none a
        ``failure``; otherwise raise the same message on every worker, naming the workers and
        what differs: as ``failure``'s type on a worker that failed, as ``ValueError`` elsewhere.
        A collective: every worker calls it at the same point (construction, before each sync).
        One all-reduce of three integers when they agree."""
        digest = _digest(description)
        device = _collective_device(self.group)
        flags = torch.tensor([int(failure is not None), digest, -digest], device=device)
        torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, group=self.group)
        if flags.tolist() == [0, digest, -digest]:
            return
        reports: list[Any] = [None] * torch.distributed.get_world_size(self.group)
        failed = None if failure is None else f"{type(failure).__name__}: {failure}"
        torch.distributed.all_gather_object(reports, (list(description), failed), group=self.group)
        raised = type(failure) if isinstance(failure, (TypeError, ValueError)) else ValueError
        raise raised(_disagreement(reports)) from failure


def _assignment(fragments: Sequence[Sequence[torch.Tensor]]) -> dict[int, int]:
    assigned: dict[int, int] = {}
    for f, fragment in enumerate(fragments):
        if isinstance(fragment, torch.Tensor) or not isinstance(fragment, Sequence):
            raise TypeError(f"fragments[{f}] is a {type(fragment).__name__}, not a list of tensors")
        for i, param in enumerate(fragment):
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"fragments[{f}][{i}] is a {type(param).__name__}, not a tensor")
            if id(param) in assigned:
                raise ValueError(
                    f"fragments[{f}][{i}] is also in fragments[{assigned[id(param)]}]; every "
                    "parameter must be in exactly one fragment"
                )
            assigned[id(param)] = f
    return assigned


def _check_group(group: Any) -> None:
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        raise ValueError("process_group needs torch.distributed initialized (init_process_group)")
    if not isinstance(group, distributed.ProcessGroup):
        raise TypeError(
            f"Invalid process_group: {group!r}; expected a torch.distributed process "
            "group (torch.distributed.group.WORLD, or one from new_group)"
        )


def _check_arguments(
    process_group: Any, pseudo_gradient_dtype: torch.dtype | None, capturable: bool
) -> None:
    if process_group is None:
        if pseudo_gradient_dtype is not None:
            raise ValueError(
                "pseudo_gradient_dtype is the dtype the pseudo-gradients are averaged over the "
                "workers in; it needs a process_group"
            )
        return
    if pseudo_gradient_dtype not in AVERAGED_DTYPES:
        raise ValueError(
            f"Invalid pseudo_gradient_dtype: {pseudo_gradient_dtype!r}; expected None (average "
            "the fast weights in the slow dtype), torch.float32, torch.bfloat16, torch.float16 "
            "or torch.int8 (8-bit blocks with a float32 scale each)"
        )
    if capturable:
        raise ValueError(
            "process_group averages over the workers at each sync with a collective that the host "
            "calls, which a capturable step never does; use one or the other"
        )


def describe(
    groups: Sequence[Mapping[str, Any]],
    workers: Workers,
    counts: Sequence[int | None] = (),
) -> list[tuple[str, Any]]:
    """What every worker must have alike: the constructor's DiLoCo arguments, the number of param
    groups, each one's settings and step count (``counts``, where known), and each parameter's
    shape, strides, dtype and fragment (raises ``ValueError`` for a parameter in no given
    fragment)."""
    items: list[tuple[str, Any]] = [
        (name, repr(value)) for name, value in workers.options().items()
    ]
    items.append(("the number of param groups", len(groups)))
    items += [
        (f"the step count of param group {i}", n) for i, n in enumerate(counts) if n is not None
    ]
    for i, group in enumerate(groups):
        params = group["params"]
        items.append((f"the number of parameters of param group {i}", len(params)))
        items += [
            (f"{key.removeprefix('lookahead_')} of param group {i}", repr(group[key]))
            for key in SETTINGS
        ]
        fragments = workers.fragment_of(i, params)
        items += [
            (
                parameter_name(i, j),
                f"shape {tuple(p.shape)}, strides {p.stride()}, {p.dtype}, fragment {f}",
            )
            for j, (p, f) in enumerate(zip(params, fragments))
        ]
    return items


def _digest(description: Sequence[tuple[str, Any]]) -> int:
    # 62 bits, so that the digest and its negation both fit an int64.
    return (
        int.from_bytes(
            hashlib.blake2b(repr(list(description)).encode(), digest_size=8).digest(), "little"
        )
        >> 2
    )


def _collective_device(group: Any) -> torch.device:
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _disagreement(reports: Sequence[tuple[list[tuple[str, Any]], str | None]]) -> str:
    """One message from every worker's (description, failure), the same on every worker."""
    failed = [f"worker {rank}: {failure}" for rank, (_, failure) in enumerate(reports) if failure]
    if failed:
        return "DiLoCo: rejected by a worker, so every worker raises: " + "; ".join(failed)
    first = dict(reports[0][0])
    for rank, (description, _) in enumerate(reports[1:], 1):
        theirs = dict(description)
        for name in [*first, *(n for n in theirs if n not in first)]:
            if first.get(name) != theirs.get(name):
                mine = first.get(name, "nothing")
                other = theirs.get(name, "nothing")
                return (
                    f"DiLoCo workers disagree on {name}: worker 0 has {mine}, worker {rank} has "
                    f"{other}; every worker must build the same model and Lookahead"
                )
    return "DiLoCo workers disagree"  # digests differ but descriptions do not: unreachable


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


#: (position, name) -> (every worker's tensor stacked, which workers lack it or None if none does)
Replicas = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]]


def gather_replicas(
    local: Mapping[tuple[int, str], torch.Tensor],
    devices: Sequence[torch.device],
    group: Any,
) -> Replicas:
    """Every worker's tensors of a state dict, stacked, when the workers need not hold the same
    entries: they first agree on the union of (position, name) entries (one small gather of their
    shapes and dtypes), then gather each, a worker without it sending zeros that the returned mask
    marks. Entries of one name and position must have one shape and dtype on every worker.

    Args:
        local: this worker's tensors by (parameter position, name).
        devices: by parameter position, where a placeholder is made.
    """
    seen = {key: (tuple(t.shape), t.dtype) for key, t in local.items()}
    everyone: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, seen, group=group)
    replicas: Replicas = {}
    for key in sorted(set().union(*everyone)):
        kinds = {theirs[key] for theirs in everyone if key in theirs}
        if len(kinds) > 1:
            raise ValueError(
                f"DiLoCo workers hold {key[1]} of parameter {key[0]} in different shapes or dtypes "
                f"{sorted(map(str, kinds))}; every worker must build the same model and optimizer"
            )
        ((shape, dtype),) = kinds
        mine = local.get(key)
        if mine is None:
            mine = torch.zeros(shape, dtype=dtype, device=devices[key[0]])
        absent = [key not in theirs for theirs in everyone]
        replicas[key] = (gathered(mine, group), torch.tensor(absent) if any(absent) else None)
    return replicas


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
