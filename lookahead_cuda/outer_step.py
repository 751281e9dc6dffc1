"""The outer step: running the syncs that are due.

Each group's sync is what its plan and settings say: the divergence guard's check first
(``nonfinite="restore"``), DiLoCo's average over the workers (``process_group``), then the fused
update (Lookahead's lerp, or the outer-momentum step) of its weights and, with
``inner_state="pullback"``, of the inner optimizer's first moments; after it the group's count
restarts and, with ``inner_state="reset"``, the inner state. Groups synced unconditionally share
one call per (alpha, momentum, device, dtype pair).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lookahead_cuda import diloco, functional
from lookahead_cuda.counters import StepCounters
from lookahead_cuda.functional import Buckets
from lookahead_cuda.inner_state import InitialInnerState, first_moments
from lookahead_cuda.keys import (
    ALPHA,
    INNER_STATE,
    MOMENTUM,
    NESTEROV,
    NONFINITE,
    SLOW_DTYPE,
    parameter_name,
    slow_copy_of,
)
from lookahead_cuda.offload import StagingBuffers
from lookahead_cuda.ops import SUPPORTED_DTYPE_PAIRS
from lookahead_cuda.planner import GroupPlan
from lookahead_cuda.slow_copies import SlowCopies

#: (alpha, momentum, nesterov) of one fused call.
Coefficients = tuple[float, float, bool]
#: A group to sync: (its index, the group, its plan).
Planned = tuple[int, dict[str, Any], GroupPlan]


class OuterStep:
    """The syncs of one Lookahead.

    Args:
        inner: the inner optimizer, whose state ``"pullback"`` and ``"reset"`` act on.
        state: Lookahead's per-parameter state (pullback's slow copies are kept there).
        copies: where and in which dtype slow copies live.
        counters: the groups' step counts, restarted by a sync.
        offload: the staging buffers when slow weights live in host memory, else None.
        workers: DiLoCo's workers, averaged over before each sync.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        state: Mapping[torch.Tensor, dict[str, torch.Tensor]],
        copies: SlowCopies,
        counters: StepCounters,
        offload: StagingBuffers | None,
        workers: diloco.Workers,
    ) -> None:
        self._inner = inner
        self._state = state
        self._copies = copies
        self._counters = counters
        self._offload = offload
        self._workers = workers
        self._initial_inner_state = InitialInnerState(inner)
        # The last merge of each set of plans' buckets synced together, kept with those buckets.
        self._merged: dict[tuple[int, ...], tuple[list[Buckets], Buckets]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Pinned staging buffers are not copied: a copy grows its own.
        offload = None if self._offload is None else StagingBuffers(self._offload.chunk_bytes)
        return {**self.__dict__, "_merged": {}, "_offload": offload}

    def run(self, groups: Sequence[Planned], *, gated: bool) -> None:
        """The sync of each of ``groups``: unconditionally (the host knows they are due), or,
        with ``gated``, of each one whose count has reached k, decided on the device."""
        unconditional: dict[Coefficients, list[Buckets]] = {}
        pulled_back: set[int] = set()
        flags = []
        for index, group, plan in groups:
            due = self._counters.due_on_device(group) if gated else None
            restore = None
            if group[NONFINITE] == "restore":
                # Decided on each worker's own fast weights, before any averaging: a worker that
                # blew up makes every worker restore.
                agree_over = self._workers.group
                if agree_over is None:
                    agree_over = plan.sharded_over
                restore = functional.nonfinite_flag(
                    plan.weights, group["params"][0].device, due, agree_over
                )
            if self._workers.group is not None:
                functional.average_over_workers(
                    plan.weights,
                    self._workers.group,
                    pseudo_gradient_dtype=self._workers.pseudo_gradient_dtype,
                )
            momentum = float(group[MOMENTUM])  # a Python float even where torch.compile traces one
            calls = [((group[ALPHA], momentum, group[NESTEROV] or momentum == 0), plan.weights)]
            if group[INNER_STATE] == "pullback":
                # First moments have no outer momentum of their own: they are interpolated with
                # alpha whatever the weights' outer step is.
                buckets = self._pullback_buckets(index, group)
                pulled_back.add(id(buckets))
                calls.append(((group[ALPHA], 0.0, True), buckets))
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
                        offload=self._offload,
                    )
            flags.append((group, due, restore))
        for (alpha, mu, nesterov), many in unconditional.items():
            functional.sync_buckets(
                self._merge(many, cache=not pulled_back.intersection(map(id, many))),
                alpha,
                momentum=mu,
                nesterov=nesterov,
                offload=self._offload,
            )
        for group, due, restore in flags:
            self._counters.restart(group, due, restore)
            if group[INNER_STATE] == "reset":
                self._initial_inner_state.reset(self._inner.state, group["params"])

    def _merge(self, many: list[Buckets], cache: bool) -> Buckets:
        """The buckets of ``many`` joined, so that they sync in one call per bucket key; the
        plans' own buckets are joined once while the plans last."""
        if len(many) == 1:
            return many[0]
        key = tuple(map(id, many))
        kept = self._merged.get(key)
        if kept is not None and all(map(operator.is_, kept[0], many)):
            return kept[1]
        merged = functional.merge_buckets(many)
        if cache:
            if len(self._merged) >= 8:  # plans replaced since: their merges are stale
                self._merged.clear()
            self._merged[key] = (many, merged)
        return merged

    def _pullback_buckets(self, index: int, group: Mapping[str, Any]) -> Buckets:
        """The (slow copy, buffer) pairs of the group's first moments. The inner optimizer creates
        its buffers lazily (a parameter without a gradient has none yet; a step creates them in
        the very step whose sync needs them), so they are collected at each sync."""
        pairs, names = [], []
        for j, param in enumerate(group["params"]):
            ours = self._state[param]
            for buffer_name, buffer in first_moments(self._inner.state.get(param) or {}):
                key = slow_copy_of(buffer_name)
                slow = ours.get(key)
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
                ours[key] = slow
                pairs.append((slow, buffer))
                names.append(f"the {buffer_name} of {parameter_name(index, j)}")
        return functional.bucket_pairs(pairs, names)
