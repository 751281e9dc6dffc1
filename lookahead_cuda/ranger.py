"""Ranger: Lookahead around RAdam, with gradient centralization."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from lookahead_cuda.optimizer import Lookahead
from lookahead_cuda.settings import GroupSetting

# Per param group, beside RAdam's hyperparameters, so it can differ per group and travels with
# state_dict() like `amsgrad` or `maximize` do in torch.optim.
USE_GC = "use_gc"


def _check_use_gc(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid use_gc in {where}: {value!r}; expected True or False")


class Ranger(Lookahead):
    r"""Ranger: :class:`Lookahead` around :class:`torch.optim.RAdam`, with gradient centralization.

    Before each step, every gradient with two or more dimensions has its mean over all dimensions
    but the first subtracted (Yong et al., 2020, "Gradient Centralization"; the Ranger authors
    apply it to linear and convolution weights alike), then RAdam steps and every ``k`` steps the
    slow weights are pulled toward the fast ones. Everything else (``k``, ``alpha``,
    ``inner_state``, ``slow_dtype``, :meth:`slow_weights`, :meth:`sync`, ``state_dict``) is
    :class:`Lookahead`'s; the inner RAdam is ``opt.optimizer``.

    Args:
        params (iterable): parameters or param groups, as for any torch.optim optimizer; a group
            may set its own ``lr``, ``betas``, ``weight_decay``, ``use_gc``, ``lookahead_k``, ...
        lr (float, optional): RAdam's learning rate, >= 0 (default: 1e-3).
        k (int, optional): RAdam steps between two slow updates (default: 6).
        alpha (float, optional): slow-weights step size, in (0, 1] (default: 0.5).
        betas (tuple[float, float], optional): RAdam's coefficients for the running averages of
            the gradient and its square, each in [0, 1) (default: (0.95, 0.999)).
        weight_decay (float, optional): RAdam's L2 penalty, >= 0 (default: 0).
        use_gc (bool, optional): centralize the gradients of parameters with two or more
            dimensions; stored per param group as ``use_gc`` (default: True).
        inner_state, slow_dtype, nonfinite, slow_device (optional, keyword-only):
            :class:`Lookahead`'s, with its defaults.
        capturable (bool, optional, keyword-only): :class:`Lookahead`'s, and RAdam's too, so that
            a whole Ranger step can be captured in a CUDA graph (default: False).

    RAdam's other options keep torch's defaults (``eps=1e-8``, ...); set them in
    ``opt.param_groups`` if needed. With a closure, :meth:`step` evaluates it first (with
    gradients enabled) and centralizes the gradients it produced, so RAdam always steps on
    centralized gradients.
    """

    _SETTING_KEYS = (*Lookahead._SETTING_KEYS, USE_GC)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        k: int = 6,
        alpha: float = 0.5,
        betas: tuple[float, float] = (0.95, 0.999),
        weight_decay: float = 0,
        use_gc: bool = True,
        *,
        inner_state: str = "keep",
        slow_dtype: torch.dtype | None = None,
        nonfinite: str = "propagate",
        capturable: bool = False,
        slow_device: str | torch.device | None = None,
    ) -> None:
        _check_use_gc(use_gc, "Ranger()")
        # Read by add_param_group, which Lookahead.__init__ calls for every group it adopts, before
        # it can be in opt.defaults.
        self._use_gc = use_gc
        # RAdam validates lr, betas and weight_decay with torch.optim's own messages.
        radam = torch.optim.RAdam(
            params, lr=lr, betas=betas, weight_decay=weight_decay, capturable=capturable
        )
        super().__init__(
            radam,
            k=k,
            alpha=alpha,
            inner_state=inner_state,
            slow_dtype=slow_dtype,
            nonfinite=nonfinite,
            capturable=capturable,
            slow_device=slow_device,
        )
        self.defaults[USE_GC] = use_gc

    def __repr__(self) -> str:
        use_gc = self.defaults[USE_GC]
        return f"Ranger(use_gc={use_gc}, " + super().__repr__().removeprefix("Lookahead(")

    use_gc = GroupSetting(USE_GC, "Whether gradients are centralized.", check=_check_use_gc)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; ``use_gc`` and the Lookahead settings it does not name default to
        the constructor's."""
        default = self.defaults.get(USE_GC, self._use_gc)
        if isinstance(param_group, dict):
            _check_use_gc(param_group.get(USE_GC, default), "the new param group")
        super().add_param_group(param_group)
        param_group.setdefault(USE_GC, default)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, from a :class:`Lookahead`, or from a bare
        RAdam; groups saved without ``use_gc`` keep their current one."""
        saved_groups = state_dict["param_groups"]
        # On a group-count mismatch the dict goes through unchanged, for Lookahead to reject.
        if len(saved_groups) == len(self.param_groups):
            groups = [
                {USE_GC: group[USE_GC], **saved}
                for group, saved in zip(self.param_groups, saved_groups)
            ]
            for index, group in enumerate(groups):
                _check_use_gc(group[USE_GC], f"loaded param group {index}")
            state_dict = {**state_dict, "param_groups": groups}
        super().load_state_dict(state_dict)

    def _before_inner_step(self, closure: Callable[[], float] | None) -> Callable[[], float] | None:
        """Centralize the gradients before RAdam steps: with a closure, those it produces (it is
        evaluated here, with gradients enabled, and RAdam gets its loss)."""
        if closure is None:
            self._centralize_gradients()
            return None
        with torch.enable_grad():
            loss = closure()
        self._centralize_gradients()
        return lambda: loss

    @torch.no_grad()
    def _centralize_gradients(self) -> None:
        grads = [
            param.grad
            for group in self.param_groups
            if group[USE_GC]
            for param in group["params"]
            if param.grad is not None and param.grad.dim() >= 2
        ]
        if grads:
            means = [grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True) for grad in grads]
            torch._foreach_sub_(grads, means)
