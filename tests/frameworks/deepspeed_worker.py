"""DeepSpeed ZeRO on the CPU with Lookahead as the client optimizer, in one process (gloo, world
size 1): ``python deepspeed_worker.py OUT_DIR SCENARIO...``. tests/frameworks/test_deepspeed.py
starts it (with DS_ACCELERATOR=cpu, MASTER_ADDR/PORT, RANK, LOCAL_RANK and WORLD_SIZE set) and
judges what it writes: ``OUT_DIR/SCENARIO-PART.pt`` for each part (PARTS) of each scenario that
ran to the end, or ``OUT_DIR/SCENARIO-PART.error`` with the traceback of one that raised. A
separate process keeps torch.distributed and DeepSpeed's global state out of the pytest process.

Each scenario trains make_model() for STEPS steps on batches(STEPS), recording after every step
the counter and whether the slow weights equal the fast ones for each fp32 master tensor that ZeRO
hands the client optimizer; evaluates the module on EVAL_BATCH in and around
``with lookahead.slow_weights():``; and resumes a run stopped at SAVE_AT through
``engine.save_checkpoint`` / ``engine.load_checkpoint`` in fresh objects.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import traceback
from pathlib import Path

import deepspeed
import torch
from frameworks_common import LR, K, batches, loss_of, make_model

import lookahead_cuda.deepspeed_zero
from lookahead_cuda import Lookahead

STEPS = 8  # syncs after steps 3 and 6; the run ends 2 steps into a cycle (slow != fast)
SAVE_AT = 4  # 1 step into a cycle
SUB_GROUP_SIZE = 64  # make_model()'s 163 parameters: 3 ZeRO-3 sub-groups (96, 16+48, 3)
SCENARIOS = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero3": {"stage": 3},
    "zero3-subgroups": {"stage": 3, "sub_group_size": SUB_GROUP_SIZE},
}
EVAL_BATCH = batches(STEPS + 1)[-1]


def config(zero: dict) -> dict:
    return {
        "train_micro_batch_size_per_gpu": EVAL_BATCH[0].shape[0],
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        # DeepSpeed clips gradients to norm 1.0 unless told otherwise (GRADIENT_CLIPPING_DEFAULT
        # in deepspeed/runtime/constants.py); the plain-torch reference does not clip.
        "gradient_clipping": 0.0,
        # DeepSpeed refuses client optimizers it has not tested under ZeRO unless told.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def make_engine(zero: dict):
    model = make_model()
    lookahead = Lookahead(torch.optim.AdamW(model.parameters(), lr=LR), k=K)
    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=lookahead, config=config(zero)
    )
    assert zero_optimizer.optimizer is lookahead, type(zero_optimizer.optimizer)
    return engine, zero_optimizer, lookahead


def masters(zero_optimizer) -> list[torch.Tensor]:
    """The flat fp32 partitions ZeRO steps the client optimizer on (one per param group for
    stages 1 and 2, one per sub-group for stage 3)."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # stage 3
        return list(zero_optimizer.fp32_partitioned_groups_flat)
    return list(zero_optimizer.single_partition_of_fp32_groups)


def module_weights(engine) -> list[torch.Tensor]:
    """The module's parameters, gathered under ZeRO-3."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().clone() for p in params]


def eval_loss(engine) -> float:
    with torch.no_grad():
        return loss_of(engine, EVAL_BATCH).item()


def train(engine, lookahead, zero_optimizer, data, record=None) -> None:
    for batch in data:
        engine.backward(loss_of(engine, batch))
        engine.step()
        if record is not None:
            ours = [lookahead.lookahead_state[m] for m in masters(zero_optimizer)]
            record["counts"].append([int(s["step"]) for s in ours])
            record["synced"].append(
                [torch.equal(s["slow_param"], m) for s, m in zip(ours, masters(zero_optimizer))]
            )


def train_and_evaluate(zero: dict) -> dict:
    data = batches(STEPS)
    result: dict = {"counts": [], "synced": []}
    engine, zero_optimizer, lookahead = make_engine(zero)
    result["masters"] = len(masters(zero_optimizer))
    result["group_sizes_between_steps"] = [len(g["params"]) for g in lookahead.param_groups]
    train(engine, lookahead, zero_optimizer, data, record=result)
    result["tensors_with_slow_weights"] = sum(
        "slow_param" in lookahead.lookahead_state.get(m, {}) for m in masters(zero_optimizer)
    )
    result["final"] = module_weights(engine)
    # Lookahead only knows ZeRO's flat masters, not the module's parameters: it refuses.
    try:
        lookahead.slow_state_dict(engine.module)
    except ValueError as error:
        result["slow_state_dict_refused"] = str(error)
    exported = lookahead_cuda.deepspeed_zero.slow_state_dict(engine)
    result["slow_state_dict"] = list(exported.values())
    result["after_export"] = module_weights(engine)
    result["master_slow"] = [
        lookahead.lookahead_state[m]["slow_param"].clone() for m in masters(zero_optimizer)
    ]
    result["master_fast"] = [m.detach().clone() for m in masters(zero_optimizer)]

    # Evaluation on the slow weights, as the README says to do it.
    engine.eval()
    result["loss_fast"] = eval_loss(engine)
    # Lookahead's own block: at stages 1 and 2 it swaps the masters alone; at stage 3, whose
    # groups are empty between steps, it refuses, naming the way that works.
    try:
        with lookahead.slow_weights():
            result["loss_in_block"] = eval_loss(engine)
            result["masters_in_block"] = [m.detach().clone() for m in masters(zero_optimizer)]
            result["full_fp32_in_block"] = [
                deepspeed.utils.safe_get_full_fp32_param(p).clone()
                for p in engine.module.parameters()
            ]
    except RuntimeError as error:
        result["block_refused"] = str(error)
    # What the README says to do under ZeRO: the masters are copied into the module too.
    with lookahead_cuda.deepspeed_zero.slow_weights(engine):
        result["loss_workaround"] = eval_loss(engine)
        # Nested (the export opens a block of its own): the outer block still holds afterwards.
        result["nested_export"] = list(
            lookahead_cuda.deepspeed_zero.slow_state_dict(engine).values()
        )
        result["loss_after_nested"] = eval_loss(engine)
    result["loss_after_workaround"] = eval_loss(engine)
    result["final_after_workaround"] = module_weights(engine)
    return result


def resume(zero: dict, in_eval_mode: bool = False) -> dict:
    """SAVE_AT steps, engine.save_checkpoint (if ``in_eval_mode``, first tried inside
    ``lookahead_cuda.deepspeed_zero.slow_weights(engine)``, as transformers' Trainer saves right
    after an evaluation, then after it), then in fresh objects engine.load_checkpoint and the
    remaining steps."""
    data = batches(STEPS)
    result: dict = {}
    with tempfile.TemporaryDirectory() as directory:
        engine, zero_optimizer, lookahead = make_engine(zero)
        train(engine, lookahead, zero_optimizer, data[:SAVE_AT])
        if in_eval_mode:
            with lookahead_cuda.deepspeed_zero.slow_weights(engine):
                try:
                    engine.save_checkpoint(directory, tag="resume")
                except RuntimeError as error:
                    result["save_refused"] = str(error)
        engine.save_checkpoint(directory, tag="resume")
        engine, zero_optimizer, lookahead = make_engine(zero)
        engine.load_checkpoint(directory, tag="resume")
        result["resumed_counts"] = [
            int(lookahead.lookahead_state.get(m, {}).get("step", -1))
            for m in masters(zero_optimizer)
        ]
        train(engine, lookahead, zero_optimizer, data[SAVE_AT:])
        result["resumed"] = module_weights(engine)
        result["resumed_master_slow"] = [
            lookahead.lookahead_state[m]["slow_param"].clone() for m in masters(zero_optimizer)
        ]
    return result


def resume_in_eval_mode(zero: dict) -> dict:
    return resume(zero, in_eval_mode=True)


PARTS = {"train": train_and_evaluate, "resume": resume, "resume-eval": resume_in_eval_mode}


def main() -> None:
    out = Path(sys.argv[1])
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op as it initializes
    # (deepspeed/comm/torch.py: TorchBackend.__init__ -> build_shm_op; about 2 minutes on the 2-core
    # machine the first time, then cached in ~/.cache/torch_extensions). One process never uses it,
    # and TorchBackend falls back to torch.distributed without it. (The module deepspeed.comm.torch,
    # not the attribute of that name, which is torch itself.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    for name in sys.argv[2:]:
        for part, function in PARTS.items():
            try:
                torch.save(function(SCENARIOS[name]), out / f"{name}-{part}.pt")
            except Exception:
                (out / f"{name}-{part}.error").write_text(traceback.format_exc())
                print(traceback.format_exc(), file=sys.stderr)


if __name__ == "__main__":
    main()
