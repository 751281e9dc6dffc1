"""eval()/train() and slow_weights() on the slow weights, checkpoints taken in either mode, the
slow weights exported as a model's state dict, and param groups whose tensors change between
steps (DeepSpeed ZeRO-3 sub-groups, direct edits of param_groups)."""

import copy

import pytest
import torch
from test_lookahead import ReferenceLookahead, assert_same_weights, batches, make_model, train

from lookahead_cuda import Lookahead


def trained(k=3, steps=4, dtype=torch.float32, slow_dtype=None):
    """A model mid-cycle (steps % k != 0): its slow and fast weights differ."""
    model = make_model(dtype)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=k, slow_dtype=slow_dtype)
    train(model, opt, batches(steps, dtype))
    return model, opt


def values(model):
    return [p.detach().clone() for p in model.parameters()]


def slow_values(model, opt):
    return [opt.lookahead_state[p]["slow_param"].clone() for p in model.parameters()]


# -- eval / train -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "slow_dtype"), [(torch.float32, None), (torch.bfloat16, torch.float32)]
)
def test_eval_puts_the_slow_weights_in_and_train_takes_them_out(dtype, slow_dtype):
    model, opt = trained(dtype=dtype, slow_dtype=slow_dtype)
    fast, slow = values(model), slow_values(model, opt)
    assert any(not torch.equal(f, s.to(dtype)) for f, s in zip(fast, slow))
    assert opt.eval() is opt and not opt.training
    opt.eval()  # idempotent
    for p, s in zip(model.parameters(), slow):
        assert torch.equal(p, s.to(dtype))
    opt.train()
    opt.train()
    assert opt.training
    for p, f in zip(model.parameters(), fast):
        assert torch.equal(p, f)
    assert all(torch.equal(a, b) for a, b in zip(slow_values(model, opt), slow))


def test_train_false_is_eval():
    model, opt = trained()
    slow = slow_values(model, opt)
    opt.train(False)
    assert not opt.training
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), slow))


@pytest.mark.parametrize("method", ["step", "sync"])
def test_stepping_in_evaluation_mode_raises_and_changes_nothing(method):
    model, opt = trained()
    opt.eval()
    inside = values(model)
    with pytest.raises(RuntimeError, match=rf"Lookahead.{method}\(\) in evaluation mode"):
        getattr(opt, method)()
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), inside))
    opt.train()
    train(model, opt, batches(1))


@pytest.mark.parametrize(
    ("dtype", "slow_dtype"), [(torch.float32, None), (torch.bfloat16, torch.float32)]
)
def test_slow_weights_blocks_nest(dtype, slow_dtype):
    model, opt = trained(dtype=dtype, slow_dtype=slow_dtype)
    fast, slow = values(model), slow_values(model, opt)
    with opt.slow_weights():
        with opt.slow_weights():
            assert all(torch.equal(p, s.to(dtype)) for p, s in zip(model.parameters(), slow))
        # Leaving the inner block leaves the mode as the inner block found it.
        assert all(torch.equal(p, s.to(dtype)) for p, s in zip(model.parameters(), slow))
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))
    opt.eval()
    with opt.slow_weights():
        pass
    assert not opt.training  # a block inside eval() leaves evaluation mode on


@pytest.mark.parametrize("model_first", [True, False])
@pytest.mark.parametrize(
    ("dtype", "slow_dtype"), [(torch.float32, None), (torch.bfloat16, torch.float32)]
)
def test_a_checkpoint_taken_in_evaluation_mode_resumes_exactly(model_first, dtype, slow_dtype):
    straight_model, straight = trained(steps=7, dtype=dtype, slow_dtype=slow_dtype)

    model, opt = trained(steps=4, dtype=dtype, slow_dtype=slow_dtype)
    fast, slow = values(model), slow_values(model, opt)
    opt.eval()  # as transformers' Trainer leaves it after evaluate()
    saved = copy.deepcopy(opt.state_dict())
    model_saved = copy.deepcopy(model.state_dict())  # holds the slow weights now
    for key, entry in saved["state"].items():
        assert torch.equal(entry["lookahead_slow_param"], slow[key])
        assert torch.equal(entry["lookahead_fast_param"], fast[key])

    resumed_model = make_model(dtype)
    resumed = Lookahead(
        torch.optim.SGD(resumed_model.parameters(), lr=0.1), k=3, slow_dtype=slow_dtype
    )
    # The fast weights the optimizer's dict carries go back at the next step, whatever the
    # model's load (the slow weights) put into the parameters before or after.
    if model_first:
        resumed_model.load_state_dict(model_saved)
        resumed.load_state_dict(saved)
    else:
        resumed.load_state_dict(saved)
        resumed_model.load_state_dict(model_saved)
    assert resumed.training
    resaved = resumed.state_dict()  # saved again before training goes on, it carries them on
    for key, entry in resaved["state"].items():
        assert torch.equal(entry["lookahead_fast_param"], fast[key])
    train(resumed_model, resumed, batches(7, dtype)[4:])
    assert not torch.nn.modules.module._global_forward_pre_hooks  # gone once they were put back
    assert_same_weights(resumed_model, straight_model)
    for p, q in zip(resumed_model.parameters(), straight_model.parameters()):
        assert torch.equal(
            resumed.lookahead_state[p]["slow_param"], straight.lookahead_state[q]["slow_param"]
        )


@pytest.mark.parametrize("model_first", [True, False])
def test_evaluating_a_model_resumed_from_evaluation_mode_scores_the_slow_weights(model_first):
    model, opt = trained(steps=4)
    fast, slow = values(model), slow_values(model, opt)
    opt.eval()
    saved, model_saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    opt.train()
    resumed_model = make_model()
    resumed = Lookahead(torch.optim.SGD(resumed_model.parameters(), lr=0.1), k=3)
    if model_first:
        resumed_model.load_state_dict(model_saved)
        resumed.load_state_dict(saved)
    else:
        resumed.load_state_dict(saved)
        resumed_model.load_state_dict(model_saved)
    with resumed.slow_weights():
        assert all(map(torch.equal, values(resumed_model), slow))
    assert all(map(torch.equal, values(resumed_model), fast))


@pytest.mark.parametrize("model_first", [True, False])
def test_loading_into_an_optimizer_in_evaluation_mode_resumes_exactly(model_first):
    # The running optimizer is in evaluation mode (after an evaluation) when a checkpoint of the
    # same run is loaded back into it, with the model's state dict before or after.
    straight_model, straight = trained(steps=7)
    model, opt = trained(steps=4)
    model_saved, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, batches(6)[4:])  # on, then evaluation
    opt.eval()
    if model_first:
        model.load_state_dict(model_saved)
        opt.load_state_dict(saved)
    else:
        opt.load_state_dict(saved)
        model.load_state_dict(model_saved)
    assert opt.training
    train(model, opt, batches(7)[4:])
    assert_same_weights(model, straight_model)
    assert all(map(torch.equal, slow_values(model, opt), slow_values(straight_model, straight)))


def test_state_dict_in_a_slow_weights_block_keeps_the_roles():
    model, opt = trained()
    fast, slow = values(model), slow_values(model, opt)
    with opt.slow_weights():
        inside = opt.state_dict()
    # Read after the block, when the tensors that held the roles have traded them back.
    for key, entry in inside["state"].items():
        assert torch.equal(entry["lookahead_slow_param"], slow[key])
        assert torch.equal(entry["lookahead_fast_param"], fast[key])


def test_slow_state_dict_exports_the_slow_weights_as_the_models():
    model, opt = trained(dtype=torch.bfloat16, slow_dtype=torch.float32)
    model.register_buffer("extra", torch.arange(3.0))
    fast = values(model)
    exported = opt.slow_state_dict(model)
    assert exported.keys() == model.state_dict().keys()
    for (name, p), s in zip(model.named_parameters(), slow_values(model, opt)):
        assert exported[name].dtype == p.dtype and torch.equal(exported[name], s.to(p.dtype))
    assert torch.equal(exported["extra"], model.extra)
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))  # untouched
    deployed = make_model(torch.bfloat16)
    deployed.register_buffer("extra", torch.zeros(3))
    deployed.load_state_dict(exported)
    with opt.slow_weights():
        assert_same_weights(deployed, model)


# -- param groups whose tensors change ----------------------------------------------------------


def test_slow_state_dict_of_a_model_it_does_not_step_is_refused():
    model, opt = trained()
    other = make_model(torch.float32)
    with pytest.raises(ValueError, match="none of the Sequential's parameters"):
        opt.slow_state_dict(other)
    # A model partly stepped (frozen parameters outside the optimizer) keeps its own values there.
    partly = torch.nn.Sequential(model, torch.nn.Linear(3, 2))
    exported = opt.slow_state_dict(partly)
    assert torch.equal(exported["1.weight"], partly[1].weight)
    # A frozen module, which the optimizer never steps, is exported as it is.
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert torch.equal(opt.slow_state_dict(frozen)["weight"], frozen.weight)
    # Before the first step there are no slow weights yet: the parameters are them.
    fresh = make_model(torch.float32)
    before = Lookahead(torch.optim.SGD(fresh.parameters(), lr=0.1), k=3).slow_state_dict(fresh)
    for name, value in fresh.state_dict().items():
        assert torch.equal(before[name], value)


def test_a_group_whose_tensors_alternate_keeps_slow_weights_and_counts_for_each():
    # The smallest reproduction of DeepSpeed ZeRO-3 with two sub-groups: the group holds a, then b,
    # then a, ..., and each is stepped once per round.
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    la = Lookahead(torch.optim.SGD([a], lr=0.1), k=2)
    ref = {p: ReferenceLookahead(torch.optim.SGD([q], lr=0.1), k=2) for p, q in ((a, a), (b, b))}
    ref_params = {p: torch.nn.Parameter(p.detach().clone()) for p in (a, b)}
    for p, r in ref.items():
        r.inner.param_groups[0]["params"] = [ref_params[p]]
    for _ in range(5):
        for p in (a, b):
            la.param_groups[0]["params"] = [p]
            p.grad = torch.ones(3)
            la.step()
            ref_params[p].grad = torch.ones(3)
            ref[p].step()
    for p in (a, b):
        assert torch.equal(p, ref_params[p])
        assert torch.equal(la.lookahead_state[p]["slow_param"], ref[p].slow[0])
        assert int(la.lookahead_state[p]["step"]) == 5 % 2


def test_parameters_added_to_a_group_are_synced_from_their_first_step():
    model = make_model()
    params = list(model.parameters())
    opt = Lookahead(torch.optim.SGD(params[:2], lr=0.1), k=2)
    train(model, opt, batches(2))  # one sync of the first two
    opt.param_groups[0]["params"].extend(params[2:])
    train(model, opt, batches(4)[2:])
    # The added ones were taken at step 3 and synced at step 4 (the group's count was 0 at step 3).
    for p in params[2:]:
        assert "slow_param" in opt.lookahead_state[p]
        assert torch.equal(opt.lookahead_state[p]["slow_param"], p)


def test_a_deleted_group_leaves_the_others_syncing():
    model = make_model()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    opt = Lookahead(torch.optim.SGD(groups, lr=0.1), k=2)
    train(model, opt, batches(1))
    del opt.param_groups[0]
    before = {p: opt.lookahead_state[p]["slow_param"].clone() for p in model[2].parameters()}
    train(model, opt, batches(1))  # the count of what was group 1 reaches k: a sync
    for p in model[2].parameters():
        assert not torch.equal(opt.lookahead_state[p]["slow_param"], before[p])
        assert torch.equal(opt.lookahead_state[p]["slow_param"], p)
