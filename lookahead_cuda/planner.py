"""Plans of the syncs, made once per change of tensors.

A param group's plan covers the exact set of tensors it holds: their slow weights (taken at the
first step that sees them), the outer momentum buffers when the group has momentum, and the
(slow, fast) buckets of one (device, dtype pair) that a sync makes one fused call per. A group
whose tensors change between steps (DeepSpeed ZeRO-3 swaps its partitions in and out; a user edits
``param_groups``) keeps one plan per set of tensors.

Before a step that may sync, the plan is validated, once: its buckets are checked as the sync would
check them, and what the tensors looked like is recorded (a fingerprint). From then on only the
fingerprint is compared; a change (``param.data = ...``, ``model.to(...)``, a partly converted
model) makes the slow copies follow their parameters and the plan be made and validated again.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lookahead_cuda import diloco, functional
from lookahead_cuda.counters import StepCounters
from lookahead_cuda.keys import (
    ALPHA,
    MOMENTUM,
    NONFINITE,
    OUTER_MOMENTUM,
    SETTINGS,
    SLOW_DTYPE,
    SLOW_PARAM,
    parameter_name,
)
from lookahead_cuda.ops import SUPPORTED_DTYPE_PAIRS, TensorFingerprint
from lookahead_cuda.slow_copies import SlowCopies


def _raise(failure: BaseException | None) -> None:
    if failure is not None:
        raise failure


def with_momentum(group: Mapping[str, Any]) -> bool:
    """Whether the group's syncs take the outer-momentum step (and keep its buffers)."""
    # A branch, not bool(): torch.compile may trace a float setting as a symbolic float, and only a
    # branch makes it decide (and guard on) the comparison; a symbolic bool compared with a
    # Python bool fails inside dynamo.
    return True if group[MOMENTUM] > 0 else False  # noqa: SIM210


@dataclass(eq=False)
class GroupPlan:
    """How the syncs of a param group holding exactly ``params`` run.

    Attributes:
        params: the group's tensors, as planned.
        weights: their (slow weights, parameter) buckets, with the outer momentum buffers when the
            group has momentum, each tensor named after its parameter.
        fragments: the same pairs split by DiLoCo's fragments, one Buckets per fragment (just
            ``weights`` when there is one), with ``fragment_params`` the parameters of each and
            ``fragment_of`` each parameter's fragment.
        with_momentum: whether the buckets carry momentum buffers.
        sharded_over: the process group of FSDP2's mesh when the parameters are DTensors (the
            processes must agree on a restore), None otherwise.
        validated: what the buckets' tensors looked like when validated; None until then.
    """

    params: tuple[torch.Tensor, ...]
    weights: functional.Buckets
    fragments: list[functional.Buckets]
    fragment_params: list[tuple[torch.Tensor, ...]]
    fragment_of: list[int]
    with_momentum: bool
    sharded_over: Any
    validated: Any = None

    def holds(self, params: list[torch.Tensor], momentum: bool) -> bool:
        return (
            self.with_momentum == momentum
            and len(self.params) == len(params)
            and all(map(operator.is_, self.params, params))
        )

    def tensors(self) -> list[torch.Tensor]:
        return [
            t
            for bucket in self.weights.values()
            for tensors in (bucket.slow, bucket.fast, bucket.momentum or [])
            for t in tensors
        ]


class Planner:
    """The plans of one Lookahead's param groups.

    Args:
        state: Lookahead's per-parameter state, where slow weights and momentum buffers are kept.
        copies: where and in which dtype slow copies live.
        counters: the groups' step counts, created with their plans.
        workers: DiLoCo's workers: new slow weights are taken from the first worker's parameters,
            broadcast.
    """

    def __init__(
        self,
        state: Mapping[torch.Tensor, dict[str, torch.Tensor]],
        copies: SlowCopies,
        counters: StepCounters,
        workers: diloco.Workers,
    ) -> None:
        self._state = state
        self._copies = copies
        self._counters = counters
        self._workers = workers
        # (group index, id of its first tensor, its length) -> plan
        self._plans: dict[tuple[int, int, int], GroupPlan] = {}
        # Each group's settings as last checked: checked again only when they change.
        self._checked_settings: dict[int, tuple[Any, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plans": {}}  # fingerprints do not travel; plans are remade

    def planned(
        self,
        groups: Sequence[dict[str, Any]],
        may_sync: Callable[[Mapping[str, Any]], bool],
        check_settings: Callable[[Mapping[str, Any], str], None],
    ) -> list[tuple[int, dict[str, Any], GroupPlan]]:
        """(index, group, plan) of every group with tensors, its settings checked (with
        ``check_settings(group, where)``, when they changed); the plan of each group that
        ``may_sync`` after this step validated (outside compiled steps), so that a sync either
        runs or changes nothing, the inner step included. With DiLoCo's workers, all of them
        agree (:meth:`diloco.Workers.agree`) before a step that may sync."""
        if self._workers.group is None:
            return self._planned(groups, may_sync, check_settings)
        # DiLoCo: before a step that may sync, and before new parameters get slow weights (from
        # the first worker's, broadcast), every worker agrees that all have the same settings and
        # shapes and that none rejected its plans, or all raise: a worker alone in a collective
        # would wait for the others until the timeout.
        new = [
            param
            for index, group in enumerate(groups)
            if group["params"] and not self._current(index, group)
            for param in group["params"]
            if SLOW_PARAM not in self._state.get(param, {})
        ]
        if new:
            self._workers.checked(lambda: None, lambda: self._description(groups))
            diloco.broadcast_from_first_worker(new, self._workers.group)
        failure: BaseException | None = None
        try:
            planned = self._planned(groups, may_sync, check_settings)
        except (TypeError, ValueError) as error:
            failure, planned = error, []
        counted = [bool(g["params"]) and self._counters.exists(g) for g in groups]
        if any(may_sync(g) for g, known in zip(groups, counted) if known):
            self._workers.checked(lambda: _raise(failure), lambda: self._description(groups))
        if failure is not None:
            raise failure
        return planned

    def _description(self, groups: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
        counts = [
            int(self._counters.of(g)) if g["params"] and self._counters.exists(g) else None
            for g in groups
        ]
        return diloco.describe(groups, self._workers, counts)

    def _planned(
        self,
        groups: Sequence[dict[str, Any]],
        may_sync: Callable[[Mapping[str, Any]], bool],
        check_settings: Callable[[Mapping[str, Any], str], None],
    ) -> list[tuple[int, dict[str, Any], GroupPlan]]:
        planned = []
        for index, group in enumerate(groups):
            values = tuple(group[key] for key in SETTINGS)
            if self._checked_settings.get(index) != values:
                check_settings(group, f"param group {index}")
                self._checked_settings[index] = values
            if not group["params"]:
                continue
            plan = self.plan(index, group)
            if not torch.compiler.is_compiling() and may_sync(group):
                plan = self.validated(index, group, plan)
            planned.append((index, group, plan))
        return planned

    def plan(self, index: int, group: dict[str, Any]) -> GroupPlan:
        """The plan of the tensors the group holds now: found by (index, first tensor, length)
        and an identity check of every tensor, or made (slow weights taken) if they are new."""
        params = group["params"]
        plan = self._current(index, group)
        if plan is None:
            plan = self._plans[(index, id(params[0]), len(params))] = self._make(index, group)
        return plan

    def _current(self, index: int, group: Mapping[str, Any]) -> GroupPlan | None:
        """The plan of the tensors the group holds now, if one was made."""
        params = group["params"]
        plan = self._plans.get((index, id(params[0]), len(params)))
        return plan if plan is not None and plan.holds(params, with_momentum(group)) else None

    def validated(self, index: int, group: dict[str, Any], plan: GroupPlan) -> GroupPlan:
        """``plan``, validated as its sync will be, so that a sync either runs or changes
        nothing: at once if its tensors are as they were when it was last validated; otherwise
        the slow copies follow their parameters and the plan is made and validated again.
        Raises ``ValueError``/``TypeError`` naming the tensor at fault."""
        if plan.validated is not None and plan.validated.matches():
            return plan
        if self._follow(group) or plan.validated is not None:  # else: new, and as made
            params = group["params"]
            plan = self._plans[(index, id(params[0]), len(params))] = self._make(index, group)
        functional.check_buckets(
            plan.weights,
            group[ALPHA],
            momentum=group[MOMENTUM],
            offload=self._copies.slow_device is not None,
            quantized=self._workers.pseudo_gradient_dtype == functional.QUANTIZED,
        )
        plan.validated = TensorFingerprint(plan.tensors())
        return plan

    def forget(self) -> None:
        """Drop every plan (the groups or the state were replaced)."""
        self._plans.clear()
        self._checked_settings.clear()

    def _make(self, index: int, group: dict[str, Any]) -> GroupPlan:
        params = group["params"]
        sharded_over = functional.mesh_group(params)
        if self._workers.group is not None:
            diloco.check_replicas(index, sharded_over)
        missing = []
        for j, param in enumerate(params):
            if SLOW_PARAM not in self._state.get(param, {}):
                dtype = self._copies.dtype(group[SLOW_DTYPE], param)
                if (dtype, param.dtype) not in SUPPORTED_DTYPE_PAIRS:
                    raise ValueError(
                        f"slow_dtype {dtype} cannot hold the slow weights of "
                        f"{parameter_name(index, j)} ({param.dtype}); supported (slow, parameter) "
                        "dtypes: " + ", ".join(f"({a}, {b})" for a, b in SUPPORTED_DTYPE_PAIRS)
                    )
                missing.append((param, dtype))
        momentum = with_momentum(group)
        with torch.no_grad():
            for param, dtype in missing:
                self._state[param][SLOW_PARAM] = self._copies.copy(param, dtype, param)
            if momentum:
                for param in params:
                    ours = self._state[param]
                    if OUTER_MOMENTUM not in ours:
                        ours[OUTER_MOMENTUM] = torch.zeros_like(ours[SLOW_PARAM])
        self._counters.ensure(group, restores=group[NONFINITE] == "restore")

        def buckets(indices: list[int]) -> functional.Buckets:
            return functional.bucket_pairs(
                ((self._state[params[j]][SLOW_PARAM], params[j]) for j in indices),
                (parameter_name(index, j) for j in indices),
                (self._state[params[j]][OUTER_MOMENTUM] for j in indices) if momentum else None,
            )

        weights = buckets(list(range(len(params))))
        fragment_of = self._workers.fragment_of(index, params)
        members = [
            [j for j, g in enumerate(fragment_of) if g == f] for f in range(self._workers.fragments)
        ]
        fragments = [weights] if len(members) == 1 else [buckets(m) for m in members]
        fragment_params = [tuple(params[j] for j in m) for m in members]
        return GroupPlan(
            tuple(params), weights, fragments, fragment_params, fragment_of, momentum, sharded_over
        )

    def _follow(self, group: dict[str, Any]) -> bool:
        """Move the group's slow weights (and outer momentum) to their parameter's home, in a
        usable dtype; True if any moved. A slow copy of another shape than its parameter is left
        for validation to report."""
        moved = False
        with torch.no_grad():
            for param in group["params"]:
                ours = self._state.get(param, {})
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
        return moved
