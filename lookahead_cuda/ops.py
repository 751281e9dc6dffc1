"""Python face of the compiled ops ``torch.ops.lookahead_cuda.*``: ``lookahead_update_`` and the
outer-momentum ``lookahead_momentum_update_``, their device-gated forms (``..._if_``), and
``found_nonfinite_``.

Every backend is compiled (csrc/): the CPU and CUDA kernels, ATen one tensor at a time for other
devices, and validation alone for meta tensors, which is what torch.compile traces with. The
wrappers here check the Python types of the arguments, then make the one routing decision of
:func:`_call`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lookahead_cuda import _C

_BUILD_INFO: dict[str, Any] = dict(_C.build_info())


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."))
    assert isinstance(dtype, torch.dtype), name
    return dtype


#: The (slow, fast) dtype pairs the kernels accept, read from the extension (csrc/dtype_pairs.h).
SUPPORTED_DTYPE_PAIRS: tuple[tuple[torch.dtype, torch.dtype], ...] = tuple(
    (_dtype(slow), _dtype(fast)) for slow, fast in _C.supported_dtype_pairs()
)
#: The dtypes of those pairs, each once: what found_nonfinite_ reads and slow weights are kept in.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(map(_dtype, _C.supported_dtypes()))


def build_info() -> dict[str, Any]:
    """How the extension was compiled: ``{"torch": version, "cuda": bool, "openmp": bool}``."""
    return dict(_BUILD_INFO)


def check_sync(
    slow: Sequence[torch.Tensor],
    fast: Sequence[torch.Tensor],
    momentum: Sequence[torch.Tensor] | None,
    alpha: float,
    mu: float,
    names: Sequence[str] = (),
) -> None:
    """Raise the error that ``lookahead_update_(slow, fast, alpha)`` (with a ``momentum`` list,
    ``lookahead_momentum_update_(slow, fast, momentum, alpha, mu, ...)``) would raise, naming
    ``fast[i]`` ``names[i]`` where given (its slow copy and momentum after it); nothing otherwise.
    Nothing is read or written."""
    _C.check_sync(slow, fast, momentum, float(alpha), float(mu), list(names))


#: ``TensorFingerprint(tensors)`` records each tensor's data address, dtype, device, sizes and
#: strides; ``.matches()`` tells, in one pass that validates nothing, whether all are unchanged.
TensorFingerprint = _C.TensorFingerprint

#: The names of the ops under ``torch.ops.lookahead_cuda`` (csrc/op_declarations.h declares them).
OP_NAMES: tuple[str, ...] = tuple(_C.op_names())

# Each op's arguments, read from its registered schema (csrc/op_declarations.h declares it once):
# (name, type) with the schema's types, "List[Tensor]", "float", "bool", "Tensor" and
# "Optional[Tensor]".
_SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    name: tuple(
        (argument.name, str(argument.type))
        for argument in getattr(torch.ops.lookahead_cuda, name).default._schema.arguments
    )
    for name in OP_NAMES
}
_EAGER = {name: getattr(_C, "try_" + name) for name in _SIGNATURES}
_OPS = {name: getattr(torch.ops.lookahead_cuda, name) for name in _SIGNATURES}


def _check_arguments(op: str, args: Sequence[Any]) -> None:
    """A ``TypeError`` naming the first argument of the wrong Python type."""
    for (name, kind), value in zip(_SIGNATURES[op], args):
        if kind == "List[Tensor]":
            if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
                got = type(value).__name__
                raise TypeError(f"{op}: {name} must be a list of tensors, got {got}")
            for i, t in enumerate(value):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
        elif kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
        elif kind == "bool" and not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be True or False, got {type(value).__name__}")
        elif kind in ("Tensor", "Optional[Tensor]") and not (
            isinstance(value, torch.Tensor) or (kind == "Optional[Tensor]" and value is None)
        ):
            expected = "a tensor" + (" or None" if kind == "Optional[Tensor]" else "")
            raise TypeError(f"{op}: {name} must be {expected}, got {type(value).__name__}")


def _call(op: str, *args: Any) -> None:
    """Run the compiled op ``op``: through ``_C``'s eager entry point where it takes the call,
    through ``torch.ops`` otherwise, after any argument of the wrong Python type got a
    ``TypeError`` that names it.

    The eager entry points (csrc/python_calls.cpp) call the same registered op through the
    dispatcher without boxing each tensor into an ``IValue``, which saves about 0.7 ms per call with
    3000 tensors; they decline (doing nothing) unless every argument has exactly the type the schema
    names (no tensor subclass, no bool for a float) and no ``__torch_function__`` mode is active,
    which only ``torch.ops`` honours. torch.compile must see ``torch.ops`` to trace the op.
    """
    if not torch.compiler.is_compiling() and _EAGER[op](*args):
        return
    _check_arguments(op, args)
    _OPS[op](*(list(a) if isinstance(a, tuple) else a for a in args))


def lookahead_update_(
    slow: Sequence[torch.Tensor], fast: Sequence[torch.Tensor], alpha: float
) -> None:
    """Lookahead's slow update, in place, for every pair ``(slow[i], fast[i])``::

        slow[i].lerp_(fast[i], alpha)   # slow <- slow + alpha * (fast - slow)
        fast[i].copy_(slow[i])          # fast weights restart from the slow ones

    One fused pass over memory (two reads, two writes per element), bitwise equal to the two torch
    ops above wherever the result is not NaN (NaN results are NaN, with no promise on their sign
    and payload bits), except the sign of a zero result at ``alpha = 1``, where every device gets
    torch's scalar (CUDA) form and torch's CPU vector loops give the other sign; for fp32 ``slow``
    with fp16/bf16 ``fast``, the lerp runs in fp32 on the upcast
    fast weight and the result is rounded into ``fast``.

    Args:
        slow: slow weights, updated in place.
        fast: fast weights (usually the parameters), overwritten with the new slow weights.
        alpha: the slow-weights step size, in (0, 1].

    All tensors must be on one device, dense, pairwise of equal shape, share no memory, and form one
    (slow, fast) dtype pair: (f32, f32), (f64, f64), (f16, f16), (bf16, bf16), (f32, f16) or
    (f32, bf16). Call it under ``torch.no_grad()`` when ``fast`` holds parameters. A rejected call
    raises ``ValueError``/``TypeError`` naming the offending argument and changes nothing.
    """
    _call("lookahead_update_", slow, fast, alpha)


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
    _call("lookahead_update_if_", slow, fast, alpha, due, restore)


def lookahead_momentum_update_(
    slow: Sequence[torch.Tensor],
    fast: Sequence[torch.Tensor],
    momentum: Sequence[torch.Tensor],
    lr: float,
    mu: float,
    nesterov: bool = True,
) -> None:
    """The outer-momentum sync (SNOO, and DiLoCo's outer step), in place, for every triple
    ``(slow[i], fast[i], momentum[i])``, with the pseudo-gradient ``d = slow - fast``::

        momentum <- mu * momentum + d
        slow <- slow - lr * (d + mu * momentum)     # nesterov=True
        slow <- slow - lr * momentum                # nesterov=False (heavy ball)
        fast <- slow

    One fused pass (three reads, three writes per element) in the slow dtype's math type, each
    multiply-add rounded once (on the CPU where it has FMA), so the CPU and CUDA kernels agree;
    the buffer is stored in the slow dtype. ``mu = 0`` is Lookahead's update with ``alpha = lr``
    up to rounding: for that, :func:`lookahead_update_` is bitwise torch's.

    Args:
        slow, fast: as for :func:`lookahead_update_`.
        momentum: the outer momentum buffers, in the slow dtype, one per pair (zeros at first).
        lr: the outer learning rate, in (0, 1].
        mu: the momentum coefficient, in [0, 1).
        nesterov: Nesterov's form (the default) or heavy ball.
    """
    _call("lookahead_momentum_update_", slow, fast, momentum, lr, mu, nesterov)


def lookahead_momentum_update_if_(
    slow: Sequence[torch.Tensor],
    fast: Sequence[torch.Tensor],
    momentum: Sequence[torch.Tensor],
    lr: float,
    mu: float,
    nesterov: bool,
    due: torch.Tensor,
    restore: torch.Tensor | None = None,
) -> None:
    """:func:`lookahead_momentum_update_` decided on the device, as :func:`lookahead_update_if_`
    decides the plain sync: nothing unless ``due``; with ``restore``, ``fast <- slow`` with the
    slow weights and the momentum as they are."""
    _call("lookahead_momentum_update_if_", slow, fast, momentum, lr, mu, nesterov, due, restore)


#: Elements per block of the 8-bit pseudo-gradients, each block with one float32 scale.
QUANTIZATION_BLOCK: int = _C.quantization_block()


def quantize_pseudo_gradients_(
    slow: Sequence[torch.Tensor],
    fast: Sequence[torch.Tensor],
    payload: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """The pseudo-gradients ``slow[i] - fast[i]`` in 8 bits, for DiLoCo's average: in blocks of
    :data:`QUANTIZATION_BLOCK` elements of one tensor (in its memory order), each block as int8
    values ``round(p / max|p| * 127)`` in ``payload`` and its ``scale = max|p| / 127`` in
    ``scales``.

    Args:
        slow, fast: pairs as for :func:`lookahead_update_`, flat arrays in one element order
            (read only).
        payload: a contiguous int8 tensor of ``sum(numel)`` elements, written.
        scales: a contiguous float32 tensor of ``sum(ceil(numel / QUANTIZATION_BLOCK))``, written.

    A block holding a NaN or an infinity gets a NaN (or infinite) scale: it averages to NaN.
    """
    _call("quantize_pseudo_gradients_", slow, fast, payload, scales)


def dequantize_mean_(
    slow: Sequence[torch.Tensor],
    out: Sequence[torch.Tensor],
    payloads: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """``out[i] <- slow[i] - mean``, the mean over the workers of their dequantized
    pseudo-gradients: ``payloads`` and ``scales`` hold one row per worker, each as
    :func:`quantize_pseudo_gradients_` wrote it. The sum is taken in float32 in the rows' order,
    each ``q * scale`` added with one rounding, so every worker (and either backend) gets the same
    bits; the result is rounded to the slow dtype, then to ``out``'s."""
    _call("dequantize_mean_", slow, out, payloads, scales)


def found_nonfinite_(
    tensors: Sequence[torch.Tensor], found: torch.Tensor, due: torch.Tensor | None = None
) -> None:
    """Set ``found`` (a one-element ``torch.bool`` tensor on the tensors' device) to True if any
    element of ``tensors`` (one floating dtype) is NaN or infinite; leave it as it is otherwise.

    One read-only pass on the device; the host does not wait for the answer. With ``due`` (a
    one-element ``torch.bool`` tensor there), nothing is read unless it holds True.
    """
    _call("found_nonfinite_", tensors, found, due)
