"""The Lookahead optimizer: k steps forward with any inner optimizer, then one step back."""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from lookahead_cuda.offload import StagingBuffers, offloaded_update_
from lookahead_cuda.ops import (
    SUPPORTED_DTYPE_PAIRS,
    found_nonfinite_,
    lookahead_update_,
    lookahead_update_if_,
)

# Lookahead's settings live in every param group next to the inner optimizer's hyperparameters
# (prefixed: RMSprop already has an `alpha`), so they can differ per group, are changed the way a
# scheduler changes `lr`, and travel with state_dict().
K = "lookahead_k"
ALPHA = "lookahead_alpha"
INNER_STATE = "lookahead_inner_state"
SLOW_DTYPE = "lookahead_slow_dtype"
NONFINITE = "lookahead_nonfinite"

# Per-parameter entries that Lookahead adds to state_dict()["state"][i], beside the inner state.
STATE_PREFIX = "lookahead_"

INNER_STATE_MODES = ("keep", "reset", "pullback")
NONFINITE_MODES = ("propagate", "restore")
SLOW_DTYPES = (None, torch.float32, torch.float64, torch.float16, torch.bfloat16)

# First-moment buffers that "pullback" interpolates: SGD and RMSprop keep `momentum_buffer` (when
# momentum > 0); Adam, AdamW, Adamax, NAdam and RAdam keep `exp_avg`.
FIRST_MOMENT_BUFFERS = ("momentum_buffer", "exp_avg")
_WITHOUT_FIRST_MOMENT = tuple(
    getattr(torch.optim, name)
    for name in ("Adagrad", "Adadelta", "Rprop", "ASGD", "LBFGS", "Adafactor")
    if hasattr(torch.optim, name)
)

# (device, slow dtype, fast dtype), or with the alpha in front when groups are merged for a call.
_Buckets = dict[tuple[Any, ...], tuple[list[torch.Tensor], list[torch.Tensor]]]
# A group's sync decided on the device: (due, restore), one-element bool tensors or None (due: the
# host already knows the group is due; restore: the divergence guard is off).
_Flags = tuple[torch.Tensor | None, torch.Tensor | None]


def _check_settings(settings: Mapping[str, Any], where: str) -> None:
    k = settings[K]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k in {where}: {k!r}; expected an integer >= 1")
    alpha = settings[ALPHA]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"Invalid alpha in {where}: {alpha!r}; expected a number in (0, 1]")
    if settings[INNER_STATE] not in INNER_STATE_MODES:
        raise ValueError(
            f"Invalid inner_state in {where}: {settings[INNER_STATE]!r}; "
            f"expected one of {INNER_STATE_MODES}"
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


class _AllGroups:
    """A Lookahead setting as an attribute: reading it gives the value all param groups share (a
    ValueError if they differ), setting it validates the value and sets it for every group and
    for groups added later."""

    def __init__(self, key: str, doc: str) -> None:
        self.key = key
        self.__doc__ = doc

    def __get__(self, opt: Lookahead | None, owner: type) -> Any:
        if opt is None:
            return self
        return opt._common_setting(self.key)

    def __set__(self, opt: Lookahead, value: Any) -> None:
        opt._set_for_all_groups(self.key, value)


def _slow_dtype(group: Mapping[str, Any], tensor: torch.Tensor) -> torch.dtype:
    return group[SLOW_DTYPE] or tensor.dtype


def _swap_(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange two same-dtype tensors' values in place through a temporary of one tensor."""
    temporary = a.clone()
    a.copy_(b)
    b.copy_(temporary)


class Lookahead(Optimizer):
    r"""Lookahead (Zhang et al., 2019): k steps forward with ``optimizer``, then one step back.

    Every ``k`` steps of the inner optimizer, the slow weights move toward the fast ones and the
    fast weights restart from them::

        slow <- slow + alpha * (fast - slow)
        fast <- slow

    Both happen in one fused kernel call per (device, dtype pair) for all parameters. The slow
    weights are copied from the parameters at the first :meth:`step`, so weights loaded after
    construction are what Lookahead starts from.

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
            * ``"reset"``: dropped, as if the inner optimizer started afresh;
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

    ``k``, ``alpha``, ``inner_state``, ``slow_dtype`` and ``nonfinite`` are stored in every param
    group as ``lookahead_k``, ``lookahead_alpha``, ``lookahead_inner_state``,
    ``lookahead_slow_dtype`` and ``lookahead_nonfinite``; set them per group there, or for all
    groups through the attributes of the same names. The step count since the last slow update is
    a tensor in :attr:`lookahead_state`, as torch.optim keeps ``step``, so ``torch.compile`` does
    not recompile as it advances (inside a compiled step, syncs are decided on the device as with
    ``capturable``). Parameters without a gradient still take part in slow updates (their slow
    weights simply equal the fast ones).
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
        }
        _check_settings(settings, "Lookahead()")
        if not isinstance(capturable, bool):
            raise TypeError(f"Invalid capturable: {capturable!r}; expected True or False")
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
        if inner_state == "pullback" and isinstance(optimizer, _WITHOUT_FIRST_MOMENT):
            raise ValueError(
                f"inner_state='pullback' interpolates first-moment buffers "
                f"({', '.join(FIRST_MOMENT_BUFFERS)}), and {type(optimizer).__name__} keeps none; "
                "use 'keep' or 'reset'"
            )
        for group in optimizer.param_groups:
            _check_settings({**settings, **group}, "a param group of the inner optimizer")

        self.optimizer = optimizer
        self._settings = settings
        self.capturable = capturable
        self.slow_device = None if slow_device is None else torch.device(slow_device)
        self._staging = StagingBuffers()
        #: Lookahead's own per-parameter state: ``slow_param``, the pullback buffers' slow copies
        #: (``slow_exp_avg``, ...), and in each group's first parameter the ``step`` counter (and
        #: with ``nonfinite="restore"``, the ``nonfinite_restores`` count).
        self.lookahead_state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        self._needs_slow_weights = True
        self._bucket_cache: dict[int, _Buckets] = {}
        # GradScaler unscales and skips steps itself for optimizers that say so (fused Adam, ...);
        # mirroring the flag keeps such an inner optimizer on its fast path.
        self._step_supports_amp_scaling = getattr(optimizer, "_step_supports_amp_scaling", False)
        # Optimizer.__init__ installs the hooks machinery and re-adds every group through
        # add_param_group; while adopting, that only gives the inner groups Lookahead's settings.
        self._adopting = True
        super().__init__(optimizer.param_groups, {**optimizer.defaults, **settings})
        self._adopting = False

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
        state["_bucket_cache"] = {}
        state["_staging"] = StagingBuffers()
        return state

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"Lookahead(k={self._settings[K]}, alpha={self._settings[ALPHA]}, "
            f"inner_state={self._settings[INNER_STATE]!r}, "
            f"slow_dtype={self._settings[SLOW_DTYPE]}, nonfinite={self._settings[NONFINITE]!r}, "
            f"capturable={self.capturable}, slow_device={self.slow_device},\n{inner}\n)"
        )

    # -- settings -----------------------------------------------------------------------------

    def _common_setting(self, key: str) -> Any:
        values = {group[key] for group in self.param_groups}
        if len(values) > 1:
            raise ValueError(
                f"param groups have different {key} values {sorted(map(str, values))}; "
                f"read them per group: opt.param_groups[i][{key!r}]"
            )
        return values.pop() if values else self._settings[key]

    def _set_for_all_groups(self, key: str, value: Any) -> None:
        _check_settings(
            {**self._settings, key: value}, f"Lookahead.{key.removeprefix('lookahead_')}"
        )
        self._settings[key] = value
        for group in self.param_groups:
            group[key] = value

    k = _AllGroups(K, "Inner steps between slow updates.")
    alpha = _AllGroups(ALPHA, "Slow-weights step size in (0, 1].")
    inner_state = _AllGroups(INNER_STATE, "What a slow update does to the inner optimizer's state.")
    slow_dtype = _AllGroups(
        SLOW_DTYPE, "Dtype of slow weights taken from now on (None: each parameter's own)."
    )
    nonfinite = _AllGroups(NONFINITE, "What a slow update does with non-finite fast weights.")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer; Lookahead settings the group does not name
        default to the constructor's. Its slow weights are taken at the next :meth:`step`."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        _check_settings({**self._settings, **param_group}, "the new param group")
        for key, value in self._settings.items():
            param_group.setdefault(key, value)
        if not self._adopting:
            self.optimizer.add_param_group(param_group)
        self._needs_slow_weights = True
        self._bucket_cache.clear()

    # -- stepping -----------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One inner step; every k-th, the slow update.

        Under ``torch.amp.GradScaler`` a skipped step (inf/NaN gradients) does not count toward k.
        """
        for group in self.param_groups:
            _check_settings(group, "a param group")
            if self.capturable and group[INNER_STATE] == "reset":
                raise ValueError(
                    "inner_state='reset' drops the inner optimizer's state on the host, which a "
                    "capturable Lookahead never consults; use 'keep' or 'pullback'"
                )
        self._take_slow_weights()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            loss = self.optimizer.step(closure)
        else:
            # GradScaler hands an amp-aware optimizer its scale and inf flag as attributes.
            self.optimizer.grad_scale = getattr(self, "grad_scale", None)
            self.optimizer.found_inf = found_inf
            try:
                loss = self.optimizer.step(closure)
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        with torch.no_grad():
            self._count_step(found_inf)
        return loss

    def _count_step(self, found_inf: torch.Tensor | None) -> None:
        on_host, on_device = [], []
        for group in self.param_groups:
            if not group["params"]:
                continue
            counter = self._counter(group)
            if found_inf is None:
                counter += 1
            else:
                if found_inf.device.type != "cpu" and counter.device != found_inf.device:
                    # A fused inner optimizer learns of a skipped step on the device only: count
                    # there from now on, rather than wait for the device at every step.
                    counter = self._move_counter(group, found_inf.device)
                counter += 1 - found_inf.to(counter.device, counter.dtype)
            if self._decides_on_device(counter) and group[INNER_STATE] != "reset":
                on_device.append(group)
            elif counter >= group[K]:  # with "reset" and a device counter, this waits for it
                on_host.append(group)
        if on_host:
            self._slow_update(on_host, gated=False)
        if on_device:
            self._slow_update(on_device, gated=True)

    def _decides_on_device(self, counter: torch.Tensor) -> bool:
        # A Python branch on a tensor would break a compiled graph; one on a device tensor would
        # wait for the device.
        return self.capturable or counter.device.type != "cpu" or torch.compiler.is_compiling()

    def sync(self) -> None:
        """Run the slow update now for every param group, and restart their k counts."""
        with torch.no_grad():
            self._take_slow_weights()
            groups = [group for group in self.param_groups if group["params"]]
            self._slow_update(groups, gated=False)

    @property
    def nonfinite_restores(self) -> int:
        """How many group syncs found a non-finite fast weight and restored the slow weights
        (``nonfinite="restore"``), summed over the param groups. Reading it waits for the device."""
        counts = [
            self.lookahead_state[group["params"][0]].get("nonfinite_restores")
            for group in self.param_groups
            if group["params"]
        ]
        return sum(int(count.item()) for count in counts if count is not None)

    def _counter(self, group: Mapping[str, Any]) -> torch.Tensor:
        # Kept with the group's first parameter, as torch.optim.LBFGS keeps its global state, so
        # that state_dict() stays in torch.optim's layout (parameter index -> tensors).
        return self.lookahead_state[group["params"][0]]["step"]

    def _move_counter(self, group: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        ours = self.lookahead_state[group["params"][0]]
        ours["step"] = ours["step"].to(device)
        return ours["step"]

    def _counter_device(self, first_param: torch.Tensor) -> torch.device:
        if self.capturable or torch.compiler.is_compiling():
            return first_param.device
        return torch.device("cpu")

    @torch.no_grad()
    def _take_slow_weights(self) -> None:
        if not self._needs_slow_weights:
            return
        missing = []
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                if "slow_param" not in self.lookahead_state[param]:
                    dtype = _slow_dtype(group, param)
                    _check_dtype_pair(dtype, param.dtype, f"param group {index}")
                    missing.append((param, dtype))
        for param, dtype in missing:
            self.lookahead_state[param]["slow_param"] = self._slow_copy(param, dtype, param)
        for group in self.param_groups:
            if group["params"]:
                ours = self.lookahead_state[group["params"][0]]
                ours.setdefault(
                    "step",
                    torch.zeros(
                        (), dtype=torch.float32, device=self._counter_device(group["params"][0])
                    ),
                )
                if group[NONFINITE] == "restore":
                    self._restores(group)
        self._needs_slow_weights = False
        # Built here rather than at the first sync, so that a compiled step finds them ready and
        # is not recompiled when they appear.
        self._bucket_cache.clear()
        for group in self.param_groups:
            self._weight_buckets(group)

    def _home(self, owner: torch.Tensor) -> torch.device:
        """Where the slow copy of owner (a parameter or an inner buffer) lives."""
        return self.slow_device or owner.device

    def _slow_copy(
        self, source: torch.Tensor, dtype: torch.dtype, owner: torch.Tensor
    ) -> torch.Tensor:
        """A copy of source in dtype, on owner's home (see _home), in one copy from wherever source
        is (a checkpoint on the CPU, the old device of a moved model)."""
        home = self._home(owner)
        # Pinned, so that the chunks of a sync travel asynchronously (lookahead_cuda/offload.py).
        pin = home.type == "cpu" and owner.device.type == "cuda"
        if not pin:
            return source.detach().to(home, dtype, copy=True)
        copy = torch.empty(source.shape, dtype=dtype, device=home, pin_memory=pin)
        return copy.copy_(source.detach())

    def _restores(self, group: Mapping[str, Any]) -> torch.Tensor:
        """The group's count of restoring syncs, on its device, created at first need."""
        ours = self.lookahead_state[group["params"][0]]
        if "nonfinite_restores" not in ours:
            ours["nonfinite_restores"] = torch.zeros(
                (), dtype=torch.float32, device=group["params"][0].device
            )
        return ours["nonfinite_restores"]

    def _slow_update(self, groups: list[dict[str, Any]], gated: bool) -> None:
        """The slow update of groups: of each one (gated=False: the host knows they are due), or
        of each one whose counter has reached k, decided on the device (gated=True)."""
        flags = {id(group): self._flags(group, gated) for group in groups}
        completed: list[list[torch.Tensor]] = []  # the fast lists of the calls that went through
        try:
            self._run_buckets(groups, flags, completed, skip=set())
        except (RuntimeError, TypeError, ValueError):
            # A rejected call changed nothing. If parameters moved (model.to(...)) since the slow
            # weights were taken, follow them and finish the pairs not yet updated; otherwise the
            # error is the user's.
            if not self._follow_parameters():
                raise
            done = {id(f) for fast in completed for f in fast}
            self._run_buckets(groups, flags, completed, skip=done)
        for group in groups:
            due, restore = flags[id(group)]
            counter = self._counter(group)
            if due is None:
                counter.zero_()
            else:
                counter.masked_fill_(due, 0)
            if restore is not None:
                restored = restore if due is None else restore & due.to(restore.device)
                self._restores(group).add_(restored)
            if group[INNER_STATE] == "reset":
                for param in group["params"]:
                    self.optimizer.state.pop(param, None)

    def _flags(self, group: dict[str, Any], gated: bool) -> _Flags:
        due = self._counter(group) >= group[K] if gated else None
        if group[NONFINITE] != "restore":
            return due, None
        device = group["params"][0].device
        restore = torch.zeros((), dtype=torch.bool, device=device)
        # Gated by due, so that a step decided on the device reads the weights only at a sync.
        for (bucket_device, _, _), (_, fast) in self._weight_buckets(group).items():
            gate = None if due is None else due.to(bucket_device)
            if bucket_device == device:
                found_nonfinite_(fast, restore, gate)
            else:
                found = torch.zeros((), dtype=torch.bool, device=bucket_device)
                found_nonfinite_(fast, found, gate)
                restore |= found.to(device)
        sharded_over = _mesh_group(group["params"])
        if sharded_over is not None:
            # Each process sees only its shards; restoring some shards and not others would tear
            # the model apart, so the processes agree first.
            agreed = restore.to(torch.uint8)
            torch.distributed.all_reduce(agreed, torch.distributed.ReduceOp.MAX, group=sharded_over)
            restore = agreed.bool()
        return due, restore

    def _run_buckets(
        self,
        groups: list[dict[str, Any]],
        flags: dict[int, _Flags],
        completed: list[list[torch.Tensor]],
        skip: set[int],
    ) -> None:
        """One op call per (alpha, device, dtype pair) over the groups that sync unconditionally,
        one per (group, device, dtype pair) for the others; fast tensors whose ids are in skip are
        left out, and each call's fast list is appended to completed."""
        merged: _Buckets = {}
        gated: list[tuple[list[torch.Tensor], list[torch.Tensor], float, _Flags]] = []
        for group in groups:
            due, restore = flags[id(group)]
            for key, (slow, fast) in self._buckets(group).items():
                if due is None and restore is None:
                    into = merged.setdefault((group[ALPHA], *key), ([], []))
                    into[0].extend(slow)
                    into[1].extend(fast)
                else:
                    gated.append((slow, fast, group[ALPHA], _flags_on(key[0], due, restore)))
        calls = [(slow, fast, alpha, (None, None)) for (alpha, *_), (slow, fast) in merged.items()]
        for slow, fast, alpha, (due, restore) in calls + gated:
            if skip:
                kept = [(s, f) for s, f in zip(slow, fast) if id(f) not in skip]
                slow, fast = [s for s, _ in kept], [f for _, f in kept]
            if slow and slow[0].device != fast[0].device:
                offloaded_update_(slow, fast, alpha, due, restore, self._staging)
            elif due is None:
                lookahead_update_(slow, fast, alpha)
            else:
                lookahead_update_if_(slow, fast, alpha, due, restore)
            completed.append(fast)

    def _weight_buckets(self, group: dict[str, Any]) -> _Buckets:
        """The group's (slow weights, parameters) pairs keyed by (device, slow dtype, fast dtype),
        built once and kept until the parameters or their slow weights change."""
        index = next(i for i, cached in enumerate(self.param_groups) if cached is group)
        weights = self._bucket_cache.get(index)
        if weights is None:
            weights = _bucketed((self.lookahead_state[p]["slow_param"], p) for p in group["params"])
            self._bucket_cache[index] = weights
        return weights

    def _buckets(self, group: dict[str, Any]) -> _Buckets:
        """The pairs a sync of the group updates: its weights, and with pullback its buffers."""
        weights = self._weight_buckets(group)
        if group[INNER_STATE] != "pullback":
            return weights
        # The inner optimizer creates its buffers lazily (a parameter without a gradient has none
        # yet), so buffer pairs are collected at each slow update instead of cached.
        return _bucketed(
            [pair for key in weights for pair in zip(*weights[key])] + self._pullback_pairs(group)
        )

    def _pullback_pairs(self, group: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for param in group["params"]:
            inner = self.optimizer.state.get(param)
            if not inner:
                continue
            ours = self.lookahead_state[param]
            for name in FIRST_MOMENT_BUFFERS:
                buffer = inner.get(name)
                if not isinstance(buffer, torch.Tensor):
                    continue
                slow = ours.get("slow_" + name)
                if slow is None or slow.shape != buffer.shape:
                    slow = self._slow_copy(buffer, _slow_dtype(group, buffer), buffer).zero_()
                elif slow.device != self._home(buffer):  # the model moved
                    slow = self._slow_copy(slow, slow.dtype, buffer)
                ours["slow_" + name] = slow
                pairs.append((slow, buffer))
        return pairs

    def _follow_parameters(self) -> bool:
        """Move slow weights to their parameter's device (and a usable dtype); True if any moved."""
        moved = False
        for group in self.param_groups:
            for param in group["params"]:
                ours = self.lookahead_state.get(param, {})
                slow = ours.get("slow_param")
                if slow is None:
                    continue
                dtype = slow.dtype
                if (dtype, param.dtype) not in SUPPORTED_DTYPE_PAIRS:
                    dtype = _slow_dtype(group, param)
                if slow.device != self._home(param) or slow.dtype != dtype:
                    ours["slow_param"] = self._slow_copy(slow, dtype, param)
                    moved = True
        if moved:
            self._bucket_cache.clear()
        return moved

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with Lookahead's per-parameter tensors added to each
        parameter's entry under ``lookahead_``-prefixed keys (``lookahead_slow_param``, ...) and
        its settings in every param group: torch.optim's layout, so tools that map parameter
        indices (distributed checkpointing) handle it like any optimizer's."""
        state_dict = self.optimizer.state_dict()
        index: dict[int, int] = {}
        for param in (p for group in self.param_groups for p in group["params"]):
            index.setdefault(id(param), len(index))
        state = {key: dict(entry) for key, entry in state_dict["state"].items()}
        for param, ours in self.lookahead_state.items():
            if ours and id(param) in index:
                entry = state.setdefault(index[id(param)], {})
                entry.update({STATE_PREFIX + name: value for name, value in ours.items()})
        return {"state": state, "param_groups": state_dict["param_groups"]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or from the bare inner optimizer, in which
        case slow weights are taken afresh at the next step). Slow weights land on their
        parameter's device; the whole dict is validated before anything changes."""
        params = [p for group in self.param_groups for p in group["params"]]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} param groups, "
                f"the optimizer has {len(self.param_groups)}"
            )
        groups = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded param group {index} has {len(saved['params'])} parameters, "
                    f"the optimizer's has {len(group['params'])}"
                )
            merged = {**{key: group[key] for key in self._settings}, **saved}
            _check_settings(merged, f"loaded param group {index}")
            groups.append(merged)
        group_of = [group for group in groups for _ in group["params"]]
        # As torch.optim does, saved ids map to parameters by position in the saved groups: indices
        # from state_dict(), names from torch.distributed.checkpoint's get_optimizer_state_dict.
        position_of = {
            saved_id: position
            for position, saved_id in enumerate(i for g in saved_groups for i in g["params"])
        }

        inner_state: dict[Any, dict[str, Any]] = {}
        ours: dict[int, dict[str, torch.Tensor]] = {}
        for key, entry in state_dict["state"].items():
            inner_state[key] = {k: v for k, v in entry.items() if not k.startswith(STATE_PREFIX)}
            mine = {
                k[len(STATE_PREFIX) :]: v for k, v in entry.items() if k.startswith(STATE_PREFIX)
            }
            if not mine:
                continue
            if key not in position_of:
                raise ValueError(f"loaded Lookahead state for unknown parameter {key!r}")
            slow = mine.get("slow_param")
            if slow is not None and slow.shape != params[position_of[key]].shape:
                raise ValueError(
                    f"loaded slow weights of parameter {key!r} have shape {tuple(slow.shape)}, "
                    f"the parameter has shape {tuple(params[position_of[key]].shape)}"
                )
            ours[position_of[key]] = mine

        self.optimizer.load_state_dict({"state": inner_state, "param_groups": groups})
        self.lookahead_state = defaultdict(dict)
        for key, mine in ours.items():
            param, group = params[key], group_of[key]
            entry = self.lookahead_state[param]
            for name, value in mine.items():
                if name == "step":
                    entry[name] = value.detach().to(
                        self._counter_device(param), torch.float32, copy=True
                    )
                elif name == "slow_param":
                    dtype = value.dtype
                    if (dtype, param.dtype) not in SUPPORTED_DTYPE_PAIRS:
                        dtype = _slow_dtype(group, param)
                    entry[name] = self._slow_copy(value, dtype, param)
                elif name == "nonfinite_restores":
                    entry[name] = value.detach().to(param.device, torch.float32, copy=True)
                else:
                    entry[name] = self._slow_copy(value, value.dtype, param)
        self._needs_slow_weights = True
        self._bucket_cache.clear()

    # -- evaluation ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Inside the block the parameters hold the slow weights; on exit the fast weights return.

        Same-dtype parameters exchange values with their slow copies in place, one tensor at a time
        (no copy of the model is made, and parameters keep their storage). fp32 slow weights of
        fp16/bf16 parameters are rounded into the parameters, whose fast values wait meanwhile in
        host memory (for parameters on an accelerator, none of its memory is used; for parameters
        on the CPU, that is a copy in their dtype): the slow weights cannot hold them, since the
        fp32 values and their rounding together carry more than 32 bits. Do not step the optimizer
        inside the block.
        """
        done: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        try:
            with torch.no_grad():
                for group in self.param_groups:
                    for param in group["params"]:
                        slow = self.lookahead_state.get(param, {}).get("slow_param")
                        if slow is None:
                            continue
                        if slow.dtype == param.dtype:
                            _swap_(param, slow)
                            done.append((param, slow, None))
                        else:
                            stash = param.detach().to("cpu", copy=True)
                            param.copy_(slow)
                            done.append((param, slow, stash))
            yield
        finally:
            with torch.no_grad():
                for param, slow, stash in reversed(done):
                    if stash is None:
                        _swap_(param, slow)
                    else:
                        param.copy_(stash)


def _check_dtype_pair(slow: torch.dtype, fast: torch.dtype, where: str) -> None:
    if (slow, fast) not in SUPPORTED_DTYPE_PAIRS:
        raise ValueError(
            f"slow_dtype {slow} cannot hold Lookahead's slow weights of a {fast} parameter in "
            f"{where}; supported (slow, parameter) dtypes: "
            + ", ".join(f"({a}, {b})" for a, b in SUPPORTED_DTYPE_PAIRS)
        )


def _flags_on(
    device: torch.device, due: torch.Tensor | None, restore: torch.Tensor | None
) -> _Flags:
    """Flags for a call on device; a sync the host decided is due everywhere."""
    if due is None:
        due = torch.ones((), dtype=torch.bool, device=device)
    return due.to(device), None if restore is None else restore.to(device)


def _sharded_types() -> tuple[type, ...]:
    # A DTensor exists only once its module is loaded, and importing it here would cost every user
    # the import of torch.distributed (most of a second).
    module = sys.modules.get("torch.distributed.tensor")
    return (module.DTensor,) if module is not None else ()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of tensor that this process holds: a DTensor's local shard (FSDP2), else itself.

    A slow copy is made from its parameter (or buffer) with the same placements, so the two local
    shards pair up element by element and the update never gathers anything.
    """
    if isinstance(tensor, _sharded_types()):
        return tensor._local_tensor  # type: ignore[attr-defined]
    return tensor


def _mesh_group(tensors: Iterable[torch.Tensor]) -> Any:
    """The process group of the first DTensor among tensors, or None."""
    sharded = _sharded_types()
    for t in tensors:
        if isinstance(t, sharded):
            return t.device_mesh.get_group()  # type: ignore[attr-defined]
    return None


def _bucketed(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> _Buckets:
    """Pairs keyed by (device, slow dtype, fast dtype), as the local tensors the op updates."""
    buckets: _Buckets = {}
    for slow, fast in pairs:
        slow, fast = _local(slow), _local(fast)
        slows, fasts = buckets.setdefault((fast.device, slow.dtype, fast.dtype), ([], []))
        slows.append(slow)
        fasts.append(fast)
    return buckets
