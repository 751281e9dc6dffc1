"""Alpha and k schedules against the same values set by hand on the reference implementation."""

import io
import math

import pytest
import torch
from test_lookahead import ReferenceLookahead, assert_same_weights, batches, make_model, train
from torch import nn

from lookahead_cuda import CosineAlpha, LambdaAlpha, Lookahead, LookaheadScheduler, Ranger


def alpha_factor(step):
    return 1.0 - 0.5 * min(step, 10) / 10


def k_factor(step):
    return 1 + step // 6


def make(model, alpha=0.8, k=2):
    return Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=k, alpha=alpha)


def test_lambda_schedule_matches_values_set_by_hand():
    data = batches(25)
    model = make_model()
    opt = make(model)
    scheduler = LambdaAlpha(opt, alpha_factor, k_lambda=k_factor)
    seen = []

    def step():
        opt.step()
        scheduler.step()
        seen.append((opt.alpha, opt.k))

    train(model, opt, data, step=step)

    ref_model = make_model()
    ref = ReferenceLookahead(
        torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9), k=2, alpha=0.8
    )

    def ref_step():
        ref.step()
        ref.alpha, ref.k = 0.8 * alpha_factor(ref.steps), round(2 * k_factor(ref.steps))
        ref.steps += 1

    ref.steps = 1
    train(ref_model, ref.inner, data, step=ref_step)
    assert_same_weights(model, ref_model)
    assert seen[0] == (0.8 * alpha_factor(1), 2) and seen[-1] == (0.4, 10)
    assert scheduler.last_epoch == 25
    assert scheduler.get_last_alpha() == [0.4] and scheduler.get_last_k() == [10]


def test_per_group_lambdas_and_k_left_alone():
    model = make_model()
    inner = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1
    )
    opt = Lookahead(inner, k=4, alpha=0.5)
    opt.param_groups[1]["lookahead_alpha"] = 1.0
    scheduler = LambdaAlpha(opt, [lambda e: 1.0, lambda e: 0.5**e])
    assert scheduler.base_alphas == [0.5, 1.0] and scheduler.base_ks == [4, 4]
    opt.param_groups[0]["lookahead_k"] = 7  # no k_lambda: k is the user's to set
    for _ in range(3):
        scheduler.step()
    assert [g["lookahead_alpha"] for g in opt.param_groups] == [0.5, 0.125]
    assert [g["lookahead_k"] for g in opt.param_groups] == [7, 4]
    assert scheduler.get_last_k() == [7, 4]
    with pytest.raises(ValueError, match=r"one alpha_lambda per param group \(2\), got 3"):
        LambdaAlpha(opt, [alpha_factor] * 3)


def test_cosine_alpha():
    model = make_model()
    opt = make(model, alpha=0.5)
    scheduler = CosineAlpha(opt, T_max=8, alpha_end=1.0)
    alphas = [opt.alpha]
    for _ in range(10):
        scheduler.step()
        alphas.append(opt.alpha)
    assert alphas[0] == 0.5 and alphas[4] == pytest.approx(0.75)
    assert alphas[8:] == [1.0, 1.0, 1.0]
    assert all(a < b for a, b in zip(alphas[:8], alphas[1:9]))
    assert alphas[2] == pytest.approx(0.75 - 0.25 * math.cos(math.pi / 4))
    assert opt.k == 2

    down = CosineAlpha(make(make_model(), alpha=0.9), T_max=1, alpha_end=0.3)
    down.step()
    assert down.get_last_alpha() == [0.3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"T_max": 0, "alpha_end": 0.5}, "Invalid T_max: 0"),
        ({"T_max": 2.0, "alpha_end": 0.5}, "Invalid T_max: 2.0"),
        ({"T_max": 5, "alpha_end": 0.0}, "Invalid alpha_end: 0.0"),
        ({"T_max": 5, "alpha_end": float("nan")}, "Invalid alpha_end: nan"),
    ],
)
def test_cosine_alpha_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CosineAlpha(make(make_model()), **kwargs)


def test_bad_values_raise_and_change_nothing():
    model = make_model()
    opt = make(model, alpha=0.5, k=3)
    scheduler = LambdaAlpha(opt, lambda e: 1.0 + e / 2)  # alpha 0.5, 0.75, 1.0, then 1.25
    scheduler.step()
    scheduler.step()
    with pytest.raises(ValueError, match="Invalid alpha in LambdaAlpha at epoch 3, param group 0"):
        scheduler.step()
    assert scheduler.last_epoch == 2 and opt.alpha == 1.0 and scheduler.get_last_alpha() == [1.0]

    with pytest.raises(ValueError, match="Invalid k in LambdaAlpha at epoch 0, param group 0"):
        LambdaAlpha(opt, lambda e: 1.0, k_lambda=lambda e: 0.1)
    assert opt.k == 3

    with pytest.raises(TypeError, match="schedules a Lookahead or Ranger, got SGD"):
        CosineAlpha(opt.optimizer, T_max=3, alpha_end=0.5)
    with pytest.raises(NotImplementedError):
        LookaheadScheduler(opt)

    opt.add_param_group({"params": [nn.Parameter(torch.randn(2))]})
    with pytest.raises(ValueError, match="the optimizer has 2 param groups"):
        scheduler.step()
    with pytest.raises(ValueError, match="at epoch 2 has 1 alphas and 1 ks for 2 param groups"):
        scheduler.load_state_dict(scheduler.state_dict())

    saved = LambdaAlpha(make(make_model()), lambda e: 1.0).state_dict()
    other = LambdaAlpha(make(make_model(), alpha=0.3), lambda e: 1.0)
    with pytest.raises(ValueError, match="Invalid alpha in LambdaAlpha at epoch 0"):
        other.load_state_dict({**saved, "_last_alpha": [2.0]})
    assert other.optimizer.alpha == 0.3 and other.base_alphas == [0.3]


@pytest.mark.parametrize("split", [3, 8])
@pytest.mark.parametrize("optimizer_first", [True, False])
def test_exact_resume_with_a_ranger(split, optimizer_first):
    def run(model, steps, checkpoint=None):
        opt = Ranger(model.parameters(), lr=0.01, k=3, alpha=0.6)
        if checkpoint is not None and optimizer_first:
            # The scheduler built after this load sets epoch 0's alpha and k; its own load must
            # put the saved epoch's back.
            opt.load_state_dict(checkpoint["opt"])
        # Factors other than 1 at epoch 0, so that epoch 0's values differ from any saved ones.
        scheduler = LambdaAlpha(
            opt, lambda e: 0.9 - 0.04 * min(e, 10), k_lambda=lambda e: 0.5 + e / 8
        )
        if checkpoint is not None:
            if not optimizer_first:
                opt.load_state_dict(checkpoint["opt"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            saved = checkpoint["opt"]["param_groups"][0]
            assert (opt.alpha, opt.k) == (saved["lookahead_alpha"], saved["lookahead_k"])

        def step():
            opt.step()
            scheduler.step()

        train(model, opt, steps, step=step)
        return opt, scheduler

    data = batches(16)
    straight_model = make_model()
    straight, straight_scheduler = run(straight_model, data)

    first_model = make_model()
    first, first_scheduler = run(first_model, data[:split])
    buffer = io.BytesIO()
    torch.save(
        {
            "model": first_model.state_dict(),
            "opt": first.state_dict(),
            "scheduler": first_scheduler.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert set(checkpoint["scheduler"]) == {
        "base_alphas",
        "base_ks",
        "last_epoch",
        "_last_alpha",
        "_last_k",
    }

    torch.manual_seed(99)
    resumed_model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    resumed_model.load_state_dict(checkpoint["model"])
    resumed, resumed_scheduler = run(resumed_model, data[split:], checkpoint)

    assert_same_weights(straight_model, resumed_model)
    assert resumed_scheduler.state_dict() == straight_scheduler.state_dict()
    assert (resumed.alpha, resumed.k) == (straight.alpha, straight.k)
