"""Ranger against RAdam and Lookahead composed by hand, with gradients centralized by hand."""

import io

import pytest
import torch
from test_lookahead import ReferenceLookahead
from torch import nn

from lookahead_cuda import Lookahead, Ranger

SETTINGS = {"lr": 0.01, "betas": (0.95, 0.999), "weight_decay": 0.01}


def make_model(seed=1):
    # A 4-D conv weight, 2-D linear weights and 1-D biases: centralization touches only >= 2-D.
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 8), nn.Tanh(), nn.Linear(8, 3)
    )


def batches(count):
    generator = torch.Generator().manual_seed(2)
    return [
        (torch.randn(8, 2, 5, 5, generator=generator), torch.randn(8, 3, generator=generator))
        for _ in range(count)
    ]


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def centralize_(params):
    for p in params:
        if p.grad is not None and p.grad.dim() >= 2:
            p.grad -= p.grad.mean(dim=tuple(range(1, p.grad.dim())), keepdim=True)


def train(model, optimizer, data, use_gc=False, step=None):
    for x, y in data:
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        if use_gc:
            centralize_(model.parameters())
        (step or optimizer.step)()


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("use_gc", [True, False])
@pytest.mark.parametrize("composed_with", ["Lookahead", "ReferenceLookahead"])
def test_matches_radam_and_lookahead_composed_by_hand(use_gc, composed_with):
    data = batches(20)
    model = make_model()
    ranger = Ranger(model.parameters(), k=6, alpha=0.5, use_gc=use_gc, **SETTINGS)
    train(model, ranger, data)

    by_hand_model = make_model()
    radam = torch.optim.RAdam(by_hand_model.parameters(), **SETTINGS)
    if composed_with == "Lookahead":
        by_hand = Lookahead(radam, k=6, alpha=0.5)
        train(by_hand_model, by_hand, data, use_gc=use_gc)
    else:
        reference = ReferenceLookahead(radam, k=6, alpha=0.5)
        train(by_hand_model, radam, data, use_gc=use_gc, step=reference.step)
    assert_same_weights(model, by_hand_model)


def test_centralization_changes_the_run_and_leaves_1d_gradients_alone():
    x, y = batches(1)[0]
    model = make_model()
    ranger = Ranger(model.parameters())
    loss_of(model, x, y).backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    ranger._centralize_gradients()
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p.grad, before[name]), name
        else:
            assert not torch.equal(p.grad, before[name]), name
            means = p.grad.mean(dim=tuple(range(1, p.dim())))
            assert torch.allclose(means, torch.zeros_like(means), atol=1e-7), name


def test_closure_gradients_are_centralized_and_the_loss_returned():
    x, y = batches(1)[0]
    model, by_hand_model = make_model(), make_model()
    ranger = Ranger(model.parameters(), **SETTINGS)
    by_hand = Lookahead(torch.optim.RAdam(by_hand_model.parameters(), **SETTINGS), k=6)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        ranger.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    for _ in range(7):
        with torch.no_grad():  # the closure must still get gradients
            loss = ranger.step(closure)
        assert torch.equal(loss, loss_of(by_hand_model, x, y))
        train(by_hand_model, by_hand, [(x, y)], use_gc=True)
    assert calls == [True] * 7
    assert_same_weights(model, by_hand_model)


def test_step_hooks_run_once_even_after_a_plain_lookahead_exists():
    # A plain Lookahead gets Lookahead.step wrapped in the hook machinery; Ranger's step, which
    # builds on it, must not run the hooks a second time.
    Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.1))
    model = make_model()
    ranger = Ranger(model.parameters())
    calls = []
    ranger.register_step_pre_hook(lambda *_: calls.append("pre"))
    ranger.register_step_post_hook(lambda *_: calls.append("post"))
    train(model, ranger, batches(2))
    assert calls == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize("split", [1, 6, 9])
def test_exact_resume(split):
    data = batches(15)
    straight_model = make_model()
    straight = Ranger(straight_model.parameters(), **SETTINGS)
    train(straight_model, straight, data)

    first_model = make_model()
    first = Ranger(first_model.parameters(), **SETTINGS)
    train(first_model, first, data[:split])
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed_model = make_model(seed=99)
    resumed = Ranger(resumed_model.parameters(), use_gc=False, **SETTINGS)  # loaded: True
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.use_gc
    train(resumed_model, resumed, data[split:])
    assert_same_weights(straight_model, resumed_model)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        for key, value in straight.lookahead_state[p].items():
            assert torch.equal(value, resumed.lookahead_state[q][key]), key
        for key, value in straight.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


def test_per_group_use_gc_and_state_dicts_without_it():
    model = make_model()
    conv, head = model[0], model[5]
    ranger = Ranger(
        [{"params": conv.parameters(), "use_gc": False}, {"params": model[3].parameters()}]
    )
    assert [g["use_gc"] for g in ranger.param_groups] == [False, True]
    with pytest.raises(ValueError, match="different use_gc"):
        _ = ranger.use_gc
    ranger.add_param_group({"params": head.parameters(), "lr": 0.1})
    assert ranger.param_groups[2]["use_gc"] is True
    with pytest.raises(ValueError, match="Invalid use_gc in the new param group"):
        ranger.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "use_gc": "yes"})
    assert len(ranger.param_groups) == 3

    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    conv_grad = conv.weight.grad.clone()
    ranger._centralize_gradients()
    assert torch.equal(conv.weight.grad, conv_grad)

    ranger.use_gc = False
    assert not ranger.use_gc and all(g["use_gc"] is False for g in ranger.param_groups)
    with pytest.raises(ValueError, match=r"Invalid use_gc in Ranger\.use_gc"):
        ranger.use_gc = None

    # A bare RAdam state dict has no use_gc: the groups keep theirs.
    radam = torch.optim.RAdam([{"params": g["params"]} for g in ranger.param_groups])
    ranger.load_state_dict(radam.state_dict())
    assert all(g["use_gc"] is False for g in ranger.param_groups)
    bad = ranger.state_dict()
    bad["param_groups"][1]["use_gc"] = 1
    with pytest.raises(ValueError, match="Invalid use_gc in loaded param group 1"):
        ranger.load_state_dict(bad)
    with pytest.raises(ValueError, match="loaded state dict has 2 param groups"):
        ranger.load_state_dict({"state": {}, "param_groups": bad["param_groups"][:2]})


def test_is_a_lookahead_with_its_api():
    model = make_model()
    ranger = Ranger(model.parameters(), k=3, alpha=0.4)
    assert isinstance(ranger, Lookahead) and isinstance(ranger, torch.optim.Optimizer)
    assert isinstance(ranger.optimizer, torch.optim.RAdam)
    assert (ranger.k, ranger.alpha, ranger.use_gc) == (3, 0.4, True)
    assert ranger.param_groups[0]["betas"] == (0.95, 0.999)
    assert repr(ranger).startswith("Ranger(use_gc=True, k=3, alpha=0.4,")
    train(model, ranger, batches(4))
    fast = [p.detach().clone() for p in model.parameters()]
    with ranger.slow_weights():
        assert not all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))
        # Refused in evaluation mode before the gradients are centralized.
        loss_of(model, *batches(1)[0]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match=r"step\(\) in evaluation mode"):
            ranger.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))


def test_a_group_added_through_radam_gets_the_defaults():
    model = make_model()
    ranger = Ranger(model.parameters(), k=2, use_gc=False)
    extra = nn.Parameter(torch.randn(3, 2))
    ranger.optimizer.add_param_group({"params": [extra]})
    train(model, ranger, batches(2))  # extra has no gradient: its group is left alone
    assert ranger.param_groups[1]["use_gc"] is False and ranger.param_groups[1]["lookahead_k"] == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
        ({"betas": (1.0, 0.999)}, ValueError, "Invalid beta parameter at index 0: 1.0"),
        ({"betas": (0.9, -0.1)}, ValueError, "Invalid beta parameter at index 1: -0.1"),
        ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
        ({"use_gc": 1}, ValueError, r"Invalid use_gc in Ranger\(\): 1"),
        ({"k": 0}, ValueError, r"Invalid k in Lookahead\(\): 0"),
        ({"alpha": 1.5}, ValueError, r"Invalid alpha in Lookahead\(\): 1.5"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Ranger(make_model().parameters(), **kwargs)


def test_passes_lookahead_options_on():
    data = batches(9)
    options = {"inner_state": "pullback", "nonfinite": "restore", "slow_device": "cpu"}
    model = make_model()
    ranger = Ranger(model.parameters(), k=3, **options, **SETTINGS)
    train(model, ranger, data, use_gc=False, step=None)

    by_hand_model = make_model()
    radam = torch.optim.RAdam(by_hand_model.parameters(), **SETTINGS)
    by_hand = Lookahead(radam, k=3, **options)
    train(by_hand_model, by_hand, data, use_gc=True)
    assert_same_weights(model, by_hand_model)
    assert ranger.inner_state == "pullback" and ranger.nonfinite == "restore"
    assert ranger.slow_device == torch.device("cpu")
    # capturable reaches RAdam as well, which is what a CUDA-graph capture of the step needs.
    capturable = Ranger(make_model().parameters(), capturable=True)
    assert capturable.capturable and capturable.optimizer.defaults["capturable"]
