"""Python face of the compiled ops ``torch.ops.lookahead_cuda.*``: ``lookahead_update_``, its
device-gated form ``lookahead_update_if_``, and ``found_nonfinite_``.

Holds the ops' fake kernels (for torch.compile and meta tensors) and the torch fallbacks used on
devices for which no kernel was compiled. The wrappers call the compiled ops through ``_C``'s eager
entry points where they can (see ``_compiling``), through ``torch.ops`` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lookahead_cuda import _C

_BUILD_INFO: dict[str, Any] = dict(_C.build_info())

# Device types with a compiled kernel (meta: the fake kernel below). A constant, so torch.compile
# folds the choice away.
_KERNEL_DEVICE_TYPES = frozenset({"cpu", "meta", *(("cuda",) if _BUILD_INFO["cuda"] else ())})


# The (slow, fast) dtype pairs the kernels accept (csrc/dtype_pairs.h).
SUPPORTED_DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
)


def _compiling() -> bool:
    """Whether torch.compile is tracing the caller: it traces the registered ops (torch.ops), while
    the eager entry points of ``_C`` (csrc/python_calls.cpp: the same ops without boxing each
    tensor, about 0.7 ms saved per call with 3000 parameters) would break its graph."""
    return torch.compiler.is_compiling()


def build_info() -> dict[str, Any]:
    """How the extension was compiled: ``{"torch": version, "cuda": bool, "openmp": bool}``."""
    return dict(_BUILD_INFO)


@torch.library.register_fake("lookahead_cuda::lookahead_update_")
def _lookahead_update_fake(
    slow: list[torch.Tensor], fast: list[torch.Tensor], alpha: float
) -> None:
    # Meta tensors outrank every backend in dispatch, so a call mixing devices with "meta" lands
    # here rather than in a kernel's validation: check what can be checked without data.
    _check_pairing(slow, fast, alpha)
    for name, tensors in (("slow", slow), ("fast", fast)):
        for i, t in enumerate(tensors):
            if t.device != slow[0].device:
                raise ValueError(
                    f"lookahead_update_: {name}[{i}] is on {t.device} but slow[0] is on "
                    f"{slow[0].device}; all tensors of a call must be on one device"
                )


@torch.library.register_fake("lookahead_cuda::lookahead_update_if_")
def _lookahead_update_if_fake(
    slow: list[torch.Tensor],
    fast: list[torch.Tensor],
    alpha: float,
    due: torch.Tensor,
    restore: torch.Tensor | None = None,
) -> None:
    _lookahead_update_fake(slow, fast, alpha)
    for name, flag in (("due", due), ("restore", restore)):
        if flag is not None:
            _check_flag("lookahead_update_if_", name, flag, slow[0].device if slow else None)


@torch.library.register_fake("lookahead_cuda::found_nonfinite_")
def _found_nonfinite_fake(
    tensors: list[torch.Tensor], found: torch.Tensor, due: torch.Tensor | None = None
) -> None:
    device = tensors[0].device if tensors else None
    _check_flag("found_nonfinite_", "found", found, device)
    if due is not None:
        _check_flag("found_nonfinite_", "due", due, device)


def _check_flag(op: str, name: str, flag: torch.Tensor, device: torch.device | None) -> None:
    if flag.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a torch.bool tensor, got {flag.dtype}")
    if flag.numel() != 1:
        raise ValueError(f"{op}: {name} must hold one element, got shape {tuple(flag.shape)}")
    if device is not None and flag.device != device:
        raise ValueError(
            f"{op}: {name} is on {flag.device} but the tensors are on {device}; "
            "the kernel reads it on their device"
        )


def _check_pairing(
    slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float
) -> None:
    if len(slow) != len(fast):
        raise ValueError(
            f"lookahead_update_: slow has {len(slow)} tensors but fast has {len(fast)}; "
            "the lists pair up element by element"
        )
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"lookahead_update_: alpha must be in (0, 1], got {alpha}")


def lookahead_update_(
    slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float
) -> None:
    """Lookahead's slow update, in place, for every pair ``(slow[i], fast[i])``::

        slow[i].lerp_(fast[i], alpha)   # slow <- slow + alpha * (fast - slow)
        fast[i].copy_(slow[i])          # fast weights restart from the slow ones

    One fused pass over memory (two reads, two writes per element), bitwise equal to the two torch
    ops above; for fp32 ``slow`` with fp16/bf16 ``fast``, the lerp runs in fp32 on the upcast fast
    weight and the result is rounded into ``fast``.

    Args:
        slow: slow weights, updated in place.
        fast: fast weights (usually the parameters), overwritten with the new slow weights.
        alpha: the slow-weights step size, in (0, 1].

    All tensors must be on one device, dense, pairwise of equal shape, share no memory, and form one
    (slow, fast) dtype pair: (f32, f32), (f64, f64), (f16, f16), (bf16, bf16), (f32, f16) or
    (f32, bf16). Call it under ``torch.no_grad()`` when ``fast`` holds parameters. A rejected call
    raises ``ValueError``/``TypeError`` naming the offending index and changes nothing.
    """
    if len(slow) == 0 and len(fast) == 0:
        return
    device_type = (slow[0] if len(slow) else fast[0]).device.type
    if device_type in _KERNEL_DEVICE_TYPES:
        if _compiling() or not _C.try_lookahead_update_(slow, fast, alpha):
            torch.ops.lookahead_cuda.lookahead_update_(list(slow), list(fast), alpha)
    else:
        foreach_update_(slow, fast, alpha)


def foreach_update_(
    slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float
) -> None:
    """The same update with torch's foreach ops (five passes over memory and, for mixed dtypes, a
    cast of every fast tensor): the fallback for devices without a kernel, and a benchmark baseline.
    """
    _check_pairing(slow, fast, alpha)
    fast_as_slow = [f if f.dtype == s.dtype else f.to(s.dtype) for s, f in zip(slow, fast)]
    torch._foreach_lerp_(list(slow), fast_as_slow, alpha)
    torch._foreach_copy_(list(fast), list(slow))


def lookahead_update_if_(
    slow: Sequence[torch.Tensor],
    fast: Sequence[torch.Tensor],
    alpha: float,
    due: torch.Tensor,
    restore: torch.Tensor | None = None,
) -> None:
    """:func:`lookahead_update_` decided on the device: the kernel reads the flags itself, so the
    host never waits for them, and a CUDA graph that captured the call replays the decision::

        if due:
            if restore:  fast[i].copy_(slow[i])       # divergence guard: slow stays as it is
            else:        slow[i].lerp_(fast[i], alpha); fast[i].copy_(slow[i])

    Args:
        slow, fast, alpha: as for :func:`lookahead_update_`.
        due: one-element ``torch.bool`` tensor on the tensors' device.
        restore: ``None`` (never restore) or a one-element ``torch.bool`` tensor on that device.
    """
    if len(slow) == 0 and len(fast) == 0:
        return
    device_type = (slow[0] if len(slow) else fast[0]).device.type
    if device_type in _KERNEL_DEVICE_TYPES:
        if _compiling() or not _C.try_lookahead_update_if_(slow, fast, alpha, due, restore):
            torch.ops.lookahead_cuda.lookahead_update_if_(
                list(slow), list(fast), alpha, due, restore
            )
        return
    _check_pairing(slow, fast, alpha)
    # Elsewhere, the decision through torch.where, so that it stays on the device there too.
    take_lerp = due if restore is None else due & ~restore
    for s, f in zip(slow, fast):
        s.copy_(torch.where(take_lerp, s.lerp(f.to(s.dtype), alpha), s))
        f.copy_(torch.where(due, s.to(f.dtype), f))


def found_nonfinite_(
    tensors: Sequence[torch.Tensor], found: torch.Tensor, due: torch.Tensor | None = None
) -> None:
    """Set ``found`` (a one-element ``torch.bool`` tensor on the tensors' device) to True if any
    element of ``tensors`` (one floating dtype) is NaN or infinite; leave it as it is otherwise.

    One read-only pass on the device; the host does not wait for the answer. With ``due`` (a
    one-element ``torch.bool`` tensor there), nothing is read unless it holds True.
    """
    if len(tensors) == 0:
        return
    if tensors[0].device.type in _KERNEL_DEVICE_TYPES:
        if _compiling() or not _C.try_found_nonfinite_(tensors, found, due):
            torch.ops.lookahead_cuda.found_nonfinite_(list(tensors), found, due)
        return
    for t in tensors:
        bad = ~torch.isfinite(t).all()
        found.logical_or_(bad if due is None else bad & due)
