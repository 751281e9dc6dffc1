"""What a sync does to the inner optimizer's per-parameter state (``inner_state``): ``"reset"``
restarts it, ``"pullback"`` interpolates its first moments toward their own slow copies."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lookahead_cuda.keys import FIRST_MOMENT_BUFFERS

# Optimizers that keep no first moment: "pullback" has nothing to interpolate in them.
_WITHOUT_FIRST_MOMENT = tuple(
    getattr(torch.optim, name)
    for name in ("Adagrad", "Adadelta", "Rprop", "ASGD", "LBFGS", "Adafactor")
    if hasattr(torch.optim, name)
)


class InitialInnerState:
    """The state some optimizers create for every parameter at construction (Adagrad's ``sum`` and
    ``step``) rather than at their first step: a reset must recreate it, since the inner optimizer
    may not. For a parameter not stepped yet (``step`` 0) it is the entry the optimizer holds; for
    one it stepped before Lookahead wrapped it (a warm start), what a fresh instance of its class
    creates, learnt from one built on a one-element stand-in (none if that cannot be built).
    Constant tensors (Adagrad's ``sum`` starts at ``initial_accumulator_value``) are kept as their
    value, anything else as a copy.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._entries: dict[torch.Tensor, dict[str, Any]] = {}
        with torch.no_grad():
            for group in optimizer.param_groups:
                # (dtype, device) -> a fresh optimizer's entry for a stand-in of them
                constructed: dict[tuple[torch.dtype, torch.device], dict[str, Any] | None] = {}
                for param in group["params"]:
                    entry = optimizer.state.get(param)
                    if not entry:
                        continue
                    if "step" in entry and float(entry["step"]) == 0:
                        initial = {name: _compact(v) for name, v in entry.items()}
                    else:
                        kind = (param.dtype, param.device)
                        if kind not in constructed:
                            constructed[kind] = _stand_in_entry(optimizer, group, *kind)
                        initial = _filled(constructed[kind], param)
                    if initial:
                        self._entries[param] = initial

    def reset(self, state: dict[torch.Tensor, Any], params: Iterable[torch.Tensor]) -> None:
        """Restart the inner state of ``params``: as the optimizer created it, or none."""
        for param in params:
            state.pop(param, None)
            initial = self._entries.get(param)
            if initial is not None:
                state[param] = {name: _expand(v) for name, v in initial.items()}


def _stand_in_entry(
    optimizer: torch.optim.Optimizer,
    group: Mapping[str, Any],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any] | None:
    """The entry a fresh optimizer of ``optimizer``'s class and ``group``'s hyperparameters
    creates at construction for a one-element parameter of ``dtype`` on ``device`` (None if the
    class cannot be built so: it is then assumed to create nothing)."""
    stand_in = torch.zeros(1, dtype=dtype, device=device, requires_grad=True)
    hyperparameters = {key: value for key, value in group.items() if key != "params"}
    try:
        # Also as constructor arguments: Adagrad fills its state from its own
        # initial_accumulator_value, not from the group's.
        accepted = inspect.signature(type(optimizer)).parameters
        arguments = {k: v for k, v in hyperparameters.items() if k in accepted}
        fresh = type(optimizer)([{**hyperparameters, "params": [stand_in]}], **arguments)
    except Exception:
        return None
    return fresh.state.get(stand_in)


def _filled(entry: dict[str, Any] | None, param: torch.Tensor) -> dict[str, Any] | None:
    """A stand-in's entry for ``param``, compacted: its one-element tensors as ``param``-shaped
    fills (made only at a reset, by _expand)."""
    if entry is None:
        return None
    return {
        name: ("filled", param.shape, value.dtype, value.device, value.item())
        if isinstance(value, torch.Tensor) and value.shape == (1,)
        else _compact(value)
        for name, value in entry.items()
    }


def _compact(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() > 1 and bool((value == value.reshape(-1)[0]).all()):
        return ("filled", value.shape, value.dtype, value.device, value.reshape(-1)[0].item())
    return value.detach().clone()


def _expand(value: Any) -> Any:
    if isinstance(value, tuple) and value and value[0] == "filled":
        _, shape, dtype, device, fill = value
        return torch.full(shape, fill, dtype=dtype, device=device)
    return value.clone() if isinstance(value, torch.Tensor) else value


def has_first_moments(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` may keep first-moment buffers (``FIRST_MOMENT_BUFFERS``)."""
    return not isinstance(optimizer, _WITHOUT_FIRST_MOMENT)


def first_moments(entry: Mapping[str, Any]) -> Iterable[tuple[str, torch.Tensor]]:
    """The first-moment buffers of one parameter's inner state that ``"pullback"`` interpolates."""
    for name in FIRST_MOMENT_BUFFERS:
        buffer = entry.get(name)
        if isinstance(buffer, torch.Tensor):
            yield name, buffer
