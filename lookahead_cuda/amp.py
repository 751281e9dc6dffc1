"""GradScaler's side of the inner step.

GradScaler leaves unscaling and skipping to an optimizer that says it handles them
(``_step_supports_amp_scaling``, as fused Adam does), handing it the scale and the inf flag as
attributes; Lookahead says so when its inner optimizer does, and passes them on. GradScaler never
calls ``step()`` of any other optimizer on a step it skips (inf/NaN gradients), so a wrapper cannot
see, or count, that step. Under a process group every worker must count every step (their syncs
call a collective together), so Lookahead then says so for any inner optimizer, and does here what
GradScaler would have done: unscale the gradients exactly as ``GradScaler.unscale_`` does, and
step unless an inf or NaN was found.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch


def inner_step(
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], float] | None,
    found_inf: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    handles_scaling: bool,
) -> float | None:
    """``optimizer.step(closure)`` under GradScaler's ``found_inf`` and ``grad_scale`` (None:
    not under GradScaler); ``handles_scaling``: ``optimizer`` unscales and skips itself."""
    if found_inf is None:
        return optimizer.step(closure)
    if not handles_scaling:
        return unscale_and_step(optimizer, closure, grad_scale, found_inf)
    optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]
    try:
        return optimizer.step(closure)
    finally:
        del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]


def unscale_and_step(
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], float] | None,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor,
) -> float | None:
    """``optimizer``'s gradients divided by ``grad_scale`` (None: GradScaler.unscale_ already
    did), then ``optimizer.step(closure)`` unless ``found_inf`` is nonzero (read on the host, as
    GradScaler reads it)."""
    if grad_scale is not None:
        grads: defaultdict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.dtype == torch.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")  # GradScaler's words
                # Of a sparse gradient, its values, as GradScaler unscales them.
                grad = param.grad._values() if param.grad.is_sparse else param.grad
                grads[grad.device, grad.dtype].append(grad)
        # GradScaler.unscale_'s inverse: the reciprocal in float64, rounded to float32.
        inv_scale = grad_scale.double().reciprocal().float()
        for (device, _), tensors in grads.items():
            ignored = torch.zeros(1, device=device)  # found_inf is known already
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, ignored, inv_scale.to(device))
    if found_inf.item():
        return None
    return optimizer.step(closure)
