"""Lookahead as DeepSpeed's client optimizer under ZeRO stages 1, 2 and 3 on the CPU (fp32, gloo,
one process), against Lookahead written out in plain torch on the same batches.

ZeRO builds the client optimizer on the module's parameters and then puts its own flat fp32
master tensors into its param groups: one per group for stages 1 and 2; for stage 3 one per
sub-group, swapped into the group one at a time around each step() call, the groups being empty in
between. Lookahead follows whatever tensors a group holds at each step. The runs happen in
tests/frameworks/deepspeed_worker.py, in a process of their own (see its docstring).

Where ZeRO keeps the module's weights apart from the fp32 masters (all stages: the module's
tensors are views of ZeRO's flat "bit16" buffers, whatever their dtype), the module only sees the
masters when ZeRO copies them over:

* stages 1 and 2 (deepspeed/runtime/zero/stage_1_and_2.py, DeepSpeedZeroOptimizer): in step(),
  ``bit16_partitions[partition_id].data.copy_(fp32_partition.data)`` after each group's
  _optimizer_step(), then all_gather_dp_groups() and _update_model_bit16_weights(); the same copy
  and all-gather is the public-looking ``update_lp_params()`` (no underscore, not in DeepSpeed's
  docs; the engine calls it after loading a universal checkpoint);
* stage 3 (deepspeed/runtime/zero/stage3.py, DeepSpeedZeroOptimizer_Stage3): in step(), the
  private ``_reassign_or_swap_out_partitioned_parameters(sub_group_id)`` after each sub-group's
  _optimizer_step() (copy into fp16_partitioned_groups_flat, then
  _unflatten_partitioned_parameters), and _post_step()'s all-gather of the persistent (small)
  parameters; no public method does it.

The other way (module -> masters) is ``refresh_fp32_params()`` / _restore_from_bit16_weights() in
both classes. ``deepspeed.utils.safe_get_full_fp32_param(param)`` (public) reads a module
parameter's fp32 master, so it sees what Lookahead swapped in; ``safe_set_full_fp32_param`` writes
the master only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from frameworks_common import K, assert_equal_tensors, batches, loss_of, make_model, plain_run

pytest.importorskip("deepspeed")
from deepspeed_worker import SAVE_AT, SCENARIOS, STEPS

HERE = Path(__file__).parent
WORKER = HERE / "deepspeed_worker.py"
TIMEOUT_S = 300
STAGE = {name: zero["stage"] for name, zero in SCENARIOS.items()}
SUB_GROUPS = {"zero1": 1, "zero2": 1, "zero3": 1, "zero3-subgroups": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every scenario's results from one worker process: name-part -> dict, or the traceback."""
    out = tmp_path_factory.mktemp("deepspeed")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.run(
        [sys.executable, str(WORKER), str(out), *SCENARIOS],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
    )
    results = {}
    for path in out.iterdir():
        if path.suffix == ".pt":
            results[path.stem] = torch.load(path, weights_only=True)
        elif path.suffix == ".error":
            results[path.stem] = path.read_text()
    results["log"] = process.stdout
    return results


def result(runs: dict, key: str) -> dict:
    found = runs.get(key)
    if isinstance(found, str):
        pytest.fail(f"{key} raised in the worker:\n{found}")
    assert found is not None, f"{key} wrote no result; the worker's output:\n{runs['log'][-5000:]}"
    return found


@pytest.fixture(scope="module")
def plain():
    """The independent reference: the same model, batches and Lookahead in plain torch, and the
    losses of its fast and slow weights on the evaluation batch."""
    model, opt = plain_run(batches(STEPS))
    slow_model = make_model()
    with torch.no_grad():
        for p, s in zip(slow_model.parameters(), opt.slow):
            p.copy_(s)
        eval_batch = batches(STEPS + 1)[-1]
        return {
            "fast": [p.detach() for p in model.parameters()],
            "slow": opt.slow,
            "fast_loss": loss_of(model, eval_batch).item(),
            "slow_loss": loss_of(slow_model, eval_batch).item(),
        }


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_trains_as_plain_lookahead_does(runs, plain, scenario):
    run = result(runs, f"{scenario}-train")
    # fp32, one process, no clipping: ZeRO's AdamW on flat tensors is bitwise torch's.
    assert_equal_tensors(run["final"], plain["fast"], "module parameter")
    slow = flat(run["master_slow"])  # stages 1 and 2 pad their flat group to an even length
    assert slow.numel() >= flat(plain["slow"]).numel()
    assert torch.equal(slow[: flat(plain["slow"]).numel()], flat(plain["slow"]))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_master_tensor_syncs_every_k_steps(runs, scenario):
    run = result(runs, f"{scenario}-train")
    assert run["masters"] == SUB_GROUPS[scenario]
    assert run["tensors_with_slow_weights"] == run["masters"]
    # Between steps ZeRO-3 leaves the client's group empty; stages 1 and 2 leave their master in.
    assert run["group_sizes_between_steps"] == [0 if STAGE[scenario] == 3 else 1]
    steps = range(1, STEPS + 1)
    assert run["counts"] == [[step % K] * run["masters"] for step in steps]
    # Right after a sync the slow weights equal the fast ones; mid-cycle they differ.
    assert run["synced"] == [[step % K == 0] * run["masters"] for step in steps]


@pytest.mark.parametrize(
    "scenario",
    [
        "zero1",
        "zero2",
        "zero3",
        "zero3-subgroups",
    ],
)
def test_resume_through_deepspeed_checkpoints(runs, scenario):
    straight = result(runs, f"{scenario}-train")
    resumed = result(runs, f"{scenario}-resume")
    assert resumed["resumed_counts"] == [SAVE_AT % K] * straight["masters"]  # mid-cycle
    assert_equal_tensors(resumed["resumed"], straight["final"], "module parameter")
    assert_equal_tensors(resumed["resumed_master_slow"], straight["master_slow"], "slow weights")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_checkpoint_inside_the_slow_weights_block_is_refused(runs, scenario):
    """As transformers' Trainer saves right after an evaluation. Saved there, DeepSpeed's
    checkpoint would hold the slow weights as its fp32 masters, and its load_checkpoint copies
    those over the fast weights that Lookahead's load_state_dict put back. The refusal changes
    nothing: saved after the block, the run resumes exactly."""
    straight = result(runs, f"{scenario}-train")
    resumed = result(runs, f"{scenario}-resume-eval")
    assert "save after the block" in resumed["save_refused"]
    assert_equal_tensors(resumed["resumed"], straight["final"], "module parameter")
    assert_equal_tensors(resumed["resumed_master_slow"], straight["master_slow"], "slow weights")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_copying_the_masters_into_the_module_evaluates_the_slow_weights(runs, plain, scenario):
    """lookahead_cuda.deepspeed_zero.slow_weights(engine), with DeepSpeed's own copy functions
    (update_lp_params() for stages 1 and 2; for stage 3 the private ones its step() uses, after
    filling the empty groups as its state_dict() does)."""
    run = result(runs, f"{scenario}-train")
    assert plain["slow_loss"] != plain["fast_loss"]  # the run ends mid-cycle
    assert run["loss_fast"] == plain["fast_loss"]
    assert run["loss_workaround"] == plain["slow_loss"]
    assert run["loss_after_nested"] == plain["slow_loss"]
    assert_equal_tensors(run["nested_export"], plain["slow"], "export inside the block")
    assert run["loss_after_workaround"] == plain["fast_loss"]
    assert_equal_tensors(run["final_after_workaround"], plain["fast"], "module parameter after")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_what_lookaheads_own_block_does_under_zero(runs, plain, scenario):
    """Stages 1 and 2: the masters alone (visible to safe_get_full_fp32_param), the module keeps
    the fast weights, as the README says (use lookahead_cuda.deepspeed_zero.slow_weights);
    stage 3: refused with a message naming it."""
    run = result(runs, f"{scenario}-train")
    if STAGE[scenario] == 3:
        assert "lookahead_cuda.deepspeed_zero.slow_weights(engine)" in run["block_refused"]
        return
    assert run["loss_in_block"] == plain["fast_loss"]
    in_block = run["full_fp32_in_block"]
    assert_equal_tensors(in_block, plain["slow"], "safe_get_full_fp32_param in the block")
    assert torch.equal(flat(run["masters_in_block"])[: flat(in_block).numel()], flat(in_block))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_module_on_the_slow_weights_is_exported(runs, plain, scenario):
    """lookahead_cuda.deepspeed_zero.slow_state_dict(engine); Lookahead.slow_state_dict(module),
    which only knows ZeRO's flat masters, refuses and names it; training goes on untouched."""
    run = result(runs, f"{scenario}-train")
    assert "lookahead_cuda.deepspeed_zero.slow_state_dict" in run["slow_state_dict_refused"]
    assert_equal_tensors(run["slow_state_dict"], plain["slow"], "slow_state_dict entry")
    assert_equal_tensors(run["after_export"], plain["fast"], "module parameter after the export")
