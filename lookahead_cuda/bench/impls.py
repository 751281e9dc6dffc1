"""The implementations of the Lookahead sync that the benchmark times, by name, and torch's result
every one of them must reproduce. Adding one is adding an entry to ``IMPLEMENTATIONS``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lookahead_cuda import lookahead_update_
from lookahead_cuda.bench.workload import TensorLists
from lookahead_cuda.ops import foreach_update_


@dataclass(frozen=True)
class Implementation:
    #: Updates the workload's lists (slow, fast) in place with step size alpha.
    update: Callable[[TensorLists, float], None]
    #: Whether it gives torch's result bit for bit; if not, to within the dtype's precision.
    bitwise: bool


def reference_update_(lists: TensorLists, alpha: float) -> None:
    """The sync's definition in plain torch, one tensor at a time."""
    slow, fast = lists
    for s, f in zip(slow, fast):
        s.lerp_(f.to(s.dtype), alpha)
        f.copy_(s)


def _fused_update_(lists: TensorLists, alpha: float) -> None:
    slow, fast = lists
    lookahead_update_(slow, fast, alpha)


def _foreach_update_(lists: TensorLists, alpha: float) -> None:
    slow, fast = lists
    foreach_update_(slow, fast, alpha)


def loop_update_(lists: TensorLists, alpha: float) -> None:
    """The per-parameter update of most public Lookahead wrappers."""
    slow, fast = lists
    for s, f in zip(slow, fast):
        s.add_(f - s, alpha=alpha)
        f.copy_(s)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "fused": Implementation(_fused_update_, bitwise=True),
    "foreach": Implementation(_foreach_update_, bitwise=True),
    # s + a(f - s) rounds differently from torch's lerp, f - (1 - a)(f - s).
    "loop": Implementation(loop_update_, bitwise=False),
}
