"""DiLoCo through Lookahead(process_group=...): 2 and 3 gloo processes on the CPU, each training
its own replica, against a single-process simulation of all the replicas; checkpoints; the
divergence guard across workers. The processes run tests/diloco_worker.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from diloco_worker import (
    DISAGREEMENTS,
    LR,
    SETTINGS,
    SKIPPED_STEP,
    STEPS,
    STREAMED_FRAGMENTS,
    K,
)
from distributed_worker import global_batches, make_model
from exact_reference import dequantize_mean, quantize
from test_distributed import run_workers
from torch import nn

from lookahead_cuda import Lookahead

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)
WORKER = Path(__file__).with_name("diloco_worker.py")


def simulate(
    world: int,
    steps: int = STEPS,
    skipped: tuple[int, int] | None = None,
    pseudo_gradient_dtype: torch.dtype | None = None,
    k: int = K,
    fragments: list[list[int]] | None = None,
    delay: int = 0,
    mixing: float = 0.5,
) -> dict:
    """All the replicas in one process, independently of the optimizer's code: each trains on its
    rows of every batch; at its sync step (every K steps, or for fragment f of ``fragments``
    (lists of parameter indices), (f + 1) * k / F steps into every cycle of k) a fragment's fast
    weights are averaged and the outer Nesterov step taken from the common slow weights, which
    every replica restarts from. With ``delay`` the average is of the fast weights ``delay``
    steps before, and each replica's fast weights then become ``mixing * fast + (1 - mixing) *
    slow``. ``skipped``: (rank, step) of an inner step that replica does not take.
    ``pseudo_gradient_dtype``: each replica's pseudo-gradient is rounded to it, and summed and
    halved in it (exact for two workers, whose sum has one order)."""
    alpha, mu = SETTINGS["alpha"], SETTINGS["momentum"]
    models = [make_model() for _ in range(world)]
    inners = [torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9) for m in models]
    slow = [p.detach().clone() for p in models[0].parameters()]
    buffers = [torch.zeros_like(s) for s in slow]
    fragments = fragments or [list(range(len(slow)))]
    period = k // len(fragments)
    with torch.no_grad():  # every replica starts from process 0's weights
        for m in models[1:]:
            for p, s in zip(m.parameters(), slow):
                p.copy_(s)

    def averaged(i: int) -> torch.Tensor:
        replicas = [list(m.parameters())[i].detach() for m in models]
        if pseudo_gradient_dtype is None:
            return sum(replicas) / world
        if pseudo_gradient_dtype == torch.int8:  # exact_reference.py: what the kernels compute
            sent = [quantize(slow[i], r) for r in replicas]
            q_rows, scale_rows = [q for q, _ in sent], [scale for _, scale in sent]
            return dequantize_mean(slow[i], slow[i].dtype, q_rows, scale_rows)
        sent = [(slow[i] - r).to(pseudo_gradient_dtype) for r in replicas]
        return slow[i] - (sum(sent) / world).to(slow[i].dtype)

    in_flight: dict[int, torch.Tensor] = {}
    for step, (x, y) in enumerate(global_batches(steps, world), 1):
        for rank, (model, inner) in enumerate(zip(models, inners)):
            rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            inner.zero_grad()
            nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            if (rank, step) != skipped:
                inner.step()
        count = (step - 1) % k + 1
        with torch.no_grad():
            for f, indices in enumerate(fragments):
                if count != (f + 1) * period:
                    continue
                for i in indices:
                    mean = in_flight.pop(i) if delay else averaged(i)
                    d = slow[i] - mean
                    buffers[i] = mu * buffers[i] + d
                    slow[i] = slow[i] - alpha * (d + mu * buffers[i])
                    for m in models:
                        fast = list(m.parameters())[i]
                        fast.copy_(torch.lerp(fast, slow[i], 1 - mixing) if delay else slow[i])
            for f, indices in enumerate(fragments):
                if delay and count == (f + 1) * period - delay:
                    in_flight.update({i: averaged(i) for i in indices})
    return {
        "fast": [[p.detach().clone() for p in m.parameters()] for m in models],
        "slow": slow,
        "momentum": buffers,
    }


def assert_ranks_agree(results: list[dict], keys=("slow", "momentum")) -> None:
    for result in results[1:]:
        for key in keys:
            for a, b in zip(result[key], results[0][key]):
                assert torch.equal(a, b), key
        assert result["step"] == results[0]["step"]


@pytest.mark.parametrize("world", [2, 3])
def test_matches_a_simulation_of_all_replicas(world, tmp_path):
    results = run_workers("train", tmp_path, world, WORKER)
    assert_ranks_agree(results)
    assert results[0]["step"] == STEPS % K
    want = simulate(world)
    # Sums of the replicas in another order (gloo's ring) than the simulation's: float64 rounding.
    close = {"rtol": 1e-12, "atol": 1e-12}
    for result, fast in zip(results, want["fast"]):
        for a, b in zip(result["fast"], fast):
            torch.testing.assert_close(a, b, **close)
    for a, b in zip(results[0]["slow"] + results[0]["momentum"], want["slow"] + want["momentum"]):
        torch.testing.assert_close(a, b, **close)
    # Replicas diverge between syncs: not a single model trained by all.
    assert not all(torch.equal(a, b) for a, b in zip(results[0]["fast"], results[1]["fast"]))


@pytest.mark.parametrize(("world", "delay"), [(2, 0), (3, 0), (2, 1)])
def test_streamed_fragments_match_a_simulation_of_all_replicas(world, delay, tmp_path):
    # k = 4 in two fragments of the model's 4 tensors (equal bytes: the first weight is most of
    # them), fragment 0 syncing 2 steps into each cycle and fragment 1 at its end; with a delay,
    # each fragment's average starts one step before its sync, while training goes on.
    results = run_workers(f"streamed-{delay}", tmp_path, world, WORKER)
    assert_ranks_agree(results)
    want = simulate(world, k=4, fragments=STREAMED_FRAGMENTS, delay=delay)
    close = {"rtol": 1e-12, "atol": 1e-12}
    for result, fast in zip(results, want["fast"]):
        for a, b in zip(result["fast"], fast):
            torch.testing.assert_close(a, b, **close)
    for a, b in zip(results[0]["slow"] + results[0]["momentum"], want["slow"] + want["momentum"]):
        torch.testing.assert_close(a, b, **close)
    # Different from syncing the whole model at once: the fragments synced at different steps.
    whole = simulate(world, k=4)
    assert not all(torch.allclose(a, b, **close) for a, b in zip(want["slow"], whole["slow"]))
    # The run trains: the loss falls.
    assert results[0]["losses"][-1] < results[0]["losses"][0]


def test_a_step_grad_scaler_skips_on_one_worker_counts_on_every_worker(tmp_path):
    # GradScaler does not call step() of an optimizer that leaves scaling to it on a skipped step;
    # under a process group Lookahead takes scaling over, so that the skipped step still counts
    # and the workers' syncs stay together (they fell out of step, and hung, before).
    results = run_workers("grad-scaler", tmp_path, 2, WORKER)
    assert_ranks_agree(results)
    for result in results:
        assert result["counts"] == [step % K for step in range(1, STEPS + 1)]
    assert results[0]["scale"] == 2.0**10 and results[1]["scale"] == 2.0**9
    # Power-of-two scales unscale exactly: as if the skipping replica had not taken that step.
    want = simulate(2, skipped=(1, SKIPPED_STEP))
    close = {"rtol": 1e-12, "atol": 1e-12}
    for result, fast in zip(results, want["fast"]):
        for a, b in zip(result["fast"], fast):
            torch.testing.assert_close(a, b, **close)
    for a, b in zip(results[0]["slow"], want["slow"]):
        torch.testing.assert_close(a, b, **close)


def test_bf16_pseudo_gradients(tmp_path):
    results = run_workers("bf16", tmp_path, 2, WORKER)
    assert_ranks_agree(results)
    want = simulate(2, pseudo_gradient_dtype=torch.bfloat16)
    close = {"rtol": 1e-12, "atol": 1e-12}
    for a, b in zip(results[0]["slow"] + results[0]["fast"], want["slow"] + want["fast"][0]):
        torch.testing.assert_close(a, b, **close)
    # What bf16 changes is far more than the tolerance: averaging in float64 would fail above.
    unrounded = simulate(2)
    assert any(not torch.allclose(a, b, **close) for a, b in zip(want["slow"], unrounded["slow"]))


@pytest.mark.parametrize(("scenario", "streamed"), [("int8", False), ("streamed-int8", True)])
def test_8_bit_pseudo_gradients(scenario, streamed, tmp_path):
    results = run_workers(scenario, tmp_path, 2, WORKER)
    assert_ranks_agree(results)
    shape = {"k": 4, "fragments": STREAMED_FRAGMENTS, "delay": 1} if streamed else {}
    want = simulate(2, pseudo_gradient_dtype=torch.int8, **shape)
    close = {"rtol": 1e-12, "atol": 1e-12}
    for a, b in zip(results[0]["slow"] + results[0]["fast"], want["slow"] + want["fast"][0]):
        torch.testing.assert_close(a, b, **close)
    # The quantization changes the result far more than the tolerance: ignoring it would fail.
    unquantized = simulate(2, **shape)
    assert any(not torch.allclose(a, b, **close) for a, b in zip(want["slow"], unquantized["slow"]))
    assert results[0]["losses"][-1] < results[0]["losses"][0]


def test_slow_weights_in_host_memory(tmp_path):
    results = run_workers("offload", tmp_path, 2, WORKER)
    assert_ranks_agree(results)
    want = simulate(2)
    for a, b in zip(results[0]["slow"], want["slow"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "scenario", ["resume", "resume-dcp", "resume-streamed", "resume-streamed-dcp"]
)
def test_checkpoints_resume_exactly(scenario, tmp_path):
    for result in run_workers(scenario, tmp_path, 2, WORKER):
        # Streamed (k = 4, 2 fragments, delay 1): saved at step 5, fragment 0 in flight.
        assert result["counter_at_load"] == (5 % 4 if "streamed" in scenario else 7 % K)
        for key in ("fast", "slow", "momentum"):
            for a, b in zip(result["resumed"][key], result["straight"][key]):
                assert torch.equal(a, b), key


def test_a_blow_up_on_one_worker_makes_every_worker_restore(tmp_path):
    results = run_workers("guard", tmp_path, 2, WORKER)
    for result in results:
        assert result["restores"] == 1
        for a, b in zip(result["after"]["fast"], result["before"]["slow"]):
            assert torch.equal(a, b)  # restored from the slow weights, which stayed
        for key in ("slow", "momentum"):
            for a, b in zip(result["after"][key], result["before"][key]):
                assert torch.equal(a, b)


# What each disagreement must be reported as, on every worker alike.
EXPLAINED = {
    "alpha": "disagree on alpha of param group 0: worker 0 has 0.7, worker 1 has 0.5",
    "k": "disagree on k of param group 0: worker 0 has 3, worker 1 has 4",
    "restore": "disagree on nonfinite of param group 0: worker 0 has 'propagate', worker 1 has",
    "extra-parameter": "disagree on the number of parameters of param group 0",
    "transposed": "parameter 0 of param group 0: worker 0 has shape (2, 8)",
    "rejected-sync": "a sync was rejected, so no worker syncs: worker 1: ValueError",
}


@pytest.mark.parametrize("case", DISAGREEMENTS)
def test_workers_that_disagree_all_raise_the_same_error_and_none_hangs(case, tmp_path, monkeypatch):
    monkeypatch.setenv("COLLECTIVE_TIMEOUT_S", "20")  # a worker left waiting fails the test
    results = run_workers(f"disagree-{case}", tmp_path, 2, WORKER)
    errors = [result["error"] for result in results]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert EXPLAINED[case] in errors[0]
    # Found at construction, before the first collective of the broadcast; a rejected sync at
    # the step whose sync it would be.
    assert [result["step"] for result in results] == [K if case == "rejected-sync" else 0] * 2


def test_workers_whose_inner_states_differ_save_and_resume_their_own(tmp_path):
    results = run_workers("uneven-state", tmp_path, 2, WORKER)
    # The last worker never stepped the last parameter, so AdamW holds no state for it there.
    assert results[0]["inner_entries"] == (4, 4) and results[1]["inner_entries"] == (3, 3)
    for result in results:
        for key in ("fast", "slow", "momentum"):
            for a, b in zip(result["resumed"][key], result["straight"][key]):
                assert torch.equal(a, b), key


def test_refuses_what_cannot_work_yet():
    model = make_model()
    with pytest.raises(ValueError, match=r"needs torch\.distributed initialized"):
        Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), process_group=object())
    with pytest.raises(ValueError, match="needs a process_group"):
        Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), pseudo_gradient_dtype=torch.bfloat16)


def test_a_checkpoint_of_workers_needs_a_group_of_workers():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["lookahead_worker_fast_param"] = torch.stack(
        [p.detach() for p in [*model.parameters()][:1]] * 2
    )
    with pytest.raises(ValueError, match="replicas of a DiLoCo group"):
        opt.load_state_dict(saved)
