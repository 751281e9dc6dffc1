"""The outer step: running the syncs that are due.

Each group's sync is what its plan and settings say: the divergence guard's check first
(``nonfinite="restore"``), DiLoCo's average over the workers (``process_group``), then the fused
update (Lookahead's lerp, or the outer-momentum step) of its weights and, with
``inner_state="pullback"``, of the inner optimizer's first moments; after it the group's count
restarts and, with ``inner_state="reset"``, the inner state. Groups synced unconditionally share
one call per (alpha, momentum, device, dtype pair).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lookahead_cuda import diloco, functional
from lookahead_cuda.counters import StepCounters
from lookahead_cuda.functional import Bucket, Buckets
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
#: A sync: the group, which of its fragments (None: all its weights), whether its count restarts.
Sync = tuple[Planned, Optional[int], bool]


@dataclass
class Streamed:
    """A streamed fragment's average, started ``sync_delay`` steps before its outer step.

    Attributes:
        fast: the fast tensors whose average it is.
        restore: the divergence guard's decision at the start (None: no guard).
        averaging: the collectives in flight (None once arrived, or when restoring).
        means: once arrived, the average for each fast tensor, by its id.
    """

    fast: list[torch.Tensor]
    restore: torch.Tensor | None
    averaging: functional.Averaging | None
    means: dict[int, torch.Tensor] | None

    def arrived(self) -> dict[int, torch.Tensor]:
        """The average, waiting for the collectives if they are still running."""
        if self.means is None:
            assert self.averaging is not None
            self.means = {id(fast): mean for fast, mean in self.averaging.wait()}
            self.averaging = None
        return self.means


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
        # Streamed fragments' averages in flight, by (group index, fragment); and those a loaded
        # checkpoint carried, by parameter, until their fragment's sync.
        self._streamed: dict[tuple[int, int], Streamed] = {}
        self._resumed: dict[torch.Tensor, torch.Tensor | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Pinned staging buffers are not copied: a copy grows its own.
        offload = None if self._offload is None else StagingBuffers(self._offload.chunk_bytes)
        # An average in flight is a collective's: it does not travel (state_dict() saves it).
        return {**self.__dict__, "_merged": {}, "_offload": offload, "_streamed": {}}

    def count(self, planned: Sequence[Planned], skipped: torch.Tensor | None) -> None:
        """One more step for each of ``planned`` (unless ``skipped``, GradScaler's found_inf, says
        it was skipped), then the syncs it makes due, and the streamed averages it starts. If
        one fails, the counts are as they were and nothing is left in flight."""
        groups = [group for _, group, _ in planned]
        with self._counters.kept_on_failure(groups), self._kept():
            for group in groups:
                self._counters.count(group, skipped)
            on_host, on_device = self._counters.due(planned, self._workers.fragments)
            if on_host:
                self.run(on_host, gated=False)
            if on_device:
                self.run([(entry, None, True) for entry in on_device], gated=True)
            if self._workers.sync_delay:
                fragments, delay = self._workers.fragments, self._workers.sync_delay
                self.start(self._counters.starting(planned, fragments, delay))

    def run_all(self, planned: Sequence[Planned]) -> None:
        """Every weight of each of ``planned`` synced now, and their counts restarted."""
        self.run([(entry, None, True) for entry in planned], gated=False)

    def run(self, syncs: Sequence[Sync], *, gated: bool) -> None:
        """The sync of each of ``syncs``: unconditionally (the host knows they are due), or,
        with ``gated``, of each one whose count has reached k, decided on the device."""
        unconditional: dict[Coefficients, list[Buckets]] = {}
        pulled_back: set[int] = set()
        flags = []
        for (index, group, plan), fragment, ends_cycle in syncs:
            weights = plan.weights if fragment is None else plan.fragments[fragment]
            params = [p for p, f in zip(group["params"], plan.fragment_of) if fragment in (None, f)]
            due = self._counters.due_on_device(group) if gated else None
            momentum = float(group[MOMENTUM])  # a Python float even where torch.compile traces one
            coefficients = (group[ALPHA], momentum, group[NESTEROV] or momentum == 0)
            calls = [(coefficients, weights)]
            streamed = self._streamed.pop((index, fragment), None) or self._take_resumed(weights)
            if streamed is not None:
                restore = streamed.restore
                if restore is None or not bool(restore):
                    self._finish_streamed(streamed, weights, coefficients)
                    calls = []
            else:
                restore = self._guard(group, plan, weights, due)
                if self._workers.group is not None:
                    functional.average_over_workers(
                        weights,
                        self._workers.group,
                        pseudo_gradient_dtype=self._workers.pseudo_gradient_dtype,
                    )
            if group[INNER_STATE] == "pullback":
                # First moments have no outer momentum of their own: they are interpolated with
                # alpha whatever the weights' outer step is.
                buckets = self._pullback_buckets(index, group, params)
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
            flags.append((group, params, due, restore, ends_cycle))
        for (alpha, mu, nesterov), many in unconditional.items():
            functional.sync_buckets(
                self._merge(many, cache=not pulled_back.intersection(map(id, many))),
                alpha,
                momentum=mu,
                nesterov=nesterov,
                offload=self._offload,
            )
        for group, params, due, restore, ends_cycle in flags:
            self._counters.restart(group, due, restore, ends_cycle)
            if group[INNER_STATE] == "reset":
                self._initial_inner_state.reset(self._inner.state, params)

    def start(self, starting: Sequence[tuple[Planned, int]]) -> None:
        """Start the average of each of ``starting`` (a group and one of its fragments), whose
        outer step comes ``sync_delay`` inner steps later: the divergence guard decides on the
        fast weights now, and the collectives run while the inner steps go on."""
        for (index, group, plan), fragment in starting:
            weights = plan.fragments[fragment]
            restore = self._guard(group, plan, weights, None)
            averaging = None
            if restore is None or not bool(restore):
                averaging = functional.start_average(
                    weights,
                    self._workers.group,
                    pseudo_gradient_dtype=self._workers.pseudo_gradient_dtype,
                    async_op=True,
                )
            fast = [f for bucket in weights.values() for f in bucket.fast]
            self._streamed[index, fragment] = Streamed(fast, restore, averaging, None)

    def in_flight(self) -> dict[torch.Tensor, torch.Tensor | None]:
        """The streamed averages started and not yet applied, by fast tensor (None: its sync is
        to restore), waiting for those still in flight: what a checkpoint saves of them."""
        averages = dict(self._resumed)
        for streamed in self._streamed.values():
            if streamed.restore is not None and bool(streamed.restore):
                averages.update(dict.fromkeys(streamed.fast, None))
            else:
                means = streamed.arrived()
                averages.update((fast, means[id(fast)]) for fast in streamed.fast)
        return averages

    def resume(self, averages: dict[torch.Tensor, torch.Tensor | None]) -> None:
        """Averages a loaded checkpoint carried (:meth:`in_flight`), each applied at its
        fragment's sync."""
        self._streamed.clear()
        self._resumed = dict(averages)

    def _take_resumed(self, weights: Buckets) -> Streamed | None:
        fast = [f for bucket in weights.values() for f in bucket.fast]
        if not fast or any(f not in self._resumed for f in fast):
            return None
        averages = [self._resumed.pop(f) for f in fast]
        if any(average is None for average in averages):
            return Streamed(fast, torch.tensor(True), None, {})
        return Streamed(fast, None, None, {id(f): a for f, a in zip(fast, averages)})

    def finish_in_flight(self) -> None:
        """Let the averages in flight end, and forget them (a sync of every fragment now, or a
        loaded checkpoint, replaces them)."""
        for streamed in self._streamed.values():
            if streamed.averaging is not None:
                streamed.arrived()
        self._streamed.clear()
        self._resumed.clear()

    @contextlib.contextmanager
    def _kept(self) -> Iterator[None]:
        """The averages in flight dropped if the block raises (a collective that failed leaves
        none to wait for): the syncs tried again start afresh."""
        try:
            yield
        except BaseException:
            self._streamed.clear()
            self._resumed.clear()
            raise

    def _guard(
        self, group: Mapping[str, Any], plan: GroupPlan, weights: Buckets, due: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The divergence guard's flag (``nonfinite="restore"``), else None. Decided on each
        worker's own fast weights, before any averaging: a worker that blew up makes every
        worker restore."""
        if group[NONFINITE] != "restore":
            return None
        agree_over = self._workers.group
        if agree_over is None:
            agree_over = plan.sharded_over
        return functional.nonfinite_flag(weights, group["params"][0].device, due, agree_over)

    def _finish_streamed(
        self, streamed: Streamed, weights: Buckets, coefficients: Coefficients
    ) -> None:
        """A streamed fragment's outer step: on the average of what the workers sent when it
        started, from the slow weights (which have not changed since); then each worker's fast
        weights, which went on for sync_delay steps, are mixed with the new global ones,
        ``fast <- mixing * fast + (1 - mixing) * global``."""
        alpha, mu, nesterov = coefficients
        means = streamed.arrived()
        for bucket in weights.values():
            if not bucket.fast:
                continue
            averaged = [means[id(f)] for f in bucket.fast]
            global_weights = Bucket(bucket.slow, averaged, bucket.momentum)
            functional.sync_buckets(
                {(averaged[0].device, bucket.slow[0].dtype, averaged[0].dtype): global_weights},
                alpha,
                momentum=mu,
                nesterov=nesterov,
                offload=self._offload,
            )
            mixing = self._workers.fragment_mixing
            global_fast = [g.to(f.dtype) for g, f in zip(averaged, bucket.fast)]
            torch._foreach_lerp_(bucket.fast, global_fast, 1.0 - mixing)

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

    def _pullback_buckets(
        self, index: int, group: Mapping[str, Any], params: Sequence[torch.Tensor]
    ) -> Buckets:
        """The (slow copy, buffer) pairs of the group's first moments. The inner optimizer creates
        its buffers lazily (a parameter without a gradient has none yet; a step creates them in
        the very step whose sync needs them), so they are collected at each sync."""
        pairs, names = [], []
        synced = set(map(id, params))
        for j, param in enumerate(group["params"]):
            if id(param) not in synced:
                continue
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
