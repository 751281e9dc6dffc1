"""Lookahead's state dicts, as data: :func:`dump` writes one, :func:`parse` reads one back.

The layout is torch.optim's (parameter index -> tensors, settings in the param groups), with
Lookahead's tensors added to each parameter's entry under ``lookahead_``-prefixed keys, so tools
that map parameter indices (distributed checkpointing) handle it like any optimizer's. :func:`parse`
validates and converts everything before anything is changed, so that the caller can commit a
loaded dict or, on a ``TypeError``/``ValueError`` naming the entry at fault, leave everything as
it was; :func:`load_inner` loads the inner optimizer's part and undoes itself if that fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lookahead_cuda import diloco
from lookahead_cuda.keys import (
    FAST_PARAM,
    IN_FLIGHT,
    IN_FLIGHT_AVERAGE,
    IN_FLIGHT_NONE,
    IN_FLIGHT_RESTORE,
    IN_FLIGHT_VALUE,
    OUTER_MOMENTUM,
    RESTORES,
    SETTINGS,
    SLOW_BUFFERS,
    SLOW_DTYPE,
    SLOW_PARAM,
    STATE_PREFIX,
    STEP,
    WORKER,
    WORKER_ABSENT,
    WORKER_FAST_PARAM,
)
from lookahead_cuda.ops import SUPPORTED_DTYPES
from lookahead_cuda.slow_copies import SlowCopies

State = Mapping[torch.Tensor, Mapping[str, torch.Tensor]]


def dump(
    inner: dict[str, Any],
    params: Sequence[torch.Tensor],
    state: State,
    fast_elsewhere: Mapping[torch.Tensor, torch.Tensor],
    slow_elsewhere: Mapping[torch.Tensor, torch.Tensor],
    in_flight: Mapping[torch.Tensor, torch.Tensor | None] | None,
    process_group: Any,
) -> dict[str, Any]:
    """The state dict: ``inner`` (the inner optimizer's) with Lookahead's tensors added.

    Args:
        inner: the inner optimizer's ``state_dict()``.
        params: every parameter, in param-group order (the state dict's indices).
        state: Lookahead's per-parameter state.
        fast_elsewhere: the fast weights of parameters that do not hold them (evaluation mode; a
            loaded dict's, not yet put back), saved as ``lookahead_fast_param``.
        slow_elsewhere: the slow weights of parameters whose slow copies do not hold them
            (evaluation mode).
        in_flight: with streamed averages, for each parameter of a fragment whose average had
            started, that average (None: its sync is to restore); None without streaming.
        process_group: DiLoCo's workers, or None; with one, every worker's fast weights and inner
            state are gathered (a collective: every worker calls it), entries that only some
            workers hold marked as such.
    """
    index: dict[int, int] = {}
    for param in params:
        index.setdefault(id(param), len(index))
    entries = {key: dict(entry) for key, entry in inner["state"].items()}
    for param, ours in state.items():
        if not ours or id(param) not in index:
            continue
        entry = entries.setdefault(index[id(param)], {})
        entry.update({STATE_PREFIX + name: value for name, value in ours.items()})
        if param in slow_elsewhere:
            entry[STATE_PREFIX + SLOW_PARAM] = slow_elsewhere[param].clone()
        if param in fast_elsewhere:
            # A copy: the tensor holding them may change roles (at opt.train(), at a step).
            entry[STATE_PREFIX + FAST_PARAM] = fast_elsewhere[param].clone()
        if in_flight is not None:
            average = in_flight.get(param)
            code = IN_FLIGHT_AVERAGE if average is not None else IN_FLIGHT_NONE
            if param in in_flight and average is None:
                code = IN_FLIGHT_RESTORE
            entry[STATE_PREFIX + IN_FLIGHT] = torch.tensor(code, dtype=torch.int8)
            entry[STATE_PREFIX + IN_FLIGHT_VALUE] = (
                torch.zeros_like(ours[SLOW_PARAM]) if average is None else average.clone()
            )
    if process_group is not None:
        local = {}
        for position, param in enumerate(params):
            local[position, FAST_PARAM] = fast_elsewhere.get(param, param.detach())
            for key, value in entries.get(position, {}).items():
                if not str(key).startswith(STATE_PREFIX) and isinstance(value, torch.Tensor):
                    local[position, key] = value
        devices = [param.device for param in params]
        replicas = diloco.gather_replicas(local, devices, process_group)
        for (position, name), (stacked, absent) in replicas.items():
            entry = entries.setdefault(position, {})
            entry[STATE_PREFIX + WORKER + name] = stacked
            if absent is not None:
                entry[STATE_PREFIX + WORKER_ABSENT + name] = absent
    return {"state": entries, "param_groups": inner["param_groups"]}


@dataclass
class Loaded:
    """A state dict read and converted, nothing committed yet.

    Attributes:
        inner: what to give the inner optimizer's ``load_state_dict`` (:func:`load_inner`).
        state: Lookahead's per-parameter state, on the devices and in the dtypes it is used in.
        fast: the fast weights the dict carries (saved in evaluation mode), by parameter.
        in_flight: a streamed fragment's average that had started, by parameter (None: to
            restore), on the parameter's device in the slow weights' dtype.
    """

    inner: dict[str, Any]
    state: dict[torch.Tensor, dict[str, torch.Tensor]]
    fast: dict[torch.Tensor, torch.Tensor]
    in_flight: dict[torch.Tensor, torch.Tensor | None]


def parse(
    saved: Any,
    groups: Sequence[Mapping[str, Any]],
    check_settings: Callable[[Mapping[str, Any], str], None],
    copies: SlowCopies,
    counter_home: Callable[[torch.Tensor], torch.device],
    worker: tuple[int, int] | None,
) -> Loaded:
    """Read ``saved`` (from :func:`dump`, or a bare inner optimizer's state dict, whose slow
    weights are then taken afresh at the next step) for the param groups ``groups`` of a
    Lookahead, or raise ``TypeError``/``ValueError`` naming the entry at fault.

    Args:
        check_settings: ``check_settings(group, where)`` raises for a group's bad settings.
        copies: places the loaded slow copies.
        counter_home: where the count of the group starting with a parameter lives.
        worker: (rank, size) of this process in DiLoCo's group, or None: this worker's row of the
            entries stacked over the workers is the one loaded.
    """
    if not isinstance(saved, Mapping) or "state" not in saved or "param_groups" not in saved:
        raise TypeError("a state dict is a mapping with 'state' and 'param_groups' entries")
    saved_groups, saved_state = saved["param_groups"], saved["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, Mapping):
        raise TypeError("a state dict's 'param_groups' is a list and its 'state' a mapping")
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
        merged = {**{key: group[key] for key in SETTINGS}, **saved_group}
        check_settings(merged, f"loaded param group {index}")
        merged_groups.append(merged)

    params = [p for group in groups for p in group["params"]]
    group_of = [g for g, group in zip(merged_groups, groups) for _ in group["params"]]
    # As torch.optim does, saved ids map to parameters by position in the saved groups: indices
    # from state_dict(), names from torch.distributed.checkpoint's get_optimizer_state_dict.
    position_of = {
        saved_id: position
        for position, saved_id in enumerate(i for g in saved_groups for i in g["params"])
    }

    loaded = Loaded({"state": {}, "param_groups": merged_groups}, {}, {}, {})
    for key, entry in saved_state.items():
        if not isinstance(entry, Mapping):
            raise TypeError(f"loaded state of parameter {key!r} is not a mapping")
        inner = {k: v for k, v in entry.items() if not str(k).startswith(STATE_PREFIX)}
        mine = {
            k[len(STATE_PREFIX) :]: v for k, v in entry.items() if str(k).startswith(STATE_PREFIX)
        }
        if mine and key not in position_of:
            raise ValueError(f"loaded Lookahead state for unknown parameter {key!r}")
        for name in [name for name in mine if name.startswith(WORKER_ABSENT)]:
            lacking = diloco.row(mine.pop(name), worker, f"loaded {STATE_PREFIX}{name} of {key!r}")
            if bool(lacking):  # this worker had none: neither the stacked row nor worker 0's
                entry_name = name.removeprefix(WORKER_ABSENT)
                mine.pop(WORKER + entry_name, None)
                inner.pop(entry_name, None)
        for name in [name for name in mine if name.startswith(WORKER)]:
            value = diloco.row(mine.pop(name), worker, f"loaded {STATE_PREFIX}{name} of {key!r}")
            if name == WORKER_FAST_PARAM:
                mine[FAST_PARAM] = value
            else:
                inner[name.removeprefix(WORKER)] = value  # this worker's own, not process 0's
        if inner:  # an empty entry would read as a parameter with state (Adagrad's __setstate__)
            loaded.inner["state"][key] = inner
        if not mine:
            continue
        param, group = params[position_of[key]], group_of[position_of[key]]
        converted = loaded.state[param] = {}
        for name, value in mine.items():
            where = f"loaded {STATE_PREFIX}{name} of parameter {key!r}"
            if name in (STEP, RESTORES):
                device = counter_home(param) if name == STEP else param.device
                converted[name] = torch.tensor(
                    _count(value, where), dtype=torch.int64, device=device
                )
            elif name in (SLOW_PARAM, OUTER_MOMENTUM, *SLOW_BUFFERS):
                value = _weights(value, param, where)
                dtype = copies.dtype(group[SLOW_DTYPE], param, kept=value.dtype)
                converted[name] = copies.copy(value, dtype, param)
            elif name == FAST_PARAM:
                loaded.fast[param] = _weights(value, param, where)
            elif name == IN_FLIGHT:
                code = _count(value, where)
                if code not in (IN_FLIGHT_NONE, IN_FLIGHT_AVERAGE, IN_FLIGHT_RESTORE):
                    raise ValueError(f"{where} must be 0, 1 or 2, got {code}")
                if IN_FLIGHT_VALUE not in mine:
                    raise ValueError(f"{where} comes without {STATE_PREFIX}{IN_FLIGHT_VALUE}")
                average = _weights(mine[IN_FLIGHT_VALUE], param, where)
                if code == IN_FLIGHT_RESTORE:
                    loaded.in_flight[param] = None
                elif code == IN_FLIGHT_AVERAGE:
                    dtype = copies.dtype(group[SLOW_DTYPE], param, kept=average.dtype)
                    loaded.in_flight[param] = average.to(param.device, dtype, copy=True)
            elif name == IN_FLIGHT_VALUE:
                if IN_FLIGHT not in mine:
                    raise ValueError(f"{where} comes without {STATE_PREFIX}{IN_FLIGHT}")
            else:
                raise ValueError(f"{where}: Lookahead keeps no such entry")
    return loaded


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
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{where} has dtype {value.dtype}; slow weights are "
            + ", ".join(map(str, SUPPORTED_DTYPES))
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


def load_inner(optimizer: torch.optim.Optimizer, inner: dict[str, Any]) -> None:
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
