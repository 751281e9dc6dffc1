"""Schedules for Lookahead's alpha and k, in the manner of ``torch.optim.lr_scheduler``.

The paper (Zhang et al., 2019) fixes alpha and k for a whole run and names adapting them as future
work. A scheduler here sets ``lookahead_alpha`` (and, if asked, ``lookahead_k``) in every param
group of a :class:`~lookahead_cuda.Lookahead` or :class:`~lookahead_cuda.Ranger` at each
:meth:`~LookaheadScheduler.step`, which may be called per optimizer step or per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lookahead_cuda.keys import ALPHA, K
from lookahead_cuda.optimizer import Lookahead
from lookahead_cuda.settings import ALPHA_RANGE, alpha_in_range

T = TypeVar("T")


class LookaheadScheduler:
    """Base class: subclasses say which alpha (and k) each param group has at a given epoch.

    Like torch's LR schedulers, it records each group's values at construction
    (:attr:`base_alphas`, :attr:`base_ks`), applies epoch 0 at once, and :meth:`step` moves to the
    next epoch. Values are checked for every group before any is set (alpha in (0, 1], k an
    integer >= 1), so a bad value raises ``ValueError`` and changes nothing. :meth:`state_dict`
    holds the epoch, the base values and the values last set; loading it sets those values in the
    param groups again, so the optimizer's and the scheduler's state dicts load in either order.

    Args:
        optimizer (Lookahead): the optimizer whose param groups are scheduled.
    """

    # Attributes that state_dict() leaves out: the optimizer, and the user's functions (saved with
    # the code that builds the scheduler, as torch's LambdaLR does for plain functions).
    _not_saved: tuple[str, ...] = ("optimizer",)

    def __init__(self, optimizer: Lookahead) -> None:
        if not isinstance(optimizer, Lookahead):
            raise TypeError(
                f"{type(self).__name__} schedules a Lookahead or Ranger, "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.base_alphas: list[float] = [group[ALPHA] for group in optimizer.param_groups]
        self.base_ks: list[int] = [group[K] for group in optimizer.param_groups]
        self.last_epoch = -1
        self._last_alpha: list[float] = []
        self._last_k: list[int] = []
        self.step()

    def alphas_at(self, epoch: int) -> list[float]:
        """Each param group's alpha at ``epoch``."""
        raise NotImplementedError

    def ks_at(self, epoch: int) -> list[int] | None:
        """Each param group's k at ``epoch``, or None to leave k alone (the default)."""
        return None

    def step(self) -> None:
        """Move to the next epoch and set its alpha (and k) in every param group."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.base_alphas):
            raise ValueError(
                f"the optimizer has {len(groups)} param groups, and {type(self).__name__} was "
                f"built for {len(self.base_alphas)}; build the scheduler after add_param_group"
            )
        epoch = self.last_epoch + 1
        ks = self.ks_at(epoch)
        self._apply(
            epoch, list(self.alphas_at(epoch)), [g[K] for g in groups] if ks is None else list(ks)
        )

    def _apply(self, epoch: int, alphas: list[float], ks: list[int]) -> None:
        groups = self.optimizer.param_groups
        if not len(alphas) == len(ks) == len(groups):
            raise ValueError(
                f"{type(self).__name__} at epoch {epoch} has {len(alphas)} alphas and {len(ks)} "
                f"ks for {len(groups)} param groups"
            )
        for index, (group, alpha, k) in enumerate(zip(groups, alphas, ks)):
            self.optimizer._check_settings(
                {**group, ALPHA: alpha, K: k},
                f"{type(self).__name__} at epoch {epoch}, param group {index}",
            )
        for group, alpha, k in zip(groups, alphas, ks):
            group[ALPHA] = alpha
            group[K] = k
        self.last_epoch = epoch
        self._last_alpha, self._last_k = alphas, ks

    def get_last_alpha(self) -> list[float]:
        """Each param group's alpha as last set by :meth:`step`."""
        return list(self._last_alpha)

    def get_last_k(self) -> list[int]:
        """Each param group's k as of the last :meth:`step`."""
        return list(self._last_k)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: the epoch, the base values and the last values set."""
        return {key: value for key, value in vars(self).items() if key not in self._not_saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state from :meth:`state_dict`, and set the saved epoch's alpha and k in
        the param groups again: building a scheduler sets epoch 0's, which would otherwise stand
        until the next :meth:`step` when the optimizer's state dict was loaded first. A dict with
        other keys than :meth:`state_dict` gives (an ``optimizer`` entry, say) raises
        ``ValueError`` and changes nothing."""
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            unknown = sorted(set(state_dict) - expected)
            missing = sorted(expected - set(state_dict))
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: not a state dict of this scheduler "
                f"(unknown keys {unknown}, missing keys {missing})"
            )
        self._apply(state_dict["last_epoch"], state_dict["_last_alpha"], state_dict["_last_k"])
        self.__dict__.update(state_dict)


def _per_group(value: T | Sequence[T], count: int, name: str) -> list[T]:
    if not isinstance(value, (list, tuple)):
        return [value] * count  # type: ignore[list-item]
    if len(value) != count:
        raise ValueError(f"expected one {name} per param group ({count}), got {len(value)}")
    return list(value)


class LambdaAlpha(LookaheadScheduler):
    """Each group's alpha is its initial alpha times ``alpha_lambda(epoch)``, as
    :class:`torch.optim.lr_scheduler.LambdaLR` does for the learning rate; with ``k_lambda``, its
    k is its initial k times ``k_lambda(epoch)``, rounded to the nearest integer.

    Args:
        optimizer (Lookahead): the optimizer whose param groups are scheduled.
        alpha_lambda (callable or list of callables): epoch -> factor, one for all groups or one
            per group.
        k_lambda (callable or list of callables, optional): epoch -> factor for k, one for all
            groups or one per group; None leaves k alone (default: None).

    The functions are not part of :meth:`state_dict`; build the scheduler with the same ones
    before loading it.

    Example: for an optimizer built with ``alpha=1`` (the inner optimizer alone), alpha down to
    0.5 over the first 1000 steps, calling ``scheduler.step()`` after each ``optimizer.step()``::

        scheduler = LambdaAlpha(optimizer, lambda step: max(0.5, 1 - step / 2000))
    """

    _not_saved = (*LookaheadScheduler._not_saved, "alpha_lambdas", "k_lambdas")

    def __init__(
        self,
        optimizer: Lookahead,
        alpha_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
        k_lambda: Callable[[int], float] | Sequence[Callable[[int], float]] | None = None,
    ) -> None:
        count = len(optimizer.param_groups)
        self.alpha_lambdas = _per_group(alpha_lambda, count, "alpha_lambda")
        self.k_lambdas = None if k_lambda is None else _per_group(k_lambda, count, "k_lambda")
        super().__init__(optimizer)

    def alphas_at(self, epoch: int) -> list[float]:
        return [base * f(epoch) for base, f in zip(self.base_alphas, self.alpha_lambdas)]

    def ks_at(self, epoch: int) -> list[int] | None:
        if self.k_lambdas is None:
            return None
        ks = []
        for index, (base, f) in enumerate(zip(self.base_ks, self.k_lambdas)):
            k = base * f(epoch)
            if not math.isfinite(k):
                raise ValueError(
                    f"Invalid k in LambdaAlpha at epoch {epoch}, param group {index}: "
                    f"{base} * k_lambda({epoch}) is {k!r}; expected a finite number"
                )
            ks.append(round(k))
        return ks


class CosineAlpha(LookaheadScheduler):
    """Each group's alpha follows half a cosine from its initial value to ``alpha_end`` over
    ``T_max`` epochs, and stays at ``alpha_end`` after (it does not swing back, unlike
    :class:`torch.optim.lr_scheduler.CosineAnnealingLR`). ``alpha_end`` may be above or below the
    initial alpha; k is left alone.

    Args:
        optimizer (Lookahead): the optimizer whose param groups are scheduled.
        T_max (int): epochs (or steps) from the initial alpha to ``alpha_end``, >= 1.
        alpha_end (float): the final alpha, in (0, 1].
    """

    def __init__(self, optimizer: Lookahead, T_max: int, alpha_end: float) -> None:
        if isinstance(T_max, bool) or not isinstance(T_max, int) or T_max < 1:
            raise ValueError(f"Invalid T_max: {T_max!r}; expected an integer >= 1")
        if not alpha_in_range(alpha_end):
            expected = f"a number in {ALPHA_RANGE}"
            raise ValueError(f"Invalid alpha_end: {alpha_end!r}; expected {expected}")
        self.T_max = T_max
        self.alpha_end = alpha_end
        super().__init__(optimizer)

    def alphas_at(self, epoch: int) -> list[float]:
        progress = min(epoch, self.T_max) / self.T_max
        weight = (1 + math.cos(math.pi * progress)) / 2
        # Weighted sum rather than end + (base - end) * weight: exact at both ends.
        return [base * weight + self.alpha_end * (1 - weight) for base in self.base_alphas]
