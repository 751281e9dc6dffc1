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
from lookahead_cuda.bench.workload import TensorLists, Workload
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
    #: Bytes of the temporaries one call on the workload holds at once, beside its lists.
    scratch_bytes: Callable[[Workload, Sync], int] = lambda workload, sync: 0


def _casts(workload: Workload) -> bool:
    """Whether the fast tensors must be cast to the slow dtype for torch's ops to take them."""
    slow, fast = workload.dtypes[:2]
    return slow != fast


def _slow_tensors(workload: Workload, count: int, largest: bool) -> int:
    """Bytes of ``count`` temporaries in the slow dtype, each the size of the workload's largest
    tensor (made one tensor at a time) or of all of them (made over the lists at once)."""
    numel = workload.largest_numel if largest else workload.numel
    return count * numel * workload.dtypes[0].itemsize


def reference_scratch_bytes(workload: Workload, sync: Sync) -> int:
    """Bytes of the temporaries :func:`reference_update_` holds at once: the fast tensor cast to
    the slow dtype; with momentum, about five float64 tensors (the inputs promoted, the
    pseudo-gradient, the buffer, the step)."""
    if sync.momentum == 0:
        return _slow_tensors(workload, 1, largest=True) if _casts(workload) else 0
    return 5 * workload.largest_numel * torch.float64.itemsize


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


def _foreach_scratch_bytes(workload: Workload, sync: Sync) -> int:
    """The cast of every fast tensor, and with momentum the pseudo-gradients, all at once."""
    return _slow_tensors(workload, int(_casts(workload)) + int(sync.momentum > 0), largest=False)


def _foreach_update_(lists: TensorLists, sync: Sync) -> None:
    if sync.momentum == 0:
        foreach_update_(*lists, sync.alpha)
    else:
        foreach_momentum_update_(*lists, sync.alpha, sync.momentum)


def _loop_scratch_bytes(workload: Workload, sync: Sync) -> int:
    """One tensor's ``f - s``, or with momentum its cast and its pseudo-gradient."""
    return _slow_tensors(workload, 1 + int(sync.momentum > 0 and _casts(workload)), largest=True)


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
    "foreach": Implementation(_foreach_update_, bitwise=True, scratch_bytes=_foreach_scratch_bytes),
    # s + a(f - s) rounds differently from torch's lerp, f - (1 - a)(f - s).
    "loop": Implementation(loop_update_, bitwise=False, scratch_bytes=_loop_scratch_bytes),
}
