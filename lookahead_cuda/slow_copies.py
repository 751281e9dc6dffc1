"""Where and in which dtype each slow copy lives: the slow weights of a parameter, and the slow
copies of its inner optimizer's buffers (pullback's first moments).

One place decides it for every path that creates or moves a copy: taking the slow weights at the
first step, following a model that moved (``model.to(...)``), and loading a checkpoint.
"""

from __future__ import annotations

import torch

from lookahead_cuda.ops import SUPPORTED_DTYPE_PAIRS


class SlowCopies:
    """The placement rules of one Lookahead.

    Args:
        slow_device: ``None`` keeps each copy on its owner's device (the parameter or buffer it
            is a slow copy of); ``"cpu"`` keeps every copy in host memory, pinned when the owner
            is on CUDA so that a sync's chunks travel asynchronously.
        capturable: the syncs are decided on the device, so the host never updates anything.
    """

    def __init__(self, slow_device: str | torch.device | None, capturable: bool) -> None:
        if slow_device is not None and torch.device(slow_device).type != "cpu":
            raise ValueError(
                f"Invalid slow_device: {slow_device!r}; expected None (each parameter's device) "
                "or 'cpu'"
            )
        if slow_device is not None and capturable:
            raise ValueError(
                "slow_device='cpu' updates the slow weights on the host, which a capturable step "
                "never waits for; use one or the other"
            )
        self.slow_device = None if slow_device is None else torch.device(slow_device)

    def home(self, owner: torch.Tensor) -> torch.device:
        """The device a slow copy of ``owner`` lives on."""
        return self.slow_device or owner.device

    @staticmethod
    def dtype(
        requested: torch.dtype | None, owner: torch.Tensor, kept: torch.dtype | None = None
    ) -> torch.dtype:
        """The dtype of a slow copy of ``owner``: ``kept`` (an existing copy's, e.g. a
        checkpoint's) where the kernels support it beside the owner's dtype, else ``requested``
        (the group's ``slow_dtype``), else the owner's own."""
        if kept is not None and (kept, owner.dtype) in SUPPORTED_DTYPE_PAIRS:
            return kept
        return requested or owner.dtype

    def is_placed(self, copy: torch.Tensor, owner: torch.Tensor) -> bool:
        """Whether ``copy`` is where, and in a dtype that, a slow copy of ``owner`` must be."""
        return (
            copy.device == self.home(owner) and (copy.dtype, owner.dtype) in SUPPORTED_DTYPE_PAIRS
        )

    def copy(self, source: torch.Tensor, dtype: torch.dtype, owner: torch.Tensor) -> torch.Tensor:
        """A new slow copy of ``owner`` holding ``source``'s values in ``dtype``, made in one copy
        from wherever ``source`` is (the owner itself, a checkpoint on the CPU, the old device of a
        moved model)."""
        home = self.home(owner)
        if not (home.type == "cpu" and owner.device.type == "cuda"):
            return source.detach().to(home, dtype, copy=True)
        copy = torch.empty(source.shape, dtype=dtype, device=home, pin_memory=True)
        return copy.copy_(source.detach())
