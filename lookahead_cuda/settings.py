"""Lookahead's settings: their ranges, their validation, and the attribute that reads and sets one
for every param group.

They live in every param group next to the inner optimizer's hyperparameters (:mod:`keys` names
them), so they can differ per group, are changed the way a scheduler changes ``lr``, and travel
with ``state_dict()``. Every check of a setting's value, wherever it is made (the optimizer, the
functional core, the schedules, the benchmark's command line), asks the predicates here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from lookahead_cuda.inner_state import has_first_moments
from lookahead_cuda.keys import (
    ALPHA,
    FIRST_MOMENT_BUFFERS,
    INNER_STATE,
    MOMENTUM,
    NESTEROV,
    NONFINITE,
    SLOW_DTYPE,
    K,
)
from lookahead_cuda.ops import SUPPORTED_DTYPES

INNER_STATE_MODES = ("keep", "reset", "pullback")
NONFINITE_MODES = ("propagate", "restore")
SLOW_DTYPES = (None, *SUPPORTED_DTYPES)

#: The ranges, as messages write them.
ALPHA_RANGE = "(0, 1]"
MOMENTUM_RANGE = "[0, 1)"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def alpha_in_range(alpha: Any) -> bool:
    """Whether ``alpha`` (the slow-weights step size; with momentum, the outer learning rate) is a
    number in (0, 1]: above 1 the slow weights would overshoot the fast ones."""
    return _is_number(alpha) and 0.0 < alpha <= 1.0


def momentum_in_range(momentum: Any) -> bool:
    """Whether ``momentum`` (the outer momentum) is a number in [0, 1)."""
    return _is_number(momentum) and 0.0 <= momentum < 1.0


def k_in_range(k: Any) -> bool:
    """Whether ``k`` (inner steps between syncs) is an integer >= 1."""
    return isinstance(k, int) and not isinstance(k, bool) and k >= 1


def check_settings(
    settings: Mapping[str, Any],
    where: str,
    optimizer: torch.optim.Optimizer,
    capturable: bool = False,
) -> None:
    """Raise ValueError naming ``where`` unless every Lookahead key of ``settings`` holds a valid
    value for a Lookahead around ``optimizer`` (``capturable``: a capturable one)."""
    k = settings[K]
    if not k_in_range(k):
        raise ValueError(f"Invalid k in {where}: {k!r}; expected an integer >= 1")
    momentum = settings[MOMENTUM]
    if not momentum_in_range(momentum):
        raise ValueError(
            f"Invalid momentum in {where}: {momentum!r}; expected a number in {MOMENTUM_RANGE} "
            "(the outer momentum: 0 is Lookahead, DiLoCo and SNOO use 0.9)"
        )
    if not isinstance(settings[NESTEROV], bool):
        raise ValueError(
            f"Invalid nesterov in {where}: {settings[NESTEROV]!r}; expected True or False"
        )
    alpha = settings[ALPHA]
    if not alpha_in_range(alpha):
        meaning = (
            f"the outer learning rate, a number in {ALPHA_RANGE}: DiLoCo uses 0.7 with momentum "
            "0.9, and above 1 the outer step would overshoot the fast weights"
            if momentum > 0
            else f"a number in {ALPHA_RANGE}"
        )
        raise ValueError(f"Invalid alpha in {where}: {alpha!r}; expected {meaning}")
    inner_state = settings[INNER_STATE]
    if inner_state not in INNER_STATE_MODES:
        raise ValueError(
            f"Invalid inner_state in {where}: {inner_state!r}; expected one of {INNER_STATE_MODES}"
        )
    if inner_state == "reset" and capturable:
        raise ValueError(
            f"Invalid inner_state in {where}: 'reset' drops the inner optimizer's state on the "
            "host, which a capturable Lookahead never consults; use 'keep' or 'pullback'"
        )
    if inner_state == "pullback" and not has_first_moments(optimizer):
        raise ValueError(
            f"Invalid inner_state in {where}: 'pullback' interpolates first-moment buffers "
            f"({', '.join(FIRST_MOMENT_BUFFERS)}), and {type(optimizer).__name__} keeps none; "
            "use 'keep' or 'reset'"
        )
    if settings[NONFINITE] not in NONFINITE_MODES:
        raise ValueError(
            f"Invalid nonfinite in {where}: {settings[NONFINITE]!r}; "
            f"expected one of {NONFINITE_MODES}"
        )
    if settings[SLOW_DTYPE] not in SLOW_DTYPES:
        raise ValueError(
            f"Invalid slow_dtype in {where}: {settings[SLOW_DTYPE]!r}; expected None or one of "
            + ", ".join(map(str, SUPPORTED_DTYPES))
        )


class HasSettings(Protocol):
    """What a :class:`GroupSetting` reads and writes: a Lookahead."""

    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]

    def _check_settings(self, settings: Mapping[str, Any], where: str) -> None: ...


class GroupSetting:
    """A per-group setting as an attribute: reading it gives the value all param groups share (a
    ValueError if they differ), setting it validates the value and sets it for every group and,
    through ``opt.defaults``, for groups added later.

    Args:
        key: the param-group key.
        doc: the attribute's docstring.
        check: ``check(value, where)`` raises for a bad value; by default, Lookahead's own
            validation of the key.
    """

    def __init__(self, key: str, doc: str, check: Callable[[Any, str], None] | None = None) -> None:
        self.key = key
        self.__doc__ = doc
        self.check = check

    def __get__(self, opt: HasSettings | None, owner: type) -> Any:
        if opt is None:
            return self
        # .get: a group added through the inner optimizer gets the defaults at the next step.
        values = {group.get(self.key, opt.defaults[self.key]) for group in opt.param_groups}
        if len(values) > 1:
            raise ValueError(
                f"param groups have different {self.key} values {sorted(map(str, values))}; "
                f"read them per group: opt.param_groups[i][{self.key!r}]"
            )
        return values.pop() if values else opt.defaults[self.key]

    def __set__(self, opt: HasSettings, value: Any) -> None:
        where = f"{type(opt).__name__}.{self.key.removeprefix('lookahead_')}"
        if self.check is not None:
            self.check(value, where)
        else:
            opt._check_settings({**opt.defaults, self.key: value}, where)
        opt.defaults[self.key] = value
        for group in opt.param_groups:
            group[self.key] = value
