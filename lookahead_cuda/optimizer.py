"""The Lookahead optimizer: k steps forward with any inner optimizer, then one step back.

The class is a facade, as torch.optim's classes are: it keeps the bookkeeping (the inner
optimizer's groups and state, the settings, evaluation mode, checkpoints) and delegates the rest,
in the order of a step: :mod:`~lookahead_cuda.planner` plans and validates the syncs of each set of
tensors once, :mod:`~lookahead_cuda.counters` says when they are due, and
:mod:`~lookahead_cuda.outer_step` runs them through the functional core
(:mod:`~lookahead_cuda.functional`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lookahead_cuda import amp, checkpoint, diloco, evaluation
from lookahead_cuda.counters import StepCounters
from lookahead_cuda.evaluation import EvaluationMode
from lookahead_cuda.keys import (
    ALPHA,
    INNER_STATE,
    MOMENTUM,
    NESTEROV,
    NONFINITE,
    SETTINGS,
    SLOW_DTYPE,
    K,
)
from lookahead_cuda.offload import StagingBuffers
from lookahead_cuda.outer_step import OuterStep, Planned
from lookahead_cuda.planner import Planner
from lookahead_cuda.settings import GroupSetting, check_settings
from lookahead_cuda.slow_copies import SlowCopies


class Lookahead(Optimizer):
    r"""Lookahead (Zhang et al., 2019): k steps forward with ``optimizer``, then one step back.

    Every ``k`` steps of the inner optimizer, the slow weights move toward the fast ones and the
    fast weights restart from them::

        slow <- slow + alpha * (fast - slow)
        fast <- slow

    Both happen in one fused kernel call per (device, dtype pair) for all parameters. The slow
    weights are copied from the parameters at the first :meth:`step` that sees them, so weights
    loaded after construction are what Lookahead starts from.

    Args:
        optimizer (Optimizer): the inner optimizer. Lookahead shares its ``param_groups`` and
            ``state`` (``opt.state[p]["exp_avg"]`` is the inner optimizer's buffer), so LR
            schedulers, ``zero_grad`` and ``add_param_group`` behave as with the inner optimizer
            alone.
        k (int, optional): inner steps between two slow updates (default: 5).
        alpha (float, optional): slow-weights step size, in (0, 1] (default: 0.5).
        inner_state (str, optional): what happens to the inner optimizer's per-parameter state at
            each slow update (default: ``"keep"``):

            * ``"keep"``: nothing (the paper's default);
            * ``"reset"``: restarted, as if the inner optimizer started afresh (state an optimizer
              creates at construction, such as Adagrad's, is recreated as it was);
            * ``"pullback"``: each first-moment buffer (``momentum_buffer`` of SGD and RMSprop
              with momentum, ``exp_avg`` of Adam, AdamW, Adamax, NAdam and RAdam) is interpolated
              with ``alpha`` toward its own slow copy, which starts at zero and is then set to the
              result, in the same fused call as the weights. Optimizers without a first moment
              (Adagrad, Adadelta, Rprop, ASGD, LBFGS, Adafactor) are rejected.
        slow_dtype (torch.dtype, optional): dtype of the slow weights; ``None`` keeps each
            parameter's dtype, ``torch.float32`` keeps fp32 slow weights (and fp32 slow copies of
            pulled-back buffers) for fp16/bf16 parameters (default: None).
        nonfinite (str, optional): what a slow update does when a fast weight of the group is NaN
            or infinite (default: ``"propagate"``):

            * ``"propagate"``: nothing special; the non-finite values reach the slow weights;
            * ``"restore"``: the divergence guard. The group's fast weights (and pulled-back
              buffers) restart from their slow copies, which are left untouched, so a blow-up
              between two syncs cannot poison them; :attr:`nonfinite_restores` counts these. The
              check is one more read of the fast weights at each sync, decided on the device.
        capturable (bool, optional): decide every sync on the device (default: False): the
            counters live there and every step launches the gated kernel, which reads them, so a
            whole step can be captured in a CUDA graph (``k`` and ``alpha`` with it). Not with
            ``inner_state="reset"``, which the host must see.
        slow_device (str or torch.device, optional): ``None`` keeps each parameter's slow weights
            on its device; ``"cpu"`` in (pinned) host memory, a sync sending the fast weights
            there in overlapped chunks for the CPU kernel. Not with ``capturable``
            (default: None).
        momentum (float, optional): the outer momentum, in [0, 1) (default: 0). Above 0 the sync
            is SNOO's outer step (Kallusky et al., 2025; DiLoCo's, without the averaging over
            workers) on the pseudo-gradient ``d = slow - fast``, with ``alpha`` its outer learning
            rate::

                b <- momentum * b + d
                slow <- slow - alpha * (d + momentum * b)    # nesterov=True
                slow <- slow - alpha * b                     # nesterov=False (heavy ball)
                fast <- slow

            in one fused pass; ``b`` is one more tensor per parameter in the slow dtype (beside the
            slow weights, in host memory too with ``slow_device="cpu"``), created the first time
            a group syncs with momentum. 0 is Lookahead's update, bitwise.
        nesterov (bool, optional): Nesterov's outer momentum, or heavy ball (default: True).
        process_group (torch.distributed.ProcessGroup, optional): DiLoCo (Douillard et al., 2023):
            each process trains a replica on its own data with no communication between syncs,
            and each sync first averages the fast weights over the processes, then takes the
            outer step (with ``momentum=0.9, alpha=0.7`` DiLoCo's). The processes start from the
            first one's weights and must agree on settings and shapes (checked; all raise alike
            otherwise); every step counts, GradScaler's skipped ones too. Not with
            ``capturable``, compiled steps or FSDP2 parameters (default: None).
        pseudo_gradient_dtype (torch.dtype, optional): with a ``process_group``, send the
            pseudo-gradients ``slow - fast`` in this dtype instead of the fast weights in the slow
            dtype: ``torch.bfloat16`` halves fp32's bytes; ``torch.int8`` sends 8-bit blocks
            with a float32 scale each, gathered and averaged after dequantizing (default: None).
        fragments (int or list of lists of tensors, optional): with a ``process_group``,
            Streaming DiLoCo: each group's parameters in this many fragments of about equal
            bytes (or these lists, each parameter in one), fragment f syncing when the count
            reaches (f + 1) * k / fragments; k must be a multiple (default: 1).
        sync_delay (int, optional): with a ``process_group``, start a fragment's average this
            many inner steps before its sync, asynchronously; below k / fragments (default: 0).
        fragment_mixing (float, optional): with a delay, each worker's fragment becomes
            ``fragment_mixing * local + (1 - fragment_mixing) * global`` at its sync
            (default: 0.5).

    ``k``, ``alpha``, ``inner_state``, ``slow_dtype``, ``nonfinite``, ``momentum`` and
    ``nesterov`` are stored in every param group as ``lookahead_k``, ..., ``lookahead_nesterov``;
    set them per group there, or for all groups through the attributes of the same names. The
    step count is an int64 tensor in :attr:`lookahead_state`, kept with the group's first
    parameter as torch.optim keeps ``step``. Each set of tensors a group holds (DeepSpeed ZeRO-3
    swaps them) keeps its own slow weights and count.

    :meth:`eval` puts the slow weights into the parameters for evaluation and :meth:`train` puts
    the fast ones back (transformers' Trainer and accelerate call them); :meth:`slow_weights` is
    the scoped form.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        k: int = 5,
        alpha: float = 0.5,
        inner_state: str = "keep",
        slow_dtype: torch.dtype | None = None,
        nonfinite: str = "propagate",
        capturable: bool = False,
        slow_device: str | torch.device | None = None,
        momentum: float = 0.0,
        nesterov: bool = True,
        process_group: Any = None,
        pseudo_gradient_dtype: torch.dtype | None = None,
        fragments: int | Sequence[Sequence[torch.Tensor]] = 1,
        sync_delay: int = 0,
        fragment_mixing: float = 0.5,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Lookahead wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, Lookahead):
            raise TypeError("Lookahead cannot wrap another Lookahead")
        values = (k, alpha, inner_state, slow_dtype, nonfinite, momentum, nesterov)
        settings = dict(zip(SETTINGS, values))
        self.optimizer = optimizer
        self.capturable = capturable
        self._workers = diloco.Workers(
            process_group, pseudo_gradient_dtype, fragments, sync_delay, fragment_mixing
        )
        groups = [{**settings, **group} for group in optimizer.param_groups]

        def check_arguments() -> None:
            if not isinstance(capturable, bool):
                raise TypeError(f"Invalid capturable: {capturable!r}; expected True or False")
            self._workers.check(capturable)
            self._copies = SlowCopies(slow_device, capturable)
            self._check_settings(settings, "Lookahead()")
            for group in groups:
                self._check_settings(group, "a param group of the inner optimizer")

        # DiLoCo's workers check alike (describe() assigns each parameter its fragment): one that
        # rejects its arguments makes all raise.
        self._workers.checked(check_arguments, lambda: diloco.describe(groups, self._workers))
        self.slow_device = self._copies.slow_device
        #: Lookahead's own per-parameter state: ``slow_param``, ``outer_momentum``, the pullback
        #: buffers' slow copies (``slow_exp_avg``, ...), and in each group's first parameter the
        #: ``step`` counter (and with ``nonfinite="restore"``, the ``nonfinite_restores`` count).
        self.lookahead_state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        self._counters = StepCounters(self.lookahead_state, capturable, self._workers)
        self._planner = Planner(self.lookahead_state, self._copies, self._counters, self._workers)
        offload = StagingBuffers() if self.slow_device is not None else None
        self._outer_step = OuterStep(
            optimizer, self.lookahead_state, self._copies, self._counters, offload, self._workers
        )
        self._mode = EvaluationMode()
        # GradScaler leaves unscaling and skipping to optimizers that say so (fused Adam, ...);
        # mirroring the flag keeps such an inner optimizer on its fast path. Under a process group
        # Lookahead says so for any inner optimizer, to see (and count) the steps GradScaler skips.
        self._inner_handles_grad_scaler = getattr(optimizer, "_step_supports_amp_scaling", False)
        self._step_supports_amp_scaling = (
            self._inner_handles_grad_scaler or process_group is not None
        )
        # Optimizer.__init__ installs the hooks machinery and re-adds every group through
        # add_param_group; while adopting, that only gives the inner groups Lookahead's settings.
        self._adopting = True
        super().__init__(optimizer.param_groups, {**optimizer.defaults, **settings})
        self._adopting = False
        if process_group is not None:
            params = (p for group in self.param_groups for p in group["params"])
            diloco.broadcast_from_first_worker(params, process_group)

    # The inner optimizer owns param_groups and state; Lookahead's views follow it even when the
    # inner optimizer replaces them (its load_state_dict does).
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        if not self._adopting:
            self.optimizer.param_groups = groups

    @property  # type: ignore[override]
    def state(self) -> defaultdict[torch.Tensor, Any]:
        return self.optimizer.state

    @state.setter
    def state(self, state: defaultdict[torch.Tensor, Any]) -> None:
        if not self._adopting:
            self.optimizer.state = state

    def __getstate__(self) -> dict[str, Any]:
        # All of it (torch.optim's keeps only defaults, state and param_groups); each part leaves
        # out what does not travel: plans, staging buffers, the process group.
        return self.__dict__.copy()

    @property
    def process_group(self) -> Any:
        """DiLoCo's process group, or None. Not pickled or copied with the optimizer: set it
        again on a copy."""
        return self._workers.group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self._workers.group = group

    @property
    def pseudo_gradient_dtype(self) -> torch.dtype | None:
        return self._workers.pseudo_gradient_dtype

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        settings = ", ".join(
            f"{key.removeprefix('lookahead_')}={self.defaults[key]!r}" for key in SETTINGS
        )
        return (
            f"Lookahead({settings}, capturable={self.capturable}, "
            f"slow_device={self.slow_device},\n{inner}\n)"
        )

    # -- settings -----------------------------------------------------------------------------

    k = GroupSetting(K, "Inner steps between slow updates.")
    alpha = GroupSetting(ALPHA, "Slow-weights step size in (0, 1].")
    inner_state = GroupSetting(
        INNER_STATE, "What a slow update does to the inner optimizer's state."
    )
    slow_dtype = GroupSetting(
        SLOW_DTYPE, "Dtype of slow weights taken from now on (None: each parameter's own)."
    )
    nonfinite = GroupSetting(NONFINITE, "What a slow update does with non-finite fast weights.")
    momentum = GroupSetting(MOMENTUM, "Outer momentum in [0, 1) (0: Lookahead).")
    nesterov = GroupSetting(NESTEROV, "Nesterov's outer momentum (True) or heavy ball (False).")

    #: The param-group keys of this optimizer's own settings (a subclass adds its own).
    _SETTING_KEYS: tuple[str, ...] = SETTINGS

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer; Lookahead settings the group does not name
        default to the constructor's. Its slow weights are taken at the next :meth:`step`."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        self._check_settings({**self.defaults, **param_group}, "the new param group")
        for key in SETTINGS:
            param_group.setdefault(key, self.defaults[key])
        if not self._adopting:
            self.optimizer.add_param_group(param_group)
            self._planner.forget()

    # -- stepping -----------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One inner step; every k-th, the slow update.

        Under ``torch.amp.GradScaler`` a skipped step (inf/NaN gradients) does not count toward k.
        A step whose slow update would be rejected (a parameter replaced by one of another shape,
        say) raises before the inner step runs, and changes nothing.
        """
        found_inf = getattr(self, "found_inf", None)
        try:
            return self._step(closure, found_inf)
        except BaseException:
            if found_inf is not None:
                # GradScaler removes the attributes it set only after a step that returned: left,
                # the next plain step() would unscale the gradients by a stale scale.
                self.__dict__.pop("grad_scale", None)
                self.__dict__.pop("found_inf", None)
            raise

    def _step(
        self, closure: Callable[[], float] | None, found_inf: torch.Tensor | None
    ) -> float | None:
        # Plans (validated if a sync may come) -> inner step -> count -> outer step.
        self._mode.check_training("step")
        if self.process_group is not None:
            diloco.check_step()
        planned = self._planned(self._counters.may_sync_after_this_step)
        loss = amp.inner_step(
            self.optimizer,
            self._before_inner_step(closure),
            found_inf,
            getattr(self, "grad_scale", None),
            self._inner_handles_grad_scaler,
        )
        # Workers that skipped different steps would call the sync's collective at different
        # steps, so under a process group every step counts.
        with torch.no_grad():
            self._outer_step.count(planned, found_inf if self.process_group is None else None)
        return loss

    def _before_inner_step(self, closure: Callable[[], float] | None) -> Callable[[], float] | None:
        """Runs after every check of a step and before the inner step, and returns the closure
        the inner step gets: a subclass's way to prepare the gradients (Ranger centralizes them)."""
        return closure

    def sync(self) -> None:
        """Run the slow update now for every param group, and restart their k counts."""
        self._mode.check_training("sync")
        with torch.no_grad():
            self._outer_step.finish_in_flight()
            self._outer_step.run_all(self._planned(lambda group: True))

    @property
    def nonfinite_restores(self) -> int:
        """How many group syncs found a non-finite fast weight and restored the slow weights
        (``nonfinite="restore"``), summed over the param groups. Reading it waits for the device."""
        return self._counters.restores(self.param_groups)

    def _give_settings_to_added_groups(self) -> None:
        # A group added through the inner optimizer (inner.add_param_group) has none of
        # Lookahead's keys: the defaults, as add_param_group gives them.
        for group in self.param_groups:
            if not all(key in group for key in self._SETTING_KEYS):
                for key in self._SETTING_KEYS:
                    group.setdefault(key, self.defaults[key])

    def _planned(self, may_sync: Callable[[Mapping[str, Any]], bool]) -> list[Planned]:
        self._give_settings_to_added_groups()
        return self._planner.planned(
            self.param_groups,
            may_sync,
            self._check_settings,
        )

    def _check_settings(self, settings: Mapping[str, Any], where: str) -> None:
        check_settings(settings, where, self.optimizer, self.capturable)
        self._workers.check_period(settings[K], where)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict with Lookahead's tensors added to each parameter's
        entry (``lookahead_slow_param``, ...) and its settings in every group: torch.optim's
        layout (:mod:`~lookahead_cuda.checkpoint`). In evaluation mode it also holds the fast
        weights (``lookahead_fast_param``). State-dict hooks run as torch.optim's do."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._give_settings_to_added_groups()
        in_flight = None
        if self._workers.sync_delay:
            # An average that arrives now is read against the slow weights: in their copies.
            with self._mode.left() if self._outer_step.waiting() else contextlib.nullcontext():
                in_flight = self._outer_step.in_flight()
        state_dict = checkpoint.dump(
            self.optimizer.state_dict(),
            [p for group in self.param_groups for p in group["params"]],
            self.lookahead_state,
            self._mode.fast_elsewhere(),
            {param: slow for param, (slow, _) in self._mode.slow_and_fast().items()},
            in_flight,
            self.process_group,
        )
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or the bare inner optimizer's: slow weights
        are then taken afresh at the next step), all of it validated first: a rejected one raises
        ``ValueError``/``TypeError`` naming the entry and changes nothing. Loading leaves training
        mode. The fast weights of a dict taken in evaluation mode go into the parameters at once
        and again at the first forward pass of any module, :meth:`step`, :meth:`sync`,
        :meth:`train` or :meth:`eval`: the model's state dict may be loaded before or after."""
        state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        loaded = checkpoint.parse(
            state_dict,
            self.param_groups,
            self._check_settings,
            self._copies,
            self._counters.home,
            diloco.worker_of(self.process_group),
        )
        checkpoint.load_inner(self.optimizer, loaded.inner)
        self._mode.loaded(loaded.fast)  # committed: nothing below fails
        self.lookahead_state.clear()
        self.lookahead_state.update(loaded.state)
        self._outer_step.finish_in_flight()
        self._outer_step.resume(loaded.in_flight)
        self._planner.forget()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- evaluation ---------------------------------------------------------------------------

    def eval(self) -> Lookahead:
        """Put the slow weights into the parameters, for evaluation (the paper's final model);
        :meth:`train` puts the fast weights back. Same-dtype parameters exchange values in place
        with their slow copies, one tensor at a time (no copy of the model is made, and
        parameters keep their storage); fp32 slow weights of fp16/bf16 parameters are rounded
        into the parameters, whose fast values wait in host memory. Idempotent; ``step()`` and
        ``sync()`` raise until :meth:`train`. Every parameter is checked before any is touched."""
        self._mode.enter(self.param_groups, self.lookahead_state)
        return self

    def train(self, mode: bool = True) -> Lookahead:
        """Put the fast weights back into the parameters (training mode); ``train(False)`` is
        :meth:`eval`. Idempotent."""
        if not mode:
            return self.eval()
        self._mode.leave()
        return self

    @property
    def training(self) -> bool:
        """False between :meth:`eval` and :meth:`train`, while the parameters hold the slow
        weights."""
        return self._mode.training

    def slow_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``module.state_dict()`` with each parameter that has slow weights replaced by a copy of
        them in the parameter's dtype and device: the model the paper evaluates, to save for
        deployment (``torch.save(opt.slow_state_dict(model), path)``, then ``load_state_dict``
        into a model of the same architecture). Nothing is swapped, so it can be called at any
        point of training, in either mode. Refused when this optimizer has slow weights but none
        for ``module``'s trainable parameters (another model, or DeepSpeed's flat copies); a
        frozen module's is its own."""
        return evaluation.slow_state_dict(module, self.lookahead_state, self._mode.slow_and_fast())

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Inside the block the parameters hold the slow weights; on exit the fast weights return
        (:meth:`eval` and :meth:`train`, scoped). Inside a block or after :meth:`eval`, it changes
        nothing and leaves the mode as it found it. Do not step the optimizer inside the block."""
        if not self._mode.training:
            yield
            return
        self.eval()
        try:
            yield
        finally:
            self.train()
