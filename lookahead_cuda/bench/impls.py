"""The implementations of the Lookahead sync that the benchmark times, by name (the fused op,
torch's foreach ops, the per-parameter loop), and the reference every one of them must reproduce.
Adding one is adding an entry to ``IMPLEMENTATIONS``.

With ``momentum > 0`` the sync is SNOO's outer step (Nesterov momentum on the pseudo-gradient),
over three lists (slow, fast, momentum buffers); otherwise Lookahead's lerp over two."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lookahead_cuda import lookahead_update_
from lookahead_cuda.bench.workload import TensorLists
from lookahead_cuda.ops import lookahead_momentum_update_


@dataclass(frozen=True)
class Sync:
    """What one sync computes: Lookahead's lerp with step size ``alpha``, or with ``momentum > 0``
    the outer-momentum step with outer learning rate ``alpha``."""

    alpha: float
    momentum: float = 0.0


@dataclass(frozen=True)
class Implementation:
    #: Updates the workload's lists (slow, fast[, momentum]) in place.
    update: Callable[[TensorLists, Sync], None]
    #: Whether it gives the reference's result bit for bit; if not, to within the dtype's
    #: precision. The outer-momentum sync has no bitwise torch reference.
    bitwise: bool


def reference_update_(lists: TensorLists, sync: Sync) -> None:
    """The sync's definition in plain torch, one tensor at a time: torch's lerp_/copy_ for
    Lookahead, the papers' update in float64 for the outer momentum."""
    if sync.momentum == 0:
        slow, fast = lists
        for s, f in zip(slow, fast):
            s.lerp_(f.to(s.dtype), sync.alpha)
            f.copy_(s)
        return
    for s, f, b in zip(*lists):
        d = s.double() - f.double()
        buffer = sync.momentum * b.double() + d
        s.copy_(s.double() - sync.alpha * (d + sync.momentum * buffer))
        b.copy_(buffer)
        f.copy_(s)


def _fused_update_(lists: TensorLists, sync: Sync) -> None:
    if sync.momentum == 0:
        lookahead_update_(*lists, sync.alpha)
    else:
        lookahead_momentum_update_(*lists, sync.alpha, sync.momentum)


def foreach_update_(
    slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float
) -> None:
    """:func:`~lookahead_cuda.lookahead_update_` with torch's foreach ops, ``_foreach_lerp_`` then
    ``_foreach_copy_`` (five passes over memory and, for mixed dtypes, a cast of every fast
    tensor): the ``foreach`` baseline."""
    fast_as_slow = [f if f.dtype == s.dtype else f.to(s.dtype) for s, f in zip(slow, fast)]
    torch._foreach_lerp_(list(slow), fast_as_slow, alpha)
    torch._foreach_copy_(list(fast), list(slow))


def foreach_momentum_update_(
    slow: Sequence[torch.Tensor],
    fast: Sequence[torch.Tensor],
    momentum: Sequence[torch.Tensor],
    lr: float,
    mu: float,
    nesterov: bool = True,
) -> None:
    """:func:`~lookahead_cuda.ops.lookahead_momentum_update_` with torch's foreach ops, in the slow
    dtype (rounded per operation, so not bitwise the fused op): the ``foreach`` baseline of the
    outer-momentum sync."""
    slow, momentum = list(slow), list(momentum)
    fast_as_slow = [f if f.dtype == s.dtype else f.to(s.dtype) for s, f in zip(slow, fast)]
    pseudo_gradient = torch._foreach_sub(slow, fast_as_slow)
    torch._foreach_mul_(momentum, mu)
    torch._foreach_add_(momentum, pseudo_gradient)
    if nesterov:
        torch._foreach_add_(pseudo_gradient, momentum, alpha=mu)
        torch._foreach_add_(slow, pseudo_gradient, alpha=-lr)
    else:
        torch._foreach_add_(slow, momentum, alpha=-lr)
    torch._foreach_copy_(list(fast), slow)


def _foreach_update_(lists: TensorLists, sync: Sync) -> None:
    if sync.momentum == 0:
        foreach_update_(*lists, sync.alpha)
    else:
        foreach_momentum_update_(*lists, sync.alpha, sync.momentum)


def loop_update_(lists: TensorLists, sync: Sync) -> None:
    """The per-parameter update of most public Lookahead and SNOO wrappers."""
    if sync.momentum == 0:
        slow, fast = lists
        for s, f in zip(slow, fast):
            s.add_(f - s, alpha=sync.alpha)
            f.copy_(s)
        return
    for s, f, b in zip(*lists):
        d = s - f.to(s.dtype)
        b.mul_(sync.momentum).add_(d)
        s.sub_(d.add_(b, alpha=sync.momentum), alpha=sync.alpha)
        f.copy_(s)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "fused": Implementation(_fused_update_, bitwise=True),
    "foreach": Implementation(_foreach_update_, bitwise=True),
    # s + a(f - s) rounds differently from torch's lerp, f - (1 - a)(f - s).
    "loop": Implementation(loop_update_, bitwise=False),
}
