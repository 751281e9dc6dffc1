"""Lookahead in transformers' Trainer (``optimizers=(Lookahead(AdamW(...)), None)``) with a tiny
GPT-2 built from a config, on random tokens, on the CPU, offline.

When transformers calls Lookahead's eval() and train() (transformers/trainer.py, 5.x): the
Trainer's optimizer is accelerate's AcceleratedOptimizer around the Lookahead, whose eval() and
train() call Lookahead's (accelerate/optimizer.py).

* ``Trainer.evaluation_loop`` (behind ``evaluate()`` and ``predict()``, and the evaluations during
  ``train()``) calls ``model.eval()`` then ``self.optimizer.eval()`` before its first batch;
* ``Trainer.training_step`` calls ``model.train()`` then ``self.optimizer.train()`` before every
  forward pass (every micro-batch).

Nothing calls train() when an evaluation ends. So from an evaluation to the next training step the
parameters hold the slow weights: the checkpoint saved at the same step (its model.safetensors
holds the slow weights, its optimizer.pt both, the fast ones as ``lookahead_fast_param``), the
on_evaluate/on_save callbacks, and the model after ``train()`` returns if the last step evaluated,
or after a lone ``trainer.evaluate()``.

Dropout is off: every DataLoader iteration draws its base seed from torch's global generator, so an
evaluation changes the dropout masks of the training steps after it, and a run with evaluations
would differ from one without for reasons that are not Lookahead's.
"""

from __future__ import annotations

import math

import frameworks_common  # noqa: F401  (offline settings, before transformers is imported)
import pytest
import torch

from lookahead_cuda import Lookahead

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

K = 4
STEPS = 10  # with K = 4: syncs after steps 4 and 8, the run ends mid-cycle
EVAL_AT = 6  # evaluation and checkpoint, 2 steps into a cycle (slow != fast)
VOCAB, LENGTH = 64, 16


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    # GPT2LMHeadModel's class name matches no key of transformers' LOSS_MAPPING, so its loss_type
    # is None: its forward falls back to ForCausalLMLoss, but the Trainer (which decides from
    # loss_type whether the loss shifts labels) then counts num_items_in_batch over all
    # B x LENGTH labels instead of the B x (LENGTH - 1) targets, and its eval_loss is
    # (LENGTH - 1) / LENGTH of the model's own loss (transformers 5.24). Naming the loss avoids it.
    model.loss_type = "ForCausalLM"
    return model


def examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": t, "labels": t} for t in tokens]


TRAIN, EVAL = examples(16, seed=3), examples(8, seed=4)  # 4 steps an epoch; one eval batch


class Record(TrainerCallback):
    """What the parameters hold around the evaluation at EVAL_AT."""

    def __init__(self, model, lookahead) -> None:
        self.model, self.lookahead = model, lookahead
        self.seen: dict = {}

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == EVAL_AT:  # before the evaluation of this step
            self.seen["fast"] = self.params()
            self.seen["fast_state"] = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.seen["slow_state"] = self.lookahead.slow_state_dict(self.model)
        if state.global_step == EVAL_AT + 1:
            self.seen["training_after"] = self.lookahead.training

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == EVAL_AT:
            self.seen["metrics"] = dict(metrics)
            self.seen["in_evaluation"] = self.params()
            self.seen["training_in_evaluation"] = self.lookahead.training


def run(out, *, evaluate: bool, resume: str | None = None):
    model = gpt2()
    lookahead = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=len(EVAL),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=EVAL_AT,
        save_strategy="steps",
        save_steps=EVAL_AT,
        save_only_model=False,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    record = Record(model, lookahead)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        optimizers=(lookahead, None),  # None: the Trainer's linear schedule, on the Lookahead
        callbacks=[record],
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, lookahead, record.seen


def fast_and_slow(model, lookahead):
    """The run's final fast and slow weights, in whichever mode it ended (left in it)."""
    slow_state = lookahead.slow_state_dict(model)
    slow = [slow_state[name] for name, _ in model.named_parameters()]
    was_training = lookahead.training
    lookahead.train()
    fast = [p.detach().clone() for p in model.parameters()]
    if not was_training:
        lookahead.eval()
    return fast, slow


def assert_same(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what} {i} differs by {(x - y).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """STEPS steps without evaluation, a checkpoint at EVAL_AT."""
    out = tmp_path_factory.mktemp("straight")
    model, lookahead, _ = run(out, evaluate=False)
    return out, fast_and_slow(model, lookahead)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """STEPS steps with an evaluation at EVAL_AT (and at the end), a checkpoint at EVAL_AT."""
    out = tmp_path_factory.mktemp("evaluated")
    model, lookahead, seen = run(out, evaluate=True)
    return out, model, lookahead, seen


def eval_loss(state_dict) -> float:
    """An independent evaluation: a fresh model with ``state_dict``, on the evaluation batch."""
    model = gpt2()
    model.load_state_dict(state_dict)
    model.eval()
    batch = torch.stack([e["input_ids"] for e in EVAL])
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def test_evaluate_scores_the_slow_weights(evaluated):
    _, model, _, seen = evaluated
    slow_loss = eval_loss(seen["slow_state"])
    fast_loss = eval_loss(seen["fast_state"])
    assert abs(slow_loss - fast_loss) > 1e-3  # mid-cycle: the two differ
    # The Trainer averages per-example copies of each batch's loss; one batch here.
    assert math.isclose(seen["metrics"]["eval_loss"], slow_loss, rel_tol=1e-6)
    assert not seen["training_in_evaluation"]
    slow = [seen["slow_state"][name] for name, _ in model.named_parameters()]
    assert_same(seen["in_evaluation"], slow, "parameter during the evaluation")
    assert seen["training_after"]  # training_step called train() again


def test_training_goes_on_from_the_fast_weights_after_an_evaluation(straight, evaluated):
    _, (fast, slow) = straight
    _, model, lookahead, _ = evaluated
    # The evaluation at the last step left the optimizer in evaluation mode.
    assert not lookahead.training
    evaluated_fast, evaluated_slow = fast_and_slow(model, lookahead)
    assert_same(evaluated_fast, fast, "fast weight")
    assert_same(evaluated_slow, slow, "slow weight")
    assert_same([p.detach() for p in model.parameters()], slow, "parameter after train()")


def test_resume_from_checkpoint_is_exact(straight, tmp_path):
    out, (fast, slow) = straight
    checkpoint = out / f"checkpoint-{EVAL_AT}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert all("lookahead_slow_param" in entry for entry in saved.values())
    assert saved[0]["lookahead_step"] == EVAL_AT % K
    model, lookahead, _ = run(tmp_path, evaluate=False, resume=str(checkpoint))
    resumed_fast, resumed_slow = fast_and_slow(model, lookahead)
    assert_same(resumed_fast, fast, "fast weight")
    assert_same(resumed_slow, slow, "slow weight")


def test_resume_from_a_checkpoint_saved_right_after_an_evaluation(straight, evaluated, tmp_path):
    _, (fast, slow) = straight
    out, _, _, seen = evaluated
    checkpoint = out / f"checkpoint-{EVAL_AT}"
    # Saved in evaluation mode: the model file holds the slow weights, the optimizer both.
    weights = load_file(checkpoint / "model.safetensors")
    for name, value in seen["slow_state"].items():
        if name in weights:
            assert torch.equal(weights[name], value), name
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert all("lookahead_fast_param" in entry for entry in saved.values())
    for entry, value in zip(saved.values(), seen["fast"]):
        assert torch.equal(entry["lookahead_fast_param"], value)
    # Loading the model (slow weights) and then the optimizer puts the fast weights back.
    model, lookahead, _ = run(tmp_path, evaluate=False, resume=str(checkpoint))
    resumed_fast, resumed_slow = fast_and_slow(model, lookahead)
    assert_same(resumed_fast, fast, "fast weight")
    assert_same(resumed_slow, slow, "slow weight")
