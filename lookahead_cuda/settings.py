"""Lookahead's settings: the param-group keys they live under, their validation, and the attribute
that reads and sets one for every group.

They live in every param group next to the inner optimizer's hyperparameters (prefixed: RMSprop
already has an ``alpha``), so they can differ per group, are changed the way a scheduler changes
``lr``, and travel with ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lookahead_cuda.optimizer import Lookahead

K = "lookahead_k"
ALPHA = "lookahead_alpha"
INNER_STATE = "lookahead_inner_state"
SLOW_DTYPE = "lookahead_slow_dtype"
NONFINITE = "lookahead_nonfinite"
MOMENTUM = "lookahead_momentum"
NESTEROV = "lookahead_nesterov"
KEYS = (K, ALPHA, INNER_STATE, SLOW_DTYPE, NONFINITE, MOMENTUM, NESTEROV)

INNER_STATE_MODES = ("keep", "reset", "pullback")
NONFINITE_MODES = ("propagate", "restore")
SLOW_DTYPES = (None, torch.float32, torch.float64, torch.float16, torch.bfloat16)

# First-moment buffers that "pullback" interpolates: SGD and RMSprop keep `momentum_buffer` (when
# momentum > 0); Adam, AdamW, Adamax, NAdam and RAdam keep `exp_avg`.
FIRST_MOMENT_BUFFERS = ("momentum_buffer", "exp_avg")
WITHOUT_FIRST_MOMENT = tuple(
    getattr(torch.optim, name)
    for name in ("Adagrad", "Adadelta", "Rprop", "ASGD", "LBFGS", "Adafactor")
    if hasattr(torch.optim, name)
)


def check_settings(
    settings: Mapping[str, Any],
    where: str,
    optimizer: torch.optim.Optimizer,
    capturable: bool = False,
) -> None:
    """Raise ValueError naming ``where`` unless every Lookahead key of ``settings`` holds a valid
    value for a Lookahead around ``optimizer`` (``capturable``: a capturable one)."""
    k = settings[K]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k in {where}: {k!r}; expected an integer >= 1")
    momentum = settings[MOMENTUM]
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0.0 <= momentum < 1.0
    ):
        raise ValueError(
            f"Invalid momentum in {where}: {momentum!r}; expected a number in [0, 1) (the outer "
            "momentum: 0 is Lookahead, DiLoCo and SNOO use 0.9)"
        )
    if not isinstance(settings[NESTEROV], bool):
        raise ValueError(
            f"Invalid nesterov in {where}: {settings[NESTEROV]!r}; expected True or False"
        )
    alpha = settings[ALPHA]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        meaning = (
            "the outer learning rate, a number in (0, 1]: DiLoCo uses 0.7 with momentum 0.9, and "
            "above 1 the outer step would overshoot the fast weights"
            if momentum > 0
            else "a number in (0, 1]"
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
    if inner_state == "pullback" and isinstance(optimizer, WITHOUT_FIRST_MOMENT):
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
            f"Invalid slow_dtype in {where}: {settings[SLOW_DTYPE]!r}; expected None, "
            "torch.float32, torch.float64, torch.float16 or torch.bfloat16"
        )


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

    def __get__(self, opt: Lookahead | None, owner: type) -> Any:
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

    def __set__(self, opt: Lookahead, value: Any) -> None:
        where = f"{type(opt).__name__}.{self.key.removeprefix('lookahead_')}"
        if self.check is not None:
            self.check(value, where)
        else:
            check_settings({**opt.defaults, self.key: value}, where, opt.optimizer, opt.capturable)
        opt.defaults[self.key] = value
        for group in opt.param_groups:
            group[self.key] = value
