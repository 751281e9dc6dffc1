"""Lookahead's checkpoints: torch.optim's state-dict layout (parameter index -> tensors, settings
in the param groups), with Lookahead's tensors added to each parameter's entry under
``lookahead_``-prefixed keys; and a load that validates and converts everything before it changes
anything, so that a rejected dict leaves the optimizer exactly as it was."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from lookahead_cuda.evaluation import LoadedFastWeights
from lookahead_cuda.settings import FIRST_MOMENT_BUFFERS, KEYS, SLOW_DTYPE, check_settings

if TYPE_CHECKING:
    from lookahead_cuda.optimizer import Lookahead

#: Prefix of Lookahead's entries in ``state_dict()["state"][i]``, beside the inner state.
STATE_PREFIX = "lookahead_"
SLOW_PARAM = "slow_param"
OUTER_MOMENTUM = "outer_momentum"  # the outer step's momentum buffer, in the slow dtype
STEP = "step"  # a param group's steps since its last sync, kept with its first parameter
RESTORES = "nonfinite_restores"  # likewise: the group's syncs that restored instead
# Only in a state dict taken in evaluation mode, where the parameters hold the slow weights: the
# fast weights, which loading puts back into the parameters.
FAST_PARAM = "fast_param"
# Only with a process group (DiLoCo), where each worker's replica differs between syncs: every
# worker's fast weights and inner optimizer state, stacked along a first dimension of the group's
# size, so that one process can save the dict and every process resume its own replica from it.
WORKER = "worker_"
WORKER_FAST_PARAM = WORKER + FAST_PARAM
SLOW_BUFFERS = tuple("slow_" + name for name in FIRST_MOMENT_BUFFERS)
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def state_dict(opt: Lookahead) -> dict[str, Any]:
    """The inner optimizer's state dict with Lookahead's tensors added: the slow weights, pullback's
    slow copies and the group counters. Taken in evaluation mode, it holds copies of the true slow
    weights and, as ``lookahead_fast_param``, of the fast ones."""
    inner = opt.optimizer.state_dict()
    index: dict[int, int] = {}
    for param in (p for group in opt.param_groups for p in group["params"]):
        index.setdefault(id(param), len(index))
    state = {key: dict(entry) for key, entry in inner["state"].items()}
    swapped = opt._evaluation.slow_and_fast() if opt._evaluation is not None else {}
    loaded_fast = opt._loaded_fast_weights.pending()
    for param, ours in opt.lookahead_state.items():
        if not ours or id(param) not in index:
            continue
        entry = state.setdefault(index[id(param)], {})
        entry.update({STATE_PREFIX + name: value for name, value in ours.items()})
        if param in swapped:
            # Copies: the tensors holding the two roles trade them back at opt.train().
            slow, fast = swapped[param]
            entry[STATE_PREFIX + SLOW_PARAM] = slow.clone()
            entry[STATE_PREFIX + FAST_PARAM] = fast.clone()
        elif param in loaded_fast:  # loaded, not yet put back: they travel on
            entry[STATE_PREFIX + FAST_PARAM] = loaded_fast[param].clone()
    if opt.process_group is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        for position, param in enumerate(params):
            fast = swapped[param][1] if param in swapped else param.detach()
            fast = loaded_fast.get(param, fast)
            entry = state.setdefault(position, {})
            entry[STATE_PREFIX + WORKER_FAST_PARAM] = _gathered(fast, opt.process_group)
            for key, value in list(entry.items()):
                if not str(key).startswith(STATE_PREFIX) and isinstance(value, torch.Tensor):
                    entry[STATE_PREFIX + WORKER + key] = _gathered(value, opt.process_group)
    return {"state": state, "param_groups": inner["param_groups"]}


def _gathered(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Every worker's ``tensor``, stacked: a collective, so every process of ``group`` calls it
    (state_dict() under a process group is one, as torch's full state dicts under FSDP are)."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


_LARGEST_COUNT = torch.iinfo(torch.int64).max


def _count(value: Any, where: str) -> int:
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.is_complex():
        raise TypeError(f"{where} must be a one-element real tensor, got {_describe(value)}")
    if value.device.type == "meta":
        raise ValueError(f"{where} is on the meta device: it holds no count to load")
    number = value.item()
    if isinstance(number, bool) or not math.isfinite(number) or number < 0 or number != int(number):
        raise ValueError(f"{where} must be a whole number >= 0, got {number!r}")
    if number > _LARGEST_COUNT:
        raise ValueError(f"{where} is {number!r}, past what the int64 counter holds")
    return int(number)


def _weights(value: Any, param: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} must be a tensor, got {_describe(value)}")
    if value.dtype not in _FLOATS:
        raise TypeError(
            f"{where} has dtype {value.dtype}; slow weights are torch.float32, torch.float64, "
            "torch.float16 or torch.bfloat16"
        )
    if value.device.type == "meta":
        raise ValueError(f"{where} is on the meta device: it holds no values to load")
    if value.shape != param.shape:
        raise ValueError(
            f"{where} has shape {tuple(value.shape)}, the parameter has shape {tuple(param.shape)}"
        )
    return value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def load_state_dict(opt: Lookahead, saved: Mapping[str, Any]) -> None:
    """Load ``saved`` (from :func:`state_dict`, or a bare inner optimizer's state dict, whose slow
    weights are then taken afresh at the next step) into ``opt``, or raise ``TypeError`` /
    ``ValueError`` naming the entry at fault and change nothing."""
    if not isinstance(saved, Mapping) or "state" not in saved or "param_groups" not in saved:
        raise TypeError("a state dict is a mapping with 'state' and 'param_groups' entries")
    saved_groups, saved_state = saved["param_groups"], saved["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, Mapping):
        raise TypeError("a state dict's 'param_groups' is a list and its 'state' a mapping")
    groups = opt.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} param groups, "
            f"the optimizer has {len(groups)}"
        )
    merged_groups = []
    for index, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        if not isinstance(saved_group, Mapping) or "params" not in saved_group:
            raise TypeError(f"loaded param group {index} is not a mapping with 'params'")
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError(
                f"loaded param group {index} has {len(saved_group['params'])} parameters, "
                f"the optimizer's has {len(group['params'])}"
            )
        merged = {**{key: group[key] for key in KEYS}, **saved_group}
        check_settings(merged, f"loaded param group {index}", opt.optimizer, opt.capturable)
        merged_groups.append(merged)

    params = [p for group in groups for p in group["params"]]
    group_of = [g for g, group in zip(merged_groups, groups) for _ in group["params"]]
    # As torch.optim does, saved ids map to parameters by position in the saved groups: indices
    # from state_dict(), names from torch.distributed.checkpoint's get_optimizer_state_dict.
    position_of = {
        saved_id: position
        for position, saved_id in enumerate(i for g in saved_groups for i in g["params"])
    }

    worker = _worker(opt)
    inner_state: dict[Any, dict[str, Any]] = {}
    ours: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    fast_values: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, entry in saved_state.items():
        if not isinstance(entry, Mapping):
            raise TypeError(f"loaded state of parameter {key!r} is not a mapping")
        inner = {k: v for k, v in entry.items() if not str(k).startswith(STATE_PREFIX)}
        mine = {
            k[len(STATE_PREFIX) :]: v for k, v in entry.items() if str(k).startswith(STATE_PREFIX)
        }
        if mine and key not in position_of:
            raise ValueError(f"loaded Lookahead state for unknown parameter {key!r}")
        for name in [name for name in mine if name.startswith(WORKER)]:
            value = _row(mine.pop(name), worker, f"loaded {STATE_PREFIX}{name} of {key!r}")
            if name == WORKER_FAST_PARAM:
                mine[FAST_PARAM] = value
            else:
                inner[name.removeprefix(WORKER)] = value  # this worker's own, not process 0's
        if inner:  # an empty entry would read as a parameter with state (Adagrad's __setstate__)
            inner_state[key] = inner
        if not mine:
            continue
        param, group = params[position_of[key]], group_of[position_of[key]]
        converted = ours[param] = {}
        for name, value in mine.items():
            where = f"loaded {STATE_PREFIX}{name} of parameter {key!r}"
            if name in (STEP, RESTORES):
                count = _count(value, where)
                device = opt._counter_device(param) if name == STEP else param.device
                converted[name] = torch.tensor(count, dtype=torch.int64, device=device)
            elif name in (SLOW_PARAM, OUTER_MOMENTUM, *SLOW_BUFFERS):
                value = _weights(value, param, where)
                dtype = opt._copies.dtype(group[SLOW_DTYPE], param, kept=value.dtype)
                converted[name] = opt._copies.copy(value, dtype, param)
            elif name == FAST_PARAM:
                fast_values.append((param, _weights(value, param, where)))
            else:
                raise ValueError(f"{where}: Lookahead keeps no such entry")

    _load_inner(opt.optimizer, {"state": inner_state, "param_groups": merged_groups})
    # Committed: nothing below can fail on what was loaded. In evaluation mode the fast values
    # waiting in the old state are the old run's: dropped. A dict saved in evaluation mode carries
    # the fast weights, which go into the parameters now and again when training resumes, after any
    # model state dict loaded meanwhile (saved in evaluation mode too, it holds the slow weights).
    opt._evaluation = None
    opt.lookahead_state = defaultdict(dict, ours)
    opt._loaded_fast_weights.discard()
    opt._loaded_fast_weights = LoadedFastWeights(dict(fast_values))
    opt._forget_plans()


def _worker(opt: Lookahead) -> tuple[int, int] | None:
    """(this process's rank in the group, the group's size) under a process group, else None."""
    if opt.process_group is None:
        return None
    import torch.distributed as dist

    return dist.get_rank(opt.process_group), dist.get_world_size(opt.process_group)


def _row(value: Any, worker: tuple[int, int] | None, where: str) -> torch.Tensor:
    """This worker's row of an entry stacked over the workers that saved it."""
    if worker is None:
        raise ValueError(
            f"{where} holds the replicas of a DiLoCo group of workers; load it into "
            "Lookahead(process_group=...) on as many processes"
        )
    rank, world = worker
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != world:
        raise ValueError(
            f"{where} must stack {world} workers' tensors (this process group's size), got "
            f"{_describe(value)}"
        )
    return value[rank]


def _load_inner(optimizer: torch.optim.Optimizer, inner: dict[str, Any]) -> None:
    """The inner optimizer's load_state_dict, undone if it fails or leaves a param group without
    one of the optimizer's hyperparameters (a state dict of another optimizer class)."""

    def lacking(groups: list[Mapping[str, Any]]) -> str | None:
        for index, group in enumerate(groups):
            missing = [key for key in optimizer.defaults if key not in group]
            if missing:
                return (
                    f"loaded param group {index} lacks {', '.join(map(repr, missing))}, which "
                    f"{type(optimizer).__name__} needs: is this the state dict of another "
                    "optimizer?"
                )
        return None

    before = optimizer.__dict__["state"], optimizer.__dict__["param_groups"]
    try:
        try:
            optimizer.load_state_dict(inner)
        except (KeyError, IndexError, AttributeError, RuntimeError) as error:
            # Keys that torch fills in for older checkpoints may be missing from a good dict, so
            # missing keys explain a failure rather than predict one.
            reason = lacking(inner["param_groups"])
            raise ValueError(
                reason or f"{type(optimizer).__name__} rejected the loaded state: {error!r}"
            ) from error
        reason = lacking(optimizer.param_groups)
        if reason is not None:
            raise ValueError(reason)
    except BaseException:
        optimizer.__dict__["state"], optimizer.__dict__["param_groups"] = before
        raise
