"""When syncs are due: each param group's count of steps since its last sync, and who decides.

A group's count is an int64 tensor kept with its first parameter in Lookahead's state (as
torch.optim keeps ``step``), exact for any k and never a Python int that a compiled step would
recompile on. Who reads it is decided in one place, :meth:`StepCounters.on_device`:

* the host, for a count in host memory: a Python branch, and the sync (or not) follows;
* the device, for a count on an accelerator (``capturable``, a compiled step, or a fused inner
  optimizer that reports skipped steps only there): every step launches the gated kernels, which
  read the count themselves, so the host never waits for the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from lookahead_cuda.diloco import Workers
from lookahead_cuda.keys import INNER_STATE, RESTORES, STEP, K

#: Something whose second item is a param group: (index, group, plan) in the optimizer.
Entry = TypeVar("Entry", bound=tuple[Any, ...])


class StepCounters:
    """The step counts of one Lookahead's param groups.

    Args:
        state: Lookahead's per-parameter state, where each group's count lives (under ``"step"``,
            and the count of restoring syncs under ``"nonfinite_restores"``) with its first
            parameter.
        capturable: keep the counts on the parameters' device from the start.
        workers: DiLoCo's schedule: its fragments, each due at (f + 1) * k / fragments, and the
            delay its averages start before that.
    """

    def __init__(
        self,
        state: Mapping[torch.Tensor, dict[str, torch.Tensor]],
        capturable: bool,
        workers: Workers,
    ) -> None:
        self._state = state
        self._capturable = capturable
        self._workers = workers

    def home(self, first_param: torch.Tensor) -> torch.device:
        """Where a new count of the group starting with ``first_param`` lives."""
        if self._capturable or torch.compiler.is_compiling():
            return first_param.device
        return torch.device("cpu")

    def ensure(self, group: Mapping[str, Any], *, restores: bool) -> None:
        """Create the group's count if it has none (and its count of restores, with ``restores``:
        here, so that a compiled step finds them ready)."""
        first = group["params"][0]
        ours = self._state[first]
        if STEP not in ours:
            ours[STEP] = torch.zeros((), dtype=torch.int64, device=self.home(first))
        if restores and RESTORES not in ours:
            ours[RESTORES] = torch.zeros((), dtype=torch.int64, device=first.device)

    def exists(self, group: Mapping[str, Any]) -> bool:
        return STEP in self._state.get(group["params"][0], {})

    def of(self, group: Mapping[str, Any]) -> torch.Tensor:
        return self._state[group["params"][0]][STEP]

    def on_device(self, group: Mapping[str, Any]) -> bool:
        """Whether the group's syncs are decided on the device. A Python branch on a tensor would
        break a compiled graph, and one on a device tensor would wait for the device; a reset of
        the inner state is the host's to do, so it waits then."""
        if group[INNER_STATE] == "reset":
            return False
        counter = self.of(group)
        return self._capturable or counter.device.type != "cpu" or torch.compiler.is_compiling()

    def may_sync_after_this_step(self, group: Mapping[str, Any]) -> bool:
        """Whether a sync may run, or a streamed average start, at the group's next count."""
        if self.on_device(group):
            return True
        due, _, starting = self._schedule(int(self.of(group)) + 1, group[K])
        return due is not None or starting is not None

    def _schedule(self, count: int, k: int) -> tuple[int | None, bool, int | None]:
        """At ``count``: the fragment whose sync is due (None: none), whether it ends the cycle,
        and the fragment whose streamed average starts (None: none)."""
        fragments, delay = self._workers.fragments, self._workers.sync_delay
        period = k // fragments
        due, ends = None, False
        if count >= k:  # past k too: k was lowered since the cycle began
            due, ends = fragments - 1, True
        elif count > 0 and count % period == 0:
            due = count // period - 1
        starting = None
        if delay and count < k and (count + delay) % period == 0:
            starting = (count + delay) // period - 1
        return due, ends, starting

    def count(self, group: Mapping[str, Any], skipped: torch.Tensor | None) -> None:
        """One more step, unless ``skipped`` (GradScaler's found_inf) says it was skipped."""
        ours = self._state[group["params"][0]]
        if skipped is None:
            ours[STEP] += 1
            return
        if skipped.device.type != "cpu" and ours[STEP].device != skipped.device:
            # A fused inner optimizer learns of a skipped step on the device only: count there
            # from now on, rather than wait for the device at every step.
            ours[STEP] = ours[STEP].to(skipped.device)
        ours[STEP] += 1 - skipped.to(ours[STEP].device, torch.int64)

    def due(self, planned: Sequence[Entry]) -> tuple[list[tuple[Entry, int, bool]], list[Entry]]:
        """Of ``planned`` (entries whose second item is a param group, counted this step), the
        syncs due, read on the host (which waits for a count on a device): (entry, fragment,
        whether it ends the cycle and the count restarts); and the entries decided on the
        device, due or not."""
        on_host, on_device = [], []
        for entry in planned:
            group = entry[1]
            if self.on_device(group):
                on_device.append(entry)
                continue
            due, ends, _ = self._schedule(int(self.of(group)), group[K])
            if due is not None:
                on_host.append((entry, due, ends))
        return on_host, on_device

    def starting(self, planned: Sequence[Entry]) -> list[tuple[Entry, int]]:
        """Of ``planned``, the (entry, fragment) whose streamed average starts at this count."""
        starting = []
        for entry in planned:
            group = entry[1]
            fragment = self._schedule(int(self.of(group)), group[K])[2]
            if fragment is not None:
                starting.append((entry, fragment))
        return starting

    def due_on_device(self, group: Mapping[str, Any]) -> torch.Tensor:
        """Whether the group's sync is due, as a one-element bool tensor where the count is."""
        return self.of(group) >= group[K]

    def restart(
        self,
        group: Mapping[str, Any],
        due: torch.Tensor | None,
        restored: torch.Tensor | None,
        ends_cycle: bool = True,
    ) -> None:
        """After a sync (where ``due`` holds, if given): the count starts again if the sync
        ``ends_cycle`` (its last fragment's), and a sync that restored instead (``restored``)
        is counted."""
        counter = self.of(group)
        if not ends_cycle:
            pass
        elif due is None:
            counter.zero_()
        else:
            counter.masked_fill_(due.to(counter.device), 0)
        if restored is not None:
            if due is not None:
                restored = restored & due.to(restored.device)
            first = group["params"][0]
            count = self._state[first].setdefault(
                RESTORES, torch.zeros((), dtype=torch.int64, device=first.device)
            )
            count.add_(restored.to(count.device, torch.int64))

    @contextlib.contextmanager
    def kept_on_failure(self, groups: Iterable[Mapping[str, Any]]) -> Iterator[None]:
        """The host counts of ``groups`` as they were before the block, if the block raises: a
        step whose sync failed (a collective that timed out, say) is counted again when tried
        again, and its sync with it."""
        saved = [
            (group, self.of(group).clone())
            for group in groups
            if self.of(group).device.type == "cpu"
        ]
        try:
            yield
        except BaseException:
            for group, count in saved:
                self._state[group["params"][0]][STEP] = count
            raise

    def restores(self, groups: Iterable[Mapping[str, Any]]) -> int:
        """Syncs that restored, summed over ``groups``; reading it waits for the device."""
        counts = [self._state[g["params"][0]].get(RESTORES) for g in groups if g["params"]]
        return sum(int(count.item()) for count in counts if count is not None)
