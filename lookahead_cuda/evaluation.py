"""Evaluation on the slow weights: the parameters hold them while the fast values wait; and the fast
weights of a checkpoint saved so, waiting for training to resume."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from lookahead_cuda.keys import SLOW_PARAM, parameter_name

State = Mapping[torch.Tensor, Mapping[str, torch.Tensor]]


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

    @classmethod
    def of(cls, groups: Sequence[Mapping[str, Any]], state: State) -> SlowWeightsInParameters:
        """The parameters of ``groups`` that have slow weights in ``state``, holding them."""
        if state and not any(group["params"] for group in groups):
            raise RuntimeError(
                "Lookahead.eval(): no param group holds a tensor now, though slow weights exist "
                "(DeepSpeed ZeRO-3 empties the groups between steps); under DeepSpeed use "
                "lookahead_cuda.deepspeed_zero.slow_weights(engine)"
            )
        return cls(
            [
                (param, state[param][SLOW_PARAM], parameter_name(i, j))
                for i, group in enumerate(groups)
                for j, param in enumerate(group["params"])
                if SLOW_PARAM in state.get(param, {})
            ]
        )

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


def slow_state_dict(
    module: torch.nn.Module,
    state: State,
    swapped: Mapping[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with each parameter that has slow weights in ``state`` replaced by
    a copy of them in the parameter's dtype and device (``swapped``: where the slow weights of
    parameters that hold them are, in evaluation mode). Refused when ``state`` has slow weights
    but none for ``module``'s trainable parameters (another model, or DeepSpeed's flat copies)."""
    dict_ = module.state_dict()
    found = False
    with torch.no_grad():
        for key, param in module.named_parameters(remove_duplicate=False):
            slow = state.get(param, {}).get(SLOW_PARAM)
            if slow is None or key not in dict_:
                continue
            if param in swapped:
                slow = swapped[param][0]
            dict_[key] = slow.detach().to(param.device, param.dtype, copy=True)
            found = True
    trainable = any(param.requires_grad for param in module.parameters())
    if not found and trainable and any(SLOW_PARAM in entry for entry in state.values()):
        raise ValueError(
            f"slow_state_dict: none of the {type(module).__name__}'s parameters is one this "
            "Lookahead steps, so it has no slow weights for them (under DeepSpeed ZeRO, which "
            "steps flat copies of them, use lookahead_cuda.deepspeed_zero.slow_state_dict)"
        )
    return dict_


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


class EvaluationMode:
    """Which weights a Lookahead's parameters hold: the fast ones (training mode) or the slow ones
    (evaluation mode, between ``eval()`` and ``train()``); and the fast weights of a loaded
    checkpoint that was saved in evaluation mode, until training resumes."""

    def __init__(self) -> None:
        self._swapped: SlowWeightsInParameters | None = None
        self._entered: tuple[Sequence[Mapping[str, Any]], State] | None = None
        self._loaded = LoadedFastWeights({})

    @property
    def training(self) -> bool:
        return self._swapped is None

    def enter(self, groups: Sequence[Mapping[str, Any]], state: State) -> None:
        """Evaluation mode: the parameters of ``groups`` that have slow weights hold them."""
        self._loaded.put_back()
        if self._swapped is None:
            self._swapped = SlowWeightsInParameters.of(groups, state)
            self._entered = (groups, state)

    def leave(self) -> None:
        """Training mode: the fast weights back in the parameters."""
        self._loaded.put_back()
        if self._swapped is not None:
            self._swapped.undo()
            self._swapped = None

    @contextlib.contextmanager
    def left(self) -> Iterator[None]:
        """Training mode inside the block (each copy holding its own weights again), then the
        mode it was in: for what reads the slow copies as slow weights."""
        if self._swapped is None or self._entered is None:
            yield
            return
        self._swapped.undo()
        self._swapped = None
        try:
            yield
        finally:
            self._swapped = SlowWeightsInParameters.of(*self._entered)

    def check_training(self, what: str) -> None:
        """Raise unless in training mode (after putting back loaded fast weights)."""
        self._loaded.put_back()
        if self._swapped is not None:
            raise RuntimeError(
                f"Lookahead.{what}() in evaluation mode: the parameters hold the slow weights; "
                "call opt.train() first (or leave the slow_weights() block)"
            )

    def slow_and_fast(self) -> dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Where the slow and the fast weights of each parameter that holds the slow ones are."""
        return self._swapped.slow_and_fast() if self._swapped is not None else {}

    def fast_elsewhere(self) -> dict[torch.Tensor, torch.Tensor]:
        """The fast weights of parameters that do not hold them: in evaluation mode, and a loaded
        checkpoint's until they are put back."""
        fast = dict(self._loaded.pending())
        fast.update((param, f) for param, (_, f) in self.slow_and_fast().items())
        return fast

    def loaded(self, fast: dict[torch.Tensor, torch.Tensor]) -> None:
        """A checkpoint was loaded: training mode, the parameters keeping what they hold (in
        evaluation mode, the fast values waiting are the old run's), and ``fast``, the fast
        weights it carries, going into the parameters now and again when training resumes."""
        self._swapped = None
        self._loaded.discard()
        self._loaded = LoadedFastWeights(fast)
