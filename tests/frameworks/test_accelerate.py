"""Lookahead under accelerate's Accelerator on the CPU: gradient accumulation, eval()/train()
through AcceleratedOptimizer, and save_state/load_state. What the user steps is accelerate's
AcceleratedOptimizer, which wraps the Lookahead and steps it only when gradients are synced."""

from __future__ import annotations

import pytest
import torch
from frameworks_common import (
    LR,
    K,
    assert_equal_tensors,
    batches,
    loss_of,
    make_model,
    plain_run,
)

from lookahead_cuda import Lookahead

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

ACCUMULATE = 4
MICRO_BATCHES = 24  # 6 optimizer steps: syncs after the 3rd and the 6th (K = 3)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerator's state is process-wide; start and leave each test with none."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def prepared():
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = make_model()
    lookahead = Lookahead(torch.optim.AdamW(model.parameters(), lr=LR), k=K)
    model, optimizer = accelerator.prepare(model, lookahead)
    return accelerator, model, optimizer, lookahead


def micro_step(accelerator, model, optimizer, batch) -> None:
    with accelerator.accumulate(model):
        accelerator.backward(loss_of(model, batch))
        optimizer.step()
        optimizer.zero_grad()


def counter(lookahead: Lookahead) -> int | None:
    """Lookahead's steps since the last sync, kept with the param group's first parameter (None
    before the first optimizer step)."""
    first = lookahead.param_groups[0]["params"][0]
    count = lookahead.lookahead_state.get(first, {}).get("step")
    return None if count is None else int(count)


def slow_weights(lookahead: Lookahead, model) -> list[torch.Tensor]:
    return [lookahead.lookahead_state[p]["slow_param"] for p in model.parameters()]


def test_gradient_accumulation_counts_optimizer_steps_not_micro_batches():
    accelerator, model, optimizer, lookahead = prepared()
    assert isinstance(optimizer, accelerate.optimizer.AcceleratedOptimizer)
    assert optimizer.optimizer is lookahead
    counts, synced = [], []
    for batch in batches(MICRO_BATCHES):
        micro_step(accelerator, model, optimizer, batch)
        counts.append(counter(lookahead))
        if counts[-1] is not None:
            synced.append(
                all(
                    torch.equal(s, p)
                    for s, p in zip(slow_weights(lookahead, model), model.parameters())
                )
            )
    # The count moves once per ACCUMULATE micro-batches, and wraps at K optimizer steps.
    assert counts == [None] * (ACCUMULATE - 1) + [
        (i // ACCUMULATE) % K for i in range(ACCUMULATE, MICRO_BATCHES + 1)
    ]
    # Slow and fast weights are equal from each K-th optimizer step to the next step, and only then.
    assert synced == [(i // ACCUMULATE) % K == 0 for i in range(ACCUMULATE, MICRO_BATCHES + 1)]
    reference, plain = plain_run(batches(MICRO_BATCHES), accumulate=ACCUMULATE)
    assert_equal_tensors(model.parameters(), reference.parameters(), "parameter")
    assert_equal_tensors(slow_weights(lookahead, model), plain.slow, "slow weights")


def test_accelerated_optimizer_eval_and_train_swap_the_slow_weights_in_and_out():
    accelerator, model, optimizer, lookahead = prepared()
    for batch in batches(ACCUMULATE * (K + 1)):  # one step past a sync: slow != fast
        micro_step(accelerator, model, optimizer, batch)
    fast = [p.detach().clone() for p in model.parameters()]
    slow = [s.clone() for s in slow_weights(lookahead, model)]
    assert not all(torch.equal(s, f) for s, f in zip(slow, fast))
    optimizer.eval()  # what transformers' Trainer calls before evaluating
    assert not lookahead.training
    assert_equal_tensors(model.parameters(), slow, "parameter in eval mode")
    optimizer.train()
    assert lookahead.training
    assert_equal_tensors(model.parameters(), fast, "parameter back in train mode")


@pytest.mark.parametrize("stop_after", [8, 12], ids=["mid-cycle", "at-a-sync"])
def test_save_state_load_state_resumes_exactly(tmp_path, stop_after):
    data = batches(MICRO_BATCHES)
    accelerator, model, optimizer, lookahead = prepared()
    for batch in data:
        micro_step(accelerator, model, optimizer, batch)
    straight = [p.detach().clone() for p in model.parameters()]
    straight_slow = [s.clone() for s in slow_weights(lookahead, model)]

    # Stopped at an optimizer step (accelerate saves no accumulated gradients), then resumed in
    # fresh objects from accelerate's own checkpoint.
    accelerator, model, optimizer, lookahead = prepared()
    for batch in data[:stop_after]:
        micro_step(accelerator, model, optimizer, batch)
    saved_count = counter(lookahead)
    accelerator.save_state(str(tmp_path / "state"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    accelerator, model, optimizer, lookahead = prepared()
    accelerator.load_state(str(tmp_path / "state"))
    assert counter(lookahead) == saved_count == (stop_after // ACCUMULATE) % K
    for batch in data[stop_after:]:
        micro_step(accelerator, model, optimizer, batch)
    assert_equal_tensors(model.parameters(), straight, "parameter")
    assert_equal_tensors(slow_weights(lookahead, model), straight_slow, "slow weights")
