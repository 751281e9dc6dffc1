"""Lookahead's sync as functions over (slow, fast) tensor pairs: the functional core the
:class:`~lookahead_cuda.Lookahead` optimizer calls, public for anyone composing an optimizer of
their own, as ``torch.optim.adamw.adamw`` is for AdamW.

A sync sorts the pairs into buckets of one (device, slow dtype, fast dtype) once
(:func:`bucket_pairs`), then makes one fused call per bucket (:func:`sync_buckets`), choosing the
implementation from its arguments, never from where the tensors happen to be:

* ``lookahead_update_``: Lookahead's lerp (``momentum=0``), the host knowing the sync is due;
* ``lookahead_momentum_update_``: the outer-momentum sync (SNOO) when ``momentum > 0`` and the
  buckets carry momentum buffers;
* their ``..._if_`` forms when the sync is decided by flags on the device (``due``, ``restore``),
  as CUDA graphs and compiled steps need;
* ``offloaded_update_`` around any of them when the slow tensors live in host memory
  (``offload``) and the fast ones on an accelerator: the fast weights travel to the host in chunks.

Before the sync, :func:`average_over_workers` makes it DiLoCo's outer step: the fast weights (or
the pseudo-gradients) are averaged over the processes of a group, which otherwise never talk.

Devices without a kernel of ours run ATen one tensor at a time, inside the op. FSDP2's DTensors
are synced through their local shards: a slow copy made from its parameter has the same
placements, so the shards pair up element by element and nothing is gathered. Example::

    >>> from lookahead_cuda.functional import lookahead_sync
    >>> slow, fast = [torch.zeros(3)], [torch.ones(3)]
    >>> lookahead_sync(slow, fast, alpha=0.5)
    >>> slow[0]
    tensor([0.5000, 0.5000, 0.5000])
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lookahead_cuda.offload import StagingBuffers, offloaded_update_, runs_by_bytes
from lookahead_cuda.ops import (
    QUANTIZATION_BLOCK,
    check_sync,
    dequantize_mean_,
    found_nonfinite_,
    lookahead_momentum_update_,
    lookahead_momentum_update_if_,
    lookahead_update_,
    lookahead_update_if_,
    quantize_pseudo_gradients_,
)
from lookahead_cuda.settings import MOMENTUM_RANGE, momentum_in_range

__all__ = [
    "AVERAGE_BUCKET_BYTES",
    "Averaging",
    "Bucket",
    "BucketKey",
    "average_over_workers",
    "bucket_pairs",
    "check_buckets",
    "local",
    "lookahead_sync",
    "merge_buckets",
    "mesh_group",
    "nonfinite_flag",
    "start_average",
    "sync_buckets",
]

#: (device, slow dtype, fast dtype) of a bucket's local tensors.
BucketKey = tuple[torch.device, torch.dtype, torch.dtype]


@dataclass
class Bucket:
    """Pairs of one (device, slow dtype, fast dtype), as the local tensors the op updates, with the
    outer momentum buffer of each pair when the sync has momentum (``None`` otherwise).

    ``names`` optionally says, for error messages, what each fast tensor is ("parameter 3 of
    param group 0"); a bucket without names is reported by list index.
    """

    slow: list[torch.Tensor] = field(default_factory=list)
    fast: list[torch.Tensor] = field(default_factory=list)
    momentum: list[torch.Tensor] | None = None
    names: list[str] | None = None

    def add(
        self,
        slow: torch.Tensor,
        fast: torch.Tensor,
        momentum: torch.Tensor | None = None,
        name: str | None = None,
    ) -> None:
        self.slow.append(slow)
        self.fast.append(fast)
        if momentum is not None:
            if self.momentum is None:
                self.momentum = []
            self.momentum.append(momentum)
        if name is not None:
            if self.names is None:
                self.names = []
            self.names.append(name)

    def name(self, i: int) -> str:
        return self.names[i] if self.names else f"fast[{i}]"


Buckets = dict[BucketKey, Bucket]


def _sharded_types() -> tuple[type, ...]:
    # A DTensor exists only once its module is loaded, and importing it here would cost every user
    # the import of torch.distributed (most of a second).
    module = sys.modules.get("torch.distributed.tensor")
    return (module.DTensor,) if module is not None else ()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` that this process holds: a DTensor's local shard, else itself."""
    if isinstance(tensor, _sharded_types()):
        return tensor._local_tensor  # type: ignore[attr-defined]
    return tensor


def mesh_group(tensors: Iterable[torch.Tensor]) -> Any:
    """The process group of the first DTensor among ``tensors``, or None."""
    sharded = _sharded_types()
    for t in tensors:
        if isinstance(t, sharded):
            return t.device_mesh.get_group()  # type: ignore[attr-defined]
    return None


def bucket_pairs(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    names: Iterable[str] | None = None,
    momentum: Iterable[torch.Tensor] | None = None,
) -> Buckets:
    """The pairs ``(slow, fast)`` sorted into buckets keyed by (device of fast, slow dtype, fast
    dtype), in order, each tensor replaced by its local shard; ``names`` name the fast tensors,
    ``momentum`` gives each pair's outer momentum buffer."""
    buckets: Buckets = {}
    named = iter(names) if names is not None else None
    buffers = iter(momentum) if momentum is not None else None
    for slow, fast in pairs:
        slow, fast = local(slow), local(fast)
        key = (fast.device, slow.dtype, fast.dtype)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket()
        buffer = None if buffers is None else local(next(buffers))
        bucket.add(slow, fast, buffer, None if named is None else next(named))
    return buckets


def merge_buckets(many: Iterable[Buckets]) -> Buckets:
    """Buckets of the same key joined, so that they sync in one call. Buckets with momentum
    buffers join only buckets with them."""
    merged: Buckets = {}
    for buckets in many:
        for key, bucket in buckets.items():
            into = merged.setdefault(key, Bucket())
            if into.fast and (into.momentum is None) != (bucket.momentum is None):
                raise ValueError("merge_buckets: buckets with and without momentum buffers")
            named = into.names is not None or bucket.names is not None
            if named:
                into.names = [into.name(i) for i in range(len(into.fast))] + [
                    bucket.name(i) for i in range(len(bucket.fast))
                ]
            into.slow.extend(bucket.slow)
            into.fast.extend(bucket.fast)
            if bucket.momentum is not None:
                into.momentum = [*(into.momentum or []), *bucket.momentum]
    return merged


def check_buckets(
    buckets: Buckets, alpha: float, *, momentum: float = 0.0, offload: bool = False
) -> None:
    """Raise the error that :func:`sync_buckets` would raise, before anything is written: so that
    a sync over several buckets either runs them all or changes nothing. The error names tensors
    by the buckets' ``names`` where they have them. ``offload``: the slow tensors are in host
    memory and the fast ones on another device, so each pair is checked as the host will see it
    (on meta tensors of the same shapes, strides and dtypes)."""
    for bucket in buckets.values():
        lists = [bucket.slow, bucket.fast, bucket.momentum if momentum > 0 else None]
        if offload:
            for i, slow in enumerate(bucket.slow):
                if slow.device.type != "cpu":
                    raise ValueError(
                        f"the slow copy of {bucket.name(i)} is on {slow.device}; offloaded slow "
                        "copies live in host memory"
                    )
            lists = [None if tensors is None else list(map(_meta, tensors)) for tensors in lists]
        check_sync(*lists, alpha, momentum, bucket.names or ())


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")


def _check_momentum(momentum: Any) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"sync_buckets: momentum must be a number, got {type(momentum).__name__}")
    if not momentum_in_range(momentum):
        raise ValueError(f"sync_buckets: momentum must be in {MOMENTUM_RANGE}, got {momentum!r}")


def _on(device: torch.device, flag: torch.Tensor | None) -> torch.Tensor | None:
    return None if flag is None else flag.to(device)


def sync_buckets(
    buckets: Buckets,
    alpha: float,
    *,
    momentum: float = 0.0,
    nesterov: bool = True,
    due: torch.Tensor | None = None,
    restore: torch.Tensor | None = None,
    offload: StagingBuffers | None = None,
) -> None:
    """The sync of every bucket, one fused call each.

    Args:
        buckets: from :func:`bucket_pairs` (or :func:`merge_buckets`).
        alpha: the slow-weights step size (with momentum, the outer learning rate), in (0, 1].
        momentum: the outer momentum coefficient, in [0, 1) (default: 0, Lookahead's lerp, bitwise
            torch's; the buffers, if any, are then left as they are). With ``momentum > 0`` every
            bucket must carry its buffers.
        nesterov: Nesterov's outer momentum (the default), or heavy ball.
        due: ``None`` (the sync is due) or a one-element ``torch.bool`` tensor that decides it on
            the device.
        restore: ``None`` (never restore) or a one-element ``torch.bool`` tensor: where it holds
            True, the fast weights restart from the slow ones, which stay as they are (with their
            momentum): the divergence guard.
        offload: the staging buffers of slow tensors kept in host memory (their fast tensors on
            another device); ``None`` when every slow copy lives beside its fast tensor.

    A call that fails validation raises ``ValueError``/``TypeError`` and changes its bucket in no
    way; use :func:`check_buckets` first to keep earlier buckets unchanged too.
    """
    if not torch.compiler.is_compiling():  # traced, momentum may be a symbolic float
        _check_momentum(momentum)
    for name, flag in (("due", due), ("restore", restore)):
        if flag is not None and not (isinstance(flag, torch.Tensor) and flag.dtype == torch.bool):
            got = (
                f"a {flag.dtype} tensor" if isinstance(flag, torch.Tensor) else type(flag).__name__
            )
            raise TypeError(
                f"sync_buckets: {name} must be a one-element torch.bool tensor or None, got {got}"
            )
    for (device, _, _), bucket in buckets.items():
        if not bucket.fast:
            continue
        buffers = bucket.momentum if momentum > 0 else None
        if momentum > 0 and buffers is None:
            raise ValueError("sync_buckets: momentum > 0 needs every bucket's momentum buffers")
        if offload is not None:
            _sync_offloaded(bucket, buffers, alpha, momentum, nesterov, due, restore, offload)
        elif due is None and restore is None:
            if buffers is None:
                lookahead_update_(bucket.slow, bucket.fast, alpha)
            else:
                lookahead_momentum_update_(
                    bucket.slow, bucket.fast, buffers, alpha, momentum, nesterov
                )
        else:
            gate = torch.ones((), dtype=torch.bool, device=device) if due is None else due
            gate, restore_here = gate.to(device), _on(device, restore)
            if buffers is None:
                lookahead_update_if_(bucket.slow, bucket.fast, alpha, gate, restore_here)
            else:
                lookahead_momentum_update_if_(
                    bucket.slow,
                    bucket.fast,
                    buffers,
                    alpha,
                    momentum,
                    nesterov,
                    gate,
                    restore_here,
                )


def _sync_offloaded(
    bucket: Bucket,
    buffers: list[torch.Tensor] | None,
    alpha: float,
    momentum: float,
    nesterov: bool,
    due: torch.Tensor | None,
    restore: torch.Tensor | None,
    staging: StagingBuffers,
) -> None:
    # The host runs the update, so it reads the flags: it waits for them here.
    host = torch.device("cpu")
    if due is not None and not bool(due.to(host)):
        return
    restoring = restore is not None and bool(restore.to(host))
    update: Callable[[list[int], list[torch.Tensor]], None]
    if restoring:

        def update(indices: list[int], staged: list[torch.Tensor]) -> None:
            for i, view in zip(indices, staged):
                view.copy_(bucket.slow[i])

    elif buffers is None:

        def update(indices: list[int], staged: list[torch.Tensor]) -> None:
            lookahead_update_([bucket.slow[i] for i in indices], staged, alpha)

    else:

        def update(indices: list[int], staged: list[torch.Tensor]) -> None:
            lookahead_momentum_update_(
                [bucket.slow[i] for i in indices],
                staged,
                [buffers[i] for i in indices],
                alpha,
                momentum,
                nesterov,
            )

    offloaded_update_(bucket.fast, update, staging)


#: Bytes per all-reduce when averaging over workers: DDP's default bucket (bucket_cap_mb=25).
AVERAGE_BUCKET_BYTES = 25 << 20


@dataclass
class Averaging:
    """An average over the processes of a group, started by :func:`start_average`: for each run of
    one bucket's tensors, what this process sent and the collectives' handles (None: already
    done), and, for 8-bit pseudo-gradients, the gathered payloads and scales of every process."""

    runs: list[
        tuple[Bucket, list[int], torch.Tensor, Any, tuple[torch.Tensor, torch.Tensor] | None]
    ]
    world: int
    pseudo_gradient_dtype: torch.dtype | None

    def wait(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(fast tensor, the mean over the processes of what they sent for it), for every fast
        tensor: the mean of the fast weights in the slow dtype, or, with a
        ``pseudo_gradient_dtype``, ``slow - mean`` of the pseudo-gradients (in the slow dtype).
        Waits for each collective."""
        for bucket, run, flat, works, gathered in self.runs:
            for work in works:
                if work is not None:
                    work.wait()
            fast = [bucket.fast[i] for i in run]
            slow = [bucket.slow[i].to(fast[0].device) for i in run]
            if gathered is not None:
                means = [torch.empty_like(s) for s in slow]
                dequantize_mean_(slow, means, *gathered)
                yield from zip(fast, means)
                continue
            flat.div_(self.world)
            offset = 0
            for f, s in zip(fast, slow):
                mean = flat[offset : offset + f.numel()].view(f.shape)
                offset += f.numel()
                yield f, (mean if self.pseudo_gradient_dtype is None else s - mean.to(s.dtype))


#: The dtypes a pseudo-gradient may travel in: one all-reduce sums those; torch.int8 is sent as
#: blocks of 8-bit values with a float32 scale each, which no all-reduce can sum: every process
#: gathers every process's blocks, and averages them after dequantizing.
QUANTIZED = torch.int8


def start_average(
    buckets: Buckets,
    group: Any,
    *,
    pseudo_gradient_dtype: torch.dtype | None = None,
    bucket_bytes: int = AVERAGE_BUCKET_BYTES,
    async_op: bool = False,
) -> Averaging:
    """Start averaging what every process of ``group`` sends for the fast tensors of ``buckets``:
    the fast weights in the slow dtype, or their pseudo-gradients ``slow - fast`` in
    ``pseudo_gradient_dtype`` (``torch.int8``: 8-bit blocks, :func:`quantize_pseudo_gradients_`,
    gathered rather than all-reduced), in flat collectives of about ``bucket_bytes`` each. What is
    sent is copied first, so the fast tensors may change meanwhile (``async_op``: return before
    the collectives end, as a streamed fragment's average does while the inner steps go on)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    runs = []
    for bucket in buckets.values():
        if not bucket.fast:
            continue
        dtype = pseudo_gradient_dtype or bucket.slow[0].dtype
        sizes = [f.numel() * dtype.itemsize for f in bucket.fast]
        for run in runs_by_bytes(sizes, bucket_bytes):
            fast = [bucket.fast[i] for i in run]
            slow = [bucket.slow[i].to(fast[0].device, non_blocking=True) for i in run]
            gathered = None
            if pseudo_gradient_dtype == QUANTIZED:
                flat, scales = _quantized(slow, fast)
                gathered = (
                    flat.new_empty((world, flat.numel())),
                    scales.new_empty((world, scales.numel())),
                )
                works = [
                    dist.all_gather(list(rows.unbind(0)), sent, group=group, async_op=async_op)
                    for rows, sent in zip(gathered, (flat, scales))
                ]
            else:
                if pseudo_gradient_dtype is None:
                    flat = torch.cat([f.reshape(-1).to(dtype) for f in fast])
                else:
                    flat = torch.cat(
                        [(s - f.to(s.dtype)).reshape(-1).to(dtype) for s, f in zip(slow, fast)]
                    )
                works = [dist.all_reduce(flat, group=group, async_op=async_op)]
            runs.append((bucket, list(run), flat, works, gathered))
    return Averaging(runs, world, pseudo_gradient_dtype)


def _quantized(
    slow: list[torch.Tensor], fast: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    numel = sum(f.numel() for f in fast)
    blocks = sum(-(-f.numel() // QUANTIZATION_BLOCK) for f in fast)
    payload = torch.empty(numel, dtype=torch.int8, device=fast[0].device)
    scales = torch.empty(blocks, dtype=torch.float32, device=fast[0].device)
    quantize_pseudo_gradients_(slow, fast, payload, scales)
    return payload, scales


def average_over_workers(
    buckets: Buckets,
    group: Any,
    *,
    pseudo_gradient_dtype: torch.dtype | None = None,
    bucket_bytes: int = AVERAGE_BUCKET_BYTES,
) -> None:
    """Replace every fast tensor of ``buckets`` by its mean over the processes of ``group`` (a
    torch.distributed process group), in flat all-reduces of about ``bucket_bytes`` each: the
    average of DiLoCo's outer step, after which the sync's pseudo-gradient ``slow - fast`` is the
    workers' mean (the slow weights being the same on every process).

    With ``pseudo_gradient_dtype=None`` the fast weights travel in the slow dtype (fp32 for bf16
    parameters with fp32 slow weights, so that the mean is not rounded to bf16 before the step);
    with a dtype (``torch.bfloat16`` halves fp32's bytes; DiLoCo reports no loss from it) the
    pseudo-gradients travel in it and the fast weights become ``slow - mean``.
    """
    averaging = start_average(
        buckets, group, pseudo_gradient_dtype=pseudo_gradient_dtype, bucket_bytes=bucket_bytes
    )
    # Every collective ends before any fast tensor changes: a failed one leaves them all as they
    # were.
    for fast, mean in list(averaging.wait()):
        fast.copy_(mean)


def nonfinite_flag(
    buckets: Buckets,
    device: torch.device,
    due: torch.Tensor | None = None,
    agree_over: Any = None,
) -> torch.Tensor:
    """A one-element ``torch.bool`` tensor on ``device``: whether any fast tensor of ``buckets``
    holds a NaN or an infinity. Decided on the device; with ``due``, nothing is read unless it
    holds True. With ``agree_over``, a process group (of the DTensors' mesh, see
    :func:`mesh_group`; or the workers a sync averages over), the processes agree (one 1-byte
    all-reduce), so that none restores alone and none averages its blow-up into the others."""
    found = torch.zeros((), dtype=torch.bool, device=device)
    for (bucket_device, _, _), bucket in buckets.items():
        if not bucket.fast:
            continue
        gate = _on(bucket_device, due)
        if bucket_device == device:
            found_nonfinite_(bucket.fast, found, gate)
        else:
            here = torch.zeros((), dtype=torch.bool, device=bucket_device)
            found_nonfinite_(bucket.fast, here, gate)
            found |= here.to(device)
    if agree_over is not None:
        agreed = found.to(torch.uint8)
        torch.distributed.all_reduce(agreed, torch.distributed.ReduceOp.MAX, group=agree_over)
        found = agreed.bool()
    return found


def lookahead_sync(
    slow: Sequence[torch.Tensor],
    fast: Sequence[torch.Tensor],
    alpha: float,
    *,
    momentum_buffers: Sequence[torch.Tensor] | None = None,
    momentum: float = 0.0,
    nesterov: bool = True,
    due: torch.Tensor | None = None,
    restore: torch.Tensor | None = None,
    offload: StagingBuffers | None = None,
) -> None:
    """Lookahead's sync of the pairs ``(slow[i], fast[i])``, of any devices and dtype pairs:
    ``slow <- slow + alpha * (fast - slow); fast <- slow``, one fused call per (device, dtype pair);
    with ``momentum > 0`` and ``momentum_buffers`` (one per pair, in the slow dtype, zeros at
    first), the outer-momentum sync. The keyword arguments are those of :func:`sync_buckets`. All
    buckets are validated before the first one is synced, so a rejected call changes nothing."""
    if len(slow) != len(fast) or (
        momentum_buffers is not None and len(momentum_buffers) != len(slow)
    ):
        raise ValueError(
            f"lookahead_sync: slow has {len(slow)} tensors, fast {len(fast)}"
            + ("" if momentum_buffers is None else f", momentum_buffers {len(momentum_buffers)}")
            + "; the lists pair up element by element"
        )
    buckets = bucket_pairs(zip(slow, fast), momentum=momentum_buffers)
    if not buckets:  # nothing to sync: the arguments are still checked, as the ops check them
        if momentum > 0:
            lookahead_momentum_update_([], [], [], alpha, momentum, nesterov)
        else:
            lookahead_update_([], [], alpha)
    if (len(buckets) > 1 or offload is not None) and not torch.compiler.is_compiling():
        # Named by their place in the caller's lists, not in their bucket.
        names = (f"fast[{i}]" for i in range(len(fast)))
        named = bucket_pairs(zip(slow, fast), names, momentum=momentum_buffers)
        check_buckets(named, alpha, momentum=momentum, offload=offload is not None)
    sync_buckets(
        buckets,
        alpha,
        momentum=momentum,
        nesterov=nesterov,
        due=due,
        restore=restore,
        offload=offload,
    )
