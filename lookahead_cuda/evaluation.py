"""Evaluation on the slow weights: the parameters hold them while the fast values wait; and the fast
weights of a checkpoint saved so, waiting for training to resume."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _swap_(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange two same-dtype tensors' values in place through a temporary of one tensor."""
    temporary = a.clone()
    a.copy_(b)
    b.copy_(temporary)


class SlowWeightsInParameters:
    """The parameters holding their slow weights, and where their fast values wait meanwhile.

    Same-dtype pairs exchange values in place, one tensor at a time (no copy of the model, and the
    parameters keep their storage): the slow copy holds the fast values until :meth:`undo`. fp32
    slow weights of fp16/bf16 parameters are rounded into the parameters, whose fast values wait in
    host memory (for parameters on an accelerator, none of its memory is used): the slow copy
    cannot hold them, since the fp32 values and their rounding together carry more than 32 bits.

    Args:
        pairs: ``(parameter, slow copy, name)`` for each parameter that has slow weights; every
            pair is checked before any is touched, so a bad one raises ``ValueError`` naming it
            and changes nothing.
    """

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor, str]]) -> None:
        for param, slow, name in pairs:
            if slow.shape != param.shape:
                raise ValueError(
                    f"cannot put the slow weights of {name} into it: they have shape "
                    f"{tuple(slow.shape)} and the parameter has shape {tuple(param.shape)} (was "
                    "it replaced through param.data = ...?)"
                )
        # (parameter, slow copy, the fast values in host memory or None: in the slow copy)
        self._entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        try:
            with torch.no_grad():
                for param, slow, _ in pairs:
                    if slow.dtype == param.dtype:
                        _swap_(param, slow)
                        self._entries.append((param, slow, None))
                    else:
                        stash = param.detach().to("cpu", copy=True)
                        param.copy_(slow)
                        self._entries.append((param, slow, stash))
        except BaseException:
            self.undo()
            raise

    def slow_and_fast(self) -> dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Where the slow weights and the fast values of each swapped parameter are now."""
        return {
            param: (param.detach(), slow) if stash is None else (slow, stash)
            for param, slow, stash in self._entries
        }

    def undo(self) -> None:
        """Put the fast values back into the parameters."""
        with torch.no_grad():
            while self._entries:
                param, slow, stash = self._entries.pop()
                if stash is None:
                    _swap_(param, slow)
                else:
                    param.copy_(stash)


class LoadedFastWeights:
    """Fast weights that a checkpoint saved in evaluation mode carries (its model state dict holds
    the slow weights), kept until training resumes so that the model's and the optimizer's state
    dicts may be loaded in either order.

    They go into their parameters at once, and again at the first of: any module's forward pass
    (a global forward pre-hook: the gradient of the next step is taken there), ``step()``,
    ``sync()``, ``train()`` and ``eval()`` of the optimizer; so a model state dict loaded in
    between (which puts the slow weights into the parameters) does not change where training
    resumes. The hook holds the optimizer's fast weights only, not the optimizer, and is removed
    once they are back.
    """

    def __init__(self, fast: dict[torch.Tensor, torch.Tensor]) -> None:
        self._fast = fast
        self._hook = None
        if fast:
            self._copy_in()
            self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._on_forward)

    def pending(self) -> dict[torch.Tensor, torch.Tensor]:
        """The parameters and their loaded fast weights, while they are still to be put back."""
        return self._fast

    def put_back(self) -> None:
        """Put the loaded fast weights into their parameters (again), once."""
        if self._fast:
            self._copy_in()
        self.discard()

    def discard(self) -> None:
        """Forget them (another checkpoint was loaded)."""
        self._fast = {}
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _copy_in(self) -> None:
        with torch.no_grad():
            for param, fast in self._fast.items():
                param.copy_(fast)

    def _on_forward(self, module: torch.nn.Module, args: Any) -> None:
        self.put_back()

    def __getstate__(self) -> dict[str, Any]:
        # A hook handle does not travel: a copy puts its weights back at its optimizer's calls.
        return {"_fast": self._fast, "_hook": None}
