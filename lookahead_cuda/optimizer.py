"""The Lookahead optimizer: k steps forward with any inner optimizer, then one step back.

The class keeps the bookkeeping: the inner optimizer's groups and state, the settings, the step
counters, the life of the slow copies, checkpoints and evaluation. How a sync runs is decided by
the functional core (:mod:`lookahead_cuda.functional`).
"""

from __future__ import annotations

import contextlib
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from lookahead_cuda import amp, checkpoint, functional
from lookahead_cuda.evaluation import LoadedFastWeights, SlowWeightsInParameters
from lookahead_cuda.inner_state import InitialInnerState, first_moments
from lookahead_cuda.offload import StagingBuffers
from lookahead_cuda.ops import SUPPORTED_DTYPE_PAIRS
from lookahead_cuda.settings import (
    ALPHA,
    INNER_STATE,
    KEYS,
    MOMENTUM,
    NESTEROV,
    NONFINITE,
    SLOW_DTYPE,
    GroupSetting,
    K,
    check_settings,
)
from lookahead_cuda.slow_copies import SlowCopies

SLOW_PARAM = checkpoint.SLOW_PARAM
OUTER_MOMENTUM = checkpoint.OUTER_MOMENTUM
STEP = checkpoint.STEP
RESTORES = checkpoint.RESTORES


@dataclass
class _GroupPlan:
    """What the syncs of a param group holding exactly ``params`` need, built when that set of
    tensors is first stepped: the (slow weights, parameter) buckets, with the outer momentum
    buffers when the group has momentum, and the process group of FSDP2's mesh when the parameters
    are DTensors (None otherwise)."""

    params: tuple[torch.Tensor, ...]
    weights: functional.Buckets
    with_momentum: bool
    sharded_over: Any

    def holds(self, params: list[torch.Tensor], with_momentum: bool) -> bool:
        return (
            self.with_momentum == with_momentum
            and len(self.params) == len(params)
            and all(map(operator.is_, self.params, params))
        )

    def moved(self, copies: SlowCopies) -> bool:
        """Whether a bucket's tensors are no longer where it was built (``model.to(...)``)."""
        return any(
            bucket.fast[0].device != device
            or bucket.fast[0].dtype != fast_dtype
            or bucket.slow[0].device != copies.home(bucket.fast[0])
            for (device, _, fast_dtype), bucket in self.weights.items()
        )


def _check_averaging(
    process_group: Any, pseudo_gradient_dtype: torch.dtype | None, capturable: bool
) -> None:
    if process_group is None:
        if pseudo_gradient_dtype is not None:
            raise ValueError(
                "pseudo_gradient_dtype is the dtype the pseudo-gradients are averaged over the "
                "workers in; it needs a process_group"
            )
        return
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        raise ValueError("process_group needs torch.distributed initialized (init_process_group)")
    if not isinstance(process_group, distributed.ProcessGroup):
        raise TypeError(
            f"Invalid process_group: {process_group!r}; expected a torch.distributed process "
            "group (torch.distributed.group.WORLD, or one from new_group)"
        )
    if pseudo_gradient_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"Invalid pseudo_gradient_dtype: {pseudo_gradient_dtype!r}; expected None (average "
            "the fast weights in the slow dtype), torch.float32, torch.bfloat16 or torch.float16"
        )
    if capturable:
        raise ValueError(
            "process_group averages over the workers at each sync with a collective that the host "
            "calls, which a capturable step never does; use one or the other"
        )


def _with_momentum(group: Mapping[str, Any]) -> bool:
    # A branch, not bool(): torch.compile may trace a float setting as a symbolic float, and only a
    # branch makes it decide (and guard on) the comparison; a symbolic bool compared with a
    # Python bool fails inside dynamo.
    return True if group[MOMENTUM] > 0 else False  # noqa: SIM210


def _name(group_index: int, param_index: int) -> str:
    return f"parameter {param_index} of param group {group_index}"


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
        capturable (bool, optional): decide every sync on the device (default: False). The step
            counters live on the parameters' device and each step launches the gated kernel,
            which reads the counter itself: no host synchronization and no Python branch on a
            tensor, so a whole training step can be captured in a CUDA graph and replayed, with
            the slow update happening on exactly every k-th replay. ``k`` and ``alpha`` are
            captured with the graph. Not with ``inner_state="reset"``, which the host must see.
        slow_device (str or torch.device, optional): ``None`` keeps each parameter's slow weights
            on its device; ``"cpu"`` keeps them in host memory (pinned for CUDA parameters), saving
            their device memory for models that are memory-bound. A sync then sends the fast
            weights to the host in chunks, updates them there with the CPU kernel and sends them
            back, transfers overlapped with the kernel; the host waits for it. Not with
            ``capturable`` (default: None).
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
            every process trains a replica of the model on its own data with no communication
            between syncs (no DDP), and each sync first averages the fast weights over the
            group's processes (flat all-reduces of DDP's 25 MiB), then takes the outer step
            (with ``momentum=0.9, alpha=0.7`` DiLoCo's). Every process starts from the group's
            first process's parameters (broadcast at construction, as DDP does, and again when the
            slow weights are taken); the slow weights then stay identical on every process, as do
            the counters: every step counts (GradScaler's skipped steps too), so
            that all processes sync together. With ``nonfinite="restore"`` a blow-up on any
            process makes every process restore. Not with ``capturable``, compiled steps or FSDP2
            parameters (default: None).
        pseudo_gradient_dtype (torch.dtype, optional): with a ``process_group``, send the
            pseudo-gradients ``slow - fast`` in this dtype instead of the fast weights in the slow
            dtype: ``torch.bfloat16`` halves fp32's bytes (default: None).

    ``k``, ``alpha``, ``inner_state``, ``slow_dtype``, ``nonfinite``, ``momentum`` and
    ``nesterov`` are stored in every param group as ``lookahead_k``, ``lookahead_alpha``, ...,
    ``lookahead_nesterov``; set them per group there, or for all groups through the attributes of
    the same names. The step count since the last slow update is
    an integer tensor in :attr:`lookahead_state`, kept with the group's first parameter as
    torch.optim keeps ``step``, so ``torch.compile`` does not recompile as it advances (inside a
    compiled step, syncs are decided on the device as with ``capturable``). A group's parameters
    may change between steps (DeepSpeed ZeRO-3 swaps its partitions in and out): each set of
    tensors a group holds keeps its own slow weights and count. Parameters without a gradient
    still take part in slow updates (their slow weights simply equal the fast ones).

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
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Lookahead wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, Lookahead):
            raise TypeError("Lookahead cannot wrap another Lookahead")
        settings = {
            K: k,
            ALPHA: alpha,
            INNER_STATE: inner_state,
            SLOW_DTYPE: slow_dtype,
            NONFINITE: nonfinite,
            MOMENTUM: momentum,
            NESTEROV: nesterov,
        }
        if not isinstance(capturable, bool):
            raise TypeError(f"Invalid capturable: {capturable!r}; expected True or False")
        check_settings(settings, "Lookahead()", optimizer, capturable)
        if slow_device is not None and torch.device(slow_device).type != "cpu":
            raise ValueError(
                f"Invalid slow_device: {slow_device!r}; expected None (each parameter's device) "
                "or 'cpu'"
            )
        if slow_device is not None and capturable:
            raise ValueError(
                "slow_device='cpu' updates the slow weights on the host, which a capturable step "
                "never waits for; use one or the other"
            )
        _check_averaging(process_group, pseudo_gradient_dtype, capturable)
        for group in optimizer.param_groups:
            check_settings(
                {**settings, **group}, "a param group of the inner optimizer", optimizer, capturable
            )

        self.optimizer = optimizer
        self.capturable = capturable
        self.slow_device = None if slow_device is None else torch.device(slow_device)
        self.process_group = process_group
        self.pseudo_gradient_dtype = pseudo_gradient_dtype
        self._copies = SlowCopies(self.slow_device)
        self._staging = StagingBuffers()
        self._initial_inner_state = InitialInnerState(optimizer)
        #: Lookahead's own per-parameter state: ``slow_param``, ``outer_momentum``, the pullback
        #: buffers' slow copies (``slow_exp_avg``, ...), and in each group's first parameter the
        #: ``step`` counter (and with ``nonfinite="restore"``, the ``nonfinite_restores`` count).
        self.lookahead_state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        # Keyed by (group index, id of its first parameter, its length); see _plan.
        self._plans: dict[tuple[int, int, int], _GroupPlan] = {}
        #: The parameters holding the slow weights (evaluation mode), or None (training mode).
        self._evaluation: SlowWeightsInParameters | None = None
        #: Fast weights of a checkpoint saved in evaluation mode, until training resumes.
        self._loaded_fast_weights = LoadedFastWeights({})
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
            self._broadcast_from_first_worker(p for g in self.param_groups for p in g["params"])

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
        state = self.__dict__.copy()
        state["_plans"] = {}
        state["_staging"] = StagingBuffers()
        state["process_group"] = None  # a process group does not travel; set it again
        return state

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        settings = ", ".join(
            f"{key.removeprefix('lookahead_')}={self.defaults[key]!r}" for key in KEYS
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer; Lookahead settings the group does not name
        default to the constructor's. Its slow weights are taken at the next :meth:`step`."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        check_settings(
            {**self.defaults, **param_group}, "the new param group", self.optimizer, self.capturable
        )
        for key in KEYS:
            param_group.setdefault(key, self.defaults[key])
        if not self._adopting:
            self.optimizer.add_param_group(param_group)
            self._forget_plans()

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
        if found_inf is None:
            return self._step(closure, None)
        try:
            return self._step(closure, found_inf)
        except BaseException:
            # GradScaler removes the attributes it set only after a step that returned: left, the
            # next plain step() would unscale the gradients by a stale scale.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    def _step(
        self, closure: Callable[[], float] | None, found_inf: torch.Tensor | None
    ) -> float | None:
        self._check_training("step")
        if self.process_group is not None and torch.compiler.is_compiling():
            raise RuntimeError(
                "Lookahead(process_group=...) cannot run in a compiled step yet: its syncs call a "
                "collective that the host decides on; compile the model, not the optimizer step"
            )
        plans = self._plans_of_groups()
        if not torch.compiler.is_compiling():
            # Syncs that may come at the end of this step are checked before the inner step runs.
            plans = self._check_syncs(plans, self._may_sync_after_this_step)
        if found_inf is None:
            loss = self.optimizer.step(closure)
        elif not self._inner_handles_grad_scaler:
            loss = amp.unscale_and_step(
                self.optimizer, closure, getattr(self, "grad_scale", None), found_inf
            )
        else:
            # GradScaler hands an amp-aware optimizer its scale and inf flag as attributes.
            self.optimizer.grad_scale = getattr(self, "grad_scale", None)
            self.optimizer.found_inf = found_inf
            try:
                loss = self.optimizer.step(closure)
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        with torch.no_grad():
            self._count_step(plans, found_inf)
        return loss

    def sync(self) -> None:
        """Run the slow update now for every param group, and restart their k counts."""
        self._check_training("sync")
        with torch.no_grad():
            plans = self._check_syncs(self._plans_of_groups(), lambda group: True)
            self._sync(plans, gated=False)

    @property
    def nonfinite_restores(self) -> int:
        """How many group syncs found a non-finite fast weight and restored the slow weights
        (``nonfinite="restore"``), summed over the param groups. Reading it waits for the device."""
        counts = [
            self.lookahead_state[group["params"][0]].get(RESTORES)
            for group in self.param_groups
            if group["params"]
        ]
        return sum(int(count.item()) for count in counts if count is not None)

    def _check_training(self, what: str) -> None:
        self._loaded_fast_weights.put_back()
        if self._evaluation is not None:
            raise RuntimeError(
                f"Lookahead.{what}() in evaluation mode: the parameters hold the slow weights; "
                "call opt.train() first (or leave the slow_weights() block)"
            )

    #: The param-group keys of this optimizer's own settings (a subclass adds its own).
    _SETTING_KEYS: tuple[str, ...] = KEYS

    def _give_settings_to_added_groups(self) -> None:
        # A group added through the inner optimizer (inner.add_param_group) has none of
        # Lookahead's keys: the defaults, as add_param_group gives them.
        for group in self.param_groups:
            if not all(key in group for key in self._SETTING_KEYS):
                for key in self._SETTING_KEYS:
                    group.setdefault(key, self.defaults[key])

    def _plans_of_groups(self) -> list[tuple[int, dict[str, Any], _GroupPlan]]:
        """(index, group, plan) of every group with parameters, its settings checked."""
        self._give_settings_to_added_groups()
        plans = []
        for index, group in enumerate(self.param_groups):
            check_settings(group, f"param group {index}", self.optimizer, self.capturable)
            if group["params"]:
                plans.append((index, group, self._plan(index, group)))
        return plans

    def _plan(self, index: int, group: dict[str, Any]) -> _GroupPlan:
        """The plan of the tensors the group holds now: found by (index, first tensor, length)
        and an identity check of every tensor, or made (slow weights taken) if they are new."""
        params = group["params"]
        key = (index, id(params[0]), len(params))
        plan = self._plans.get(key)
        if plan is None or not plan.holds(params, _with_momentum(group)):
            plan = self._make_plan(index, group)
            self._plans[key] = plan
        return plan

    def _make_plan(self, index: int, group: dict[str, Any]) -> _GroupPlan:
        params = group["params"]
        sharded_over = functional.mesh_group(params)
        if self.process_group is not None and sharded_over is not None:
            raise ValueError(
                f"param group {index} holds DTensors (FSDP2): each worker holds shards, which "
                "Lookahead(process_group=...) cannot average into a replica's outer step; average "
                "over workers that each hold whole parameters, or drop process_group"
            )
        missing = []
        for j, param in enumerate(params):
            if SLOW_PARAM not in self.lookahead_state.get(param, {}):
                dtype = self._copies.dtype(group[SLOW_DTYPE], param)
                if (dtype, param.dtype) not in SUPPORTED_DTYPE_PAIRS:
                    raise ValueError(
                        f"slow_dtype {dtype} cannot hold the slow weights of {_name(index, j)} "
                        f"({param.dtype}); supported (slow, parameter) dtypes: "
                        + ", ".join(f"({a}, {b})" for a, b in SUPPORTED_DTYPE_PAIRS)
                    )
                missing.append((param, dtype))
        with_momentum = _with_momentum(group)
        with torch.no_grad():
            if self.process_group is not None and missing:
                self._broadcast_from_first_worker(param for param, _ in missing)
            for param, dtype in missing:
                self.lookahead_state[param][SLOW_PARAM] = self._copies.copy(param, dtype, param)
            if with_momentum:
                for param in params:
                    ours = self.lookahead_state[param]
                    if OUTER_MOMENTUM not in ours:
                        ours[OUTER_MOMENTUM] = torch.zeros_like(ours[SLOW_PARAM])
            first = self.lookahead_state[params[0]]
            if STEP not in first:
                first[STEP] = torch.zeros(
                    (), dtype=torch.int64, device=self._counter_device(params[0])
                )
            if group[NONFINITE] == "restore":
                self._restores(group)  # here, so that a compiled step finds it ready
        return _GroupPlan(
            tuple(params),
            functional.bucket_pairs(
                ((self.lookahead_state[p][SLOW_PARAM], p) for p in params),
                (_name(index, j) for j in range(len(params))),
                (self.lookahead_state[p][OUTER_MOMENTUM] for p in params)
                if with_momentum
                else None,
            ),
            with_momentum,
            sharded_over,
        )

    def _broadcast_from_first_worker(self, params: Iterable[torch.Tensor]) -> None:
        """DiLoCo's workers start from one point, the group's first process's weights: at
        construction, as DDP does, and when slow weights are taken (of weights loaded since)."""
        source = torch.distributed.get_global_rank(self.process_group, 0)
        with torch.no_grad():
            for param in params:
                torch.distributed.broadcast(param.detach(), source, group=self.process_group)

    def _forget_plans(self) -> None:
        self._plans.clear()

    def _may_sync_after_this_step(self, group: Mapping[str, Any]) -> bool:
        counter = self._counter(group)
        return self._decides_on_device(counter) or int(counter) + 1 >= group[K]

    def _check_syncs(
        self,
        plans: list[tuple[int, dict[str, Any], _GroupPlan]],
        may_sync: Callable[[Mapping[str, Any]], bool],
    ) -> list[tuple[int, dict[str, Any], _GroupPlan]]:
        """Check every bucket the syncs of the groups that ``may_sync`` would call, so that a sync
        either runs or changes nothing (the inner step included: this runs before it); first
        follow parameters that moved since their slow weights were placed (which replaces the
        plans: the updated ones are returned). Syncs decided on the device are checked at every
        step: on the host, from the tensors' metadata, without waiting for the device."""
        checked = [(i, group, plan) for i, group, plan in plans if may_sync(group)]
        if not checked:
            return plans
        if any(plan.moved(self._copies) for _, _, plan in checked) and self._follow_parameters():
            plans = [(i, group, self._plan(i, group)) for i, group, _ in plans]
            checked = [(i, group, plan) for i, group, plan in plans if may_sync(group)]
        offload = self.slow_device is not None
        try:
            for _, group, plan in checked:
                functional.check_buckets(
                    plan.weights, group[ALPHA], momentum=group[MOMENTUM], offload=offload
                )
        except (TypeError, ValueError):
            # A partly moved model (one submodule moved) shows only here.
            if not self._follow_parameters():
                raise
            plans = [(i, group, self._plan(i, group)) for i, group, _ in plans]
            for _, group, plan in plans:
                if may_sync(group):
                    functional.check_buckets(
                        plan.weights, group[ALPHA], momentum=group[MOMENTUM], offload=offload
                    )
        return plans

    def _count_step(
        self, plans: list[tuple[int, dict[str, Any], _GroupPlan]], found_inf: torch.Tensor | None
    ) -> None:
        on_host, on_device = [], []
        for entry in plans:
            group = entry[1]
            counter = self._counter(group)
            if found_inf is None or self.process_group is not None:
                # Workers that skipped different steps would call the sync's collective at
                # different steps, so under a process group every step counts.
                counter += 1
            else:
                if found_inf.device.type != "cpu" and counter.device != found_inf.device:
                    # A fused inner optimizer learns of a skipped step on the device only: count
                    # there from now on, rather than wait for the device at every step.
                    counter = self._move_counter(group, found_inf.device)
                counter += 1 - found_inf.to(counter.device, counter.dtype)
            if self._decides_on_device(counter) and group[INNER_STATE] != "reset":
                on_device.append(entry)
            elif counter >= group[K]:  # with "reset" and a device counter, this waits for it
                on_host.append(entry)
        if on_host:
            self._sync(on_host, gated=False)
        if on_device:
            self._sync(on_device, gated=True)

    def _decides_on_device(self, counter: torch.Tensor) -> bool:
        # A Python branch on a tensor would break a compiled graph; one on a device tensor would
        # wait for the device.
        return self.capturable or counter.device.type != "cpu" or torch.compiler.is_compiling()

    def _counter(self, group: Mapping[str, Any]) -> torch.Tensor:
        # Kept with the group's first parameter, as torch.optim.LBFGS keeps its global state, so
        # that state_dict() stays in torch.optim's layout (parameter index -> tensors).
        return self.lookahead_state[group["params"][0]][STEP]

    def _move_counter(self, group: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        ours = self.lookahead_state[group["params"][0]]
        ours[STEP] = ours[STEP].to(device)
        return ours[STEP]

    def _counter_device(self, first_param: torch.Tensor) -> torch.device:
        if self.capturable or torch.compiler.is_compiling():
            return first_param.device
        return torch.device("cpu")

    def _restores(self, group: Mapping[str, Any]) -> torch.Tensor:
        """The group's count of restoring syncs, on its device, created at first need."""
        ours = self.lookahead_state[group["params"][0]]
        if RESTORES not in ours:
            ours[RESTORES] = torch.zeros((), dtype=torch.int64, device=group["params"][0].device)
        return ours[RESTORES]

    def _sync(self, plans: list[tuple[int, dict[str, Any], _GroupPlan]], gated: bool) -> None:
        """The slow update of each group of ``plans`` (gated=False: the host knows they are due),
        or of each one whose counter has reached k, decided on the device (gated=True). Groups
        synced unconditionally share one call per (alpha, momentum, device, dtype pair)."""
        offload = self._staging if self.slow_device is not None else None
        # (alpha, momentum, nesterov) -> the buckets synced with them, unconditionally
        unconditional: dict[tuple[float, float, bool], list[functional.Buckets]] = {}
        flags = []
        for index, group, plan in plans:
            device = group["params"][0].device
            due = self._counter(group) >= group[K] if gated else None
            restore = None
            agree_over = self.process_group if self.process_group is not None else plan.sharded_over
            if group[NONFINITE] == "restore":
                # Decided on each worker's own fast weights, before any averaging: a worker that
                # blew up makes every worker restore.
                restore = functional.nonfinite_flag(plan.weights, device, due, agree_over)
            if self.process_group is not None:
                functional.average_over_workers(
                    plan.weights,
                    self.process_group,
                    pseudo_gradient_dtype=self.pseudo_gradient_dtype,
                )
            momentum = float(group[MOMENTUM])  # a Python float even where torch.compile traces one
            calls = [((group[ALPHA], momentum, group[NESTEROV] or momentum == 0), plan.weights)]
            if group[INNER_STATE] == "pullback":
                # First moments have no outer momentum of their own: they are interpolated with
                # alpha whatever the weights' outer step is.
                calls.append(((group[ALPHA], 0.0, True), self._pullback_buckets(index, group)))
            for (alpha, mu, nesterov), buckets in calls:
                if due is None and restore is None:
                    unconditional.setdefault((alpha, mu, nesterov), []).append(buckets)
                else:
                    functional.sync_buckets(
                        buckets,
                        alpha,
                        momentum=mu,
                        nesterov=nesterov,
                        due=due,
                        restore=restore,
                        offload=offload,
                    )
            flags.append((group, due, restore))
        for (alpha, mu, nesterov), many in unconditional.items():
            functional.sync_buckets(
                functional.merge_buckets(many),
                alpha,
                momentum=mu,
                nesterov=nesterov,
                offload=offload,
            )
        for group, due, restore in flags:
            counter = self._counter(group)
            if due is None:
                counter.zero_()
            else:
                counter.masked_fill_(due.to(counter.device), 0)
            if restore is not None:
                restored = restore if due is None else restore & due.to(restore.device)
                self._restores(group).add_(restored.to(torch.int64))
            if group[INNER_STATE] == "reset":
                self._initial_inner_state.reset(self.optimizer.state, group["params"])

    def _pullback_buckets(self, index: int, group: Mapping[str, Any]) -> functional.Buckets:
        """The (slow copy, buffer) pairs of the group's first moments. The inner optimizer creates
        its buffers lazily (a parameter without a gradient has none yet), so they are collected at
        each sync instead of planned."""
        pairs, names = [], []
        for j, param in enumerate(group["params"]):
            ours = self.lookahead_state[param]
            for name, buffer in first_moments(self.optimizer.state.get(param) or {}):
                slow = ours.get("slow_" + name)
                if slow is None or slow.shape != buffer.shape:
                    dtype = self._copies.dtype(group[SLOW_DTYPE], buffer)
                    if (dtype, buffer.dtype) not in SUPPORTED_DTYPE_PAIRS:
                        # A slow_dtype set after the slow weights were taken (they keep theirs):
                        # made here, after the inner step, this copy must not fail the sync.
                        dtype = buffer.dtype
                    slow = self._copies.copy(buffer, dtype, buffer).zero_()
                elif not self._copies.is_placed(slow, buffer):  # the model moved
                    slow = self._copies.copy(
                        slow, self._copies.dtype(None, buffer, slow.dtype), buffer
                    )
                ours["slow_" + name] = slow
                pairs.append((slow, buffer))
                names.append(f"the {name} of {_name(index, j)}")
        return functional.bucket_pairs(pairs, names)

    def _follow_parameters(self) -> bool:
        """Move slow weights to their parameter's home (and a usable dtype); True if any moved.
        A slow copy of another shape than its parameter is left for validation to report."""
        moved = False
        with torch.no_grad():
            for group in self.param_groups:
                for param in group["params"]:
                    ours = self.lookahead_state.get(param, {})
                    slow = ours.get(SLOW_PARAM)
                    if slow is None or slow.shape != param.shape:
                        continue
                    if not self._copies.is_placed(slow, param):
                        dtype = self._copies.dtype(group[SLOW_DTYPE], param, kept=slow.dtype)
                        ours[SLOW_PARAM] = slow = self._copies.copy(slow, dtype, param)
                        moved = True
                    buffer = ours.get(OUTER_MOMENTUM)  # lives with the slow weights, in their dtype
                    if buffer is not None and (buffer.device, buffer.dtype) != (
                        slow.device,
                        slow.dtype,
                    ):
                        ours[OUTER_MOMENTUM] = self._copies.copy(buffer, slow.dtype, param)
                        moved = True
        if moved:
            self._forget_plans()
        return moved

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with Lookahead's per-parameter tensors added to each
        parameter's entry under ``lookahead_``-prefixed keys (``lookahead_slow_param``, ...) and
        its settings in every param group: torch.optim's layout, so tools that map parameter
        indices (distributed checkpointing) handle it like any optimizer's. In evaluation mode it
        also holds the fast weights (``lookahead_fast_param``), which loading puts back into the
        parameters. State-dict hooks registered on Lookahead run as torch.optim's do."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._give_settings_to_added_groups()
        state_dict = checkpoint.state_dict(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or from the bare inner optimizer, in which
        case slow weights are taken afresh at the next step). Slow weights land on their
        parameter's device. The whole dict is validated and converted before anything changes: a
        rejected one raises ``ValueError``/``TypeError`` naming the entry and leaves the optimizer
        as it was. Loading leaves the optimizer in training mode. A dict taken in evaluation mode
        carries the fast weights: they go into the parameters at once and again at the first
        forward pass of any module, :meth:`step`, :meth:`sync`, :meth:`train` or :meth:`eval`,
        so the model's state dict (which then holds the slow weights) may be loaded before or
        after this one."""
        state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        checkpoint.load_state_dict(self, state_dict)
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
        self._loaded_fast_weights.put_back()
        if self._evaluation is None:
            if self.lookahead_state and not any(group["params"] for group in self.param_groups):
                raise RuntimeError(
                    "Lookahead.eval(): no param group holds a tensor now, though slow weights "
                    "exist (DeepSpeed ZeRO-3 empties the groups between steps); under DeepSpeed "
                    "use lookahead_cuda.deepspeed_zero.slow_weights(engine)"
                )
            pairs = [
                (param, self.lookahead_state[param][SLOW_PARAM], _name(i, j))
                for i, group in enumerate(self.param_groups)
                for j, param in enumerate(group["params"])
                if SLOW_PARAM in self.lookahead_state.get(param, {})
            ]
            self._evaluation = SlowWeightsInParameters(pairs)
        return self

    def train(self, mode: bool = True) -> Lookahead:
        """Put the fast weights back into the parameters (training mode); ``train(False)`` is
        :meth:`eval`. Idempotent."""
        if not mode:
            return self.eval()
        self._loaded_fast_weights.put_back()
        if self._evaluation is not None:
            self._evaluation.undo()
            self._evaluation = None
        return self

    @property
    def training(self) -> bool:
        """False between :meth:`eval` and :meth:`train`, while the parameters hold the slow
        weights."""
        return self._evaluation is None

    def slow_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``module.state_dict()`` with each parameter that has slow weights replaced by a copy of
        them in the parameter's dtype and device: the model the paper evaluates, to save for
        deployment (``torch.save(opt.slow_state_dict(model), path)``, then ``load_state_dict``
        into a model of the same architecture). Nothing is swapped, so it can be called at any
        point of training, in either mode. Refused when this optimizer has slow weights but none
        for ``module``'s trainable parameters (another model, or DeepSpeed's flat copies); a
        frozen module's is its own."""
        state = module.state_dict()
        swapped = self._evaluation.slow_and_fast() if self._evaluation is not None else {}
        found = False
        with torch.no_grad():
            for name, param in module.named_parameters(remove_duplicate=False):
                slow = self.lookahead_state.get(param, {}).get(SLOW_PARAM)
                if slow is None or name not in state:
                    continue
                if param in swapped:
                    slow = swapped[param][0]
                state[name] = slow.detach().to(param.device, param.dtype, copy=True)
                found = True
        trainable = any(param.requires_grad for param in module.parameters())
        if not found and trainable and any(SLOW_PARAM in e for e in self.lookahead_state.values()):
            raise ValueError(
                f"slow_state_dict: none of the {type(module).__name__}'s parameters is one this "
                "Lookahead steps, so it has no slow weights for them (under DeepSpeed ZeRO, which "
                "steps flat copies of them, use lookahead_cuda.deepspeed_zero.slow_state_dict)"
            )
        return state

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Inside the block the parameters hold the slow weights; on exit the fast weights return
        (:meth:`eval` and :meth:`train`, scoped). Inside a block or after :meth:`eval`, it changes
        nothing and leaves the mode as it found it. Do not step the optimizer inside the block."""
        if self._evaluation is not None:
            yield
            return
        self.eval()
        try:
            yield
        finally:
            self.train()
