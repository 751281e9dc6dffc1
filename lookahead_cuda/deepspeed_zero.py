"""Evaluation on the slow weights under DeepSpeed ZeRO.

ZeRO steps the client optimizer (Lookahead) on flat fp32 master partitions and copies them into
the module's own parameters after each step. ``Lookahead.slow_weights()`` swaps the slow weights
into those masters, so the module does not see them until they are copied too; at stage 3 the
client's param groups are even empty between steps. :func:`slow_weights` does both halves, with
DeepSpeed's own copy functions, and puts everything back on exit; :func:`slow_state_dict` exports
the module on the slow weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lookahead_cuda.optimizer import Lookahead


def _lookahead_of(engine: Any) -> Lookahead:
    zero = getattr(engine, "optimizer", None)
    inner = getattr(zero, "optimizer", None)
    if not isinstance(inner, Lookahead):
        raise TypeError(
            "slow_weights(engine) takes a DeepSpeed engine whose ZeRO optimizer wraps a Lookahead "
            f"(deepspeed.initialize(..., optimizer=Lookahead(...))); got {type(engine).__name__}"
        )
    return inner


def _copy_masters_into_module(zero: Any, stage: int) -> None:
    if stage < 3:
        zero.update_lp_params()
        return
    # What ZeRO-3's step() does after each sub-group's optimizer step (private: checked above).
    for sub_group in range(len(zero.fp16_groups)):
        zero._reassign_or_swap_out_partitioned_parameters(sub_group)
    if zero.persistent_parameters:  # small parameters stay gathered between steps
        zero.persistent_parameters[0].all_gather(zero.persistent_parameters)


_STAGE3_FUNCTIONS = (
    "_set_fp32_optimizer_param_groups",
    "_clear_fp32_optimizer_param_groups",
    "_reassign_or_swap_out_partitioned_parameters",
)


@contextlib.contextmanager
def slow_weights(engine: Any) -> Iterator[None]:
    """``engine.module`` holds the slow weights inside the block (its fp32 masters too), the fast
    ones again on exit, for ZeRO stages 1, 2 and 3 (tested with DeepSpeed 0.19)::

        with lookahead_cuda.deepspeed_zero.slow_weights(engine):
            evaluate(engine.module)

    Stages 1 and 2 copy the masters into the module with ``update_lp_params()``; stage 3 with the
    private functions its ``step()`` uses, and the block refuses to start, with a message, where
    a DeepSpeed release no longer has them.
    """
    lookahead = _lookahead_of(engine)
    if engine.__dict__.get("save_checkpoint") is _refuse_checkpoint:  # inside a block already
        yield
        return
    zero = engine.optimizer
    stage = engine.zero_optimization_stage()
    if stage == 3:
        missing = [name for name in _STAGE3_FUNCTIONS if not hasattr(zero, name)]
        if missing:
            raise RuntimeError(
                f"this DeepSpeed's ZeRO-3 optimizer lacks {', '.join(missing)}, with which the "
                "slow weights reach the module; evaluate Lookahead's slow weights by other means "
                "(opt.state_dict()['state'][i]['lookahead_slow_param'])"
            )
        # The client's groups are empty between ZeRO-3 steps: filled as its state_dict() fills
        # them, for Lookahead to find the masters.
        zero._set_fp32_optimizer_param_groups()
        try:
            lookahead.eval()
        finally:
            zero._clear_fp32_optimizer_param_groups()
    else:
        lookahead.eval()
    # A checkpoint saved here would hold the slow weights as ZeRO's fp32 masters, and DeepSpeed's
    # load copies its masters over the fast weights that Lookahead's load puts back.
    own = engine.__dict__.get("save_checkpoint")  # one set on the instance, kept
    engine.save_checkpoint = _refuse_checkpoint
    try:
        _copy_masters_into_module(zero, stage)
        yield
    finally:
        if own is None:
            del engine.save_checkpoint
        else:
            engine.save_checkpoint = own
        lookahead.train()
        _copy_masters_into_module(zero, stage)


def _refuse_checkpoint(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        "engine.save_checkpoint inside lookahead_cuda.deepspeed_zero.slow_weights(engine): the "
        "checkpoint would resume with the slow weights as the fast ones; save after the block"
    )


def slow_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """``engine.module.state_dict()`` on the slow weights, copied, full (gathered at stage 3):
    the model to save for deployment, as ``Lookahead.slow_state_dict(model)`` gives it without
    DeepSpeed. Training is left as it was."""
    import deepspeed  # optional: only this function needs it

    params = list(engine.module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    with slow_weights(engine), deepspeed.zero.GatheredParameters(params, enabled=partitioned):
        return {name: t.detach().clone() for name, t in engine.module.state_dict().items()}
