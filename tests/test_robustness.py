"""Nothing lost, nothing half-done: a rejected checkpoint, a sync that fails, or an evaluation that
cannot start raises a clear error and leaves every tensor and counter as it was, with the
optimizer still working."""

import copy

import pytest
import torch
from test_lookahead import batches, make_model, train

from lookahead_cuda import LambdaAlpha, Lookahead


def snapshot(model, opt):
    """Every tensor the optimizer and the model hold, cloned, by name."""
    tensors = {f"param {name}": p.detach().clone() for name, p in model.named_parameters()}
    for i, (param, entry) in enumerate(opt.state.items()):
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"inner {i} {key} {tuple(param.shape)}"] = value.clone()
    for i, (param, entry) in enumerate(opt.lookahead_state.items()):
        for key, value in entry.items():
            tensors[f"lookahead {i} {key} {tuple(param.shape)}"] = value.clone()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return tensors, groups


def assert_unchanged(model, opt, before):
    tensors, groups = snapshot(model, opt)
    assert tensors.keys() == before[0].keys()
    for name, value in before[0].items():
        assert torch.equal(tensors[name], value), name
    assert groups == before[1]


def twins(inner=torch.optim.Adam, **settings):
    """Two optimizers trained alike: one to break, one to compare it with afterwards."""
    models = [make_model(), make_model()]
    opts = [Lookahead(inner(m.parameters()), k=2, **settings) for m in models]
    for m, o in zip(models, opts):
        train(m, o, batches(3))
    return models, opts


def assert_still_works_like(model, opt, twin_model, twin):
    train(model, opt, batches(3))
    train(twin_model, twin, batches(3))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


# -- checkpoints ------------------------------------------------------------------------------


def bad_entry(key, value, index=0):
    def edit(state_dict):
        state_dict["state"][index][key] = value

    return edit


BAD_DICTS = {
    "int step": (bad_entry("lookahead_step", 1), TypeError, "lookahead_step of parameter 0"),
    "vector step": (
        bad_entry("lookahead_step", torch.tensor([1, 2])),
        TypeError,
        "one-element real tensor",
    ),
    "nan step": (
        bad_entry("lookahead_step", torch.tensor(float("nan"))),
        ValueError,
        "whole number",
    ),
    "negative step": (bad_entry("lookahead_step", torch.tensor(-1)), ValueError, "whole number"),
    "fractional step": (bad_entry("lookahead_step", torch.tensor(1.5)), ValueError, "whole number"),
    "meta step": (
        bad_entry("lookahead_step", torch.empty((), device="meta")),
        ValueError,
        "lookahead_step of parameter 0 is on the meta device",
    ),
    "huge step": (
        bad_entry("lookahead_step", torch.tensor(1e30)),
        ValueError,
        r"lookahead_step of parameter 0 is [0-9.]+e\+30, past what the int64 counter holds",
    ),
    "list slow weights": (
        bad_entry("lookahead_slow_param", [1.0, 2.0]),
        TypeError,
        "lookahead_slow_param of parameter 0 must be a tensor",
    ),
    "int slow weights": (
        bad_entry("lookahead_slow_param", torch.ones(16, 6, dtype=torch.int64)),
        TypeError,
        "has dtype torch.int64",
    ),
    "bool slow weights": (
        bad_entry("lookahead_slow_param", torch.ones(16, 6, dtype=torch.bool)),
        TypeError,
        "has dtype torch.bool",
    ),
    "meta slow weights": (
        bad_entry("lookahead_slow_param", torch.empty(16, 6, device="meta")),
        ValueError,
        "meta device",
    ),
    "misshapen slow weights": (
        bad_entry("lookahead_slow_param", torch.zeros(5)),
        ValueError,
        r"has shape \(5,\)",
    ),
    "unknown entry": (bad_entry("lookahead_bogus", torch.zeros(1)), ValueError, "no such entry"),
    "unknown in-flight code": (
        bad_entry("lookahead_in_flight", torch.tensor(3, dtype=torch.int8)),
        ValueError,
        "must be 0, 1 or 2, got 3",
    ),
    "in-flight code without its average": (
        bad_entry("lookahead_in_flight", torch.tensor(1, dtype=torch.int8)),
        ValueError,
        "comes without lookahead_in_flight_average",
    ),
    "bad k": (
        lambda sd: sd["param_groups"][0].update(lookahead_k=0),
        ValueError,
        "Invalid k in loaded param group 0",
    ),
    "another optimizer's dict": (
        lambda sd: sd.update(sgd_momentum_state_dict()),
        ValueError,
        "lacks 'betas'",
    ),
}


def sgd_momentum_state_dict():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2)
    train(model, opt, batches(3))
    return opt.state_dict()


@pytest.mark.parametrize("case", BAD_DICTS)
def test_a_rejected_state_dict_changes_nothing(case):
    edit, error, match = BAD_DICTS[case]
    (model, twin_model), (opt, twin) = twins()
    bad = copy.deepcopy(opt.state_dict())
    edit(bad)
    before = snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(bad)
    assert_unchanged(model, opt, before)
    assert_still_works_like(model, opt, twin_model, twin)


def test_adagrad_with_reset_resumes():
    model = make_model()
    opt = Lookahead(torch.optim.Adagrad(model.parameters(), lr=0.05), k=2, inner_state="reset")
    train(model, opt, batches(2))  # one sync: the inner state restarted
    saved = copy.deepcopy(opt.state_dict())
    assert all("step" in entry for entry in saved["state"].values())  # no empty inner entries
    opt.load_state_dict(saved)
    train(model, opt, batches(3))


def test_a_failing_inner_load_is_undone():
    (model, twin_model), (opt, twin) = twins(torch.optim.Adagrad)
    bad = copy.deepcopy(opt.state_dict())
    del bad["state"][0]["step"]  # Adagrad's __setstate__ reads the first entry's "step"
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="Adagrad rejected the loaded state: KeyError"):
        opt.load_state_dict(bad)
    assert_unchanged(model, opt, before)
    assert_still_works_like(model, opt, twin_model, twin)


def test_state_dict_hooks_registered_on_lookahead_run():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    train(model, opt, batches(2))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": calls.append("save post")})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    saved = opt.state_dict()
    assert "note" in saved  # what a post hook returns is the state dict
    del saved["note"]
    opt.load_state_dict(saved)
    assert calls == ["save pre", "save post", "load pre", "load post"]


# -- syncs --------------------------------------------------------------------------------------


def test_a_sync_that_would_fail_raises_before_the_inner_step_and_changes_nothing():
    # An fp64 group beside the fp32 one (two buckets), then a parameter of the fp32 group replaced
    # by one of another shape: the fp64 bucket must not be synced, the inner step must not run.
    model = make_model()
    spare = torch.nn.Parameter(torch.randn(1, 3))
    extra = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    groups = [{"params": [*model.parameters(), spare]}, {"params": [extra]}]
    opt = Lookahead(torch.optim.SGD(groups, lr=0.1, momentum=0.9), k=2)
    x, y = batches(1)[0]

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) + spare.square().sum()
        (loss + extra.square().sum()).backward()
        opt.step()

    step()
    kept = spare.data
    spare.data = torch.randn(4, 3)
    before = snapshot(model, opt)
    extra_before = extra.detach().clone()
    with pytest.raises(ValueError, match=r"parameter 4 of param group 0 has shape \[4, 3\]"):
        step()
    assert_unchanged(model, opt, before)
    assert torch.equal(extra, extra_before)
    spare.data = kept
    step()  # working again: this step syncs both groups
    assert int(opt.lookahead_state[extra]["step"]) == 0


def test_a_step_decided_on_the_device_that_would_fail_changes_nothing():
    # capturable=True with one bucket: its syncs are decided on the device, at every step; the
    # check still runs on the host before the inner step.
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=5, capturable=True)

    def step():
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()

    step()
    kept = model[0].bias.data
    model[0].bias.data = torch.randn(17)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 has shape \[17\]"):
        step()
    assert_unchanged(model, opt, before)
    model[0].bias.data = kept
    step()
    assert int(opt.lookahead_state[model[0].weight]["step"]) == 2


def test_a_pullback_copy_made_after_slow_dtype_changed_does_not_fail_the_sync():
    # The bias gets its first gradient, so its momentum buffer, after slow_dtype was changed to
    # one the float32 buffer cannot pair with: its slow copy is made in the buffer's dtype.
    weight, bias = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3))
    opt = Lookahead(
        torch.optim.SGD([weight, bias], lr=0.1, momentum=0.9), k=2, inner_state="pullback"
    )

    def step(with_bias):
        weight.grad = torch.sin(weight.detach())
        bias.grad = torch.cos(bias.detach()) if with_bias else None
        opt.step()

    step(False)
    step(False)  # synced: the bias has no buffer yet
    opt.slow_dtype = torch.bfloat16
    step(True)
    step(True)  # synced: the bias's buffer gets a slow copy
    ours = opt.lookahead_state[bias]
    assert ours["slow_momentum_buffer"].dtype == torch.float32
    assert int(opt.lookahead_state[weight]["step"]) == 0


def test_counts_stay_exact_past_two_to_the_24():
    model = make_model()
    k = 2**24 + 3  # float32 holds 2**24 + 2 but not 2**24 + 3: a float counter never gets there
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=k)
    train(model, opt, batches(1))
    counter = opt.lookahead_state[next(model.parameters())]["step"]
    counter.fill_(k - 2)
    train(model, opt, batches(1))
    assert int(counter) == k - 1
    train(model, opt, batches(1))
    assert int(counter) == 0  # synced


# -- evaluation ---------------------------------------------------------------------------------


def test_evaluation_that_cannot_start_changes_nothing():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=3)
    train(model, opt, batches(2))
    model[0].bias.data = torch.randn(4, 16)  # was (16,): its slow weights no longer fit
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="parameter 1 of param group 0"), opt.slow_weights():
        pass
    assert_unchanged(model, opt, before)
    with pytest.raises(ValueError, match="parameter 1 of param group 0"):
        opt.eval()
    assert opt.training
    assert_unchanged(model, opt, before)


# -- settings -----------------------------------------------------------------------------------


def test_settings_set_later_are_checked_against_the_inner_optimizer():
    opt = Lookahead(torch.optim.Adagrad(make_model().parameters()))
    with pytest.raises(ValueError, match="Adagrad keeps none"):
        opt.inner_state = "pullback"
    assert opt.inner_state == "keep"


def test_a_k_schedule_that_overflows_raises_value_error_and_changes_nothing():
    opt = Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.1), k=4)
    schedule = LambdaAlpha(opt, lambda t: 1.0, k_lambda=lambda t: float("inf") if t == 2 else 1.0)
    schedule.step()
    with pytest.raises(ValueError, match="k_lambda"):
        schedule.step()
    assert schedule.last_epoch == 1 and opt.k == 4


def test_a_scheduler_rejects_a_state_dict_that_is_not_its_own():
    opt = Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.1))
    schedule = LambdaAlpha(opt, lambda t: 1.0)
    saved = schedule.state_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['optimizer'\]"):
        schedule.load_state_dict({**saved, "optimizer": opt})
    with pytest.raises(ValueError, match=r"missing keys \['last_epoch'\]"):
        schedule.load_state_dict({k: v for k, v in saved.items() if k != "last_epoch"})
    assert schedule.optimizer is opt
    schedule.step()


# -- the functional core ------------------------------------------------------------------------


def test_lookahead_sync_names_bad_input_by_its_place_in_the_lists():
    from lookahead_cuda.functional import lookahead_sync

    slow = [torch.randn(3), torch.randn(2, dtype=torch.float64), torch.randn(4)]
    fast = [torch.randn(3), torch.randn(2, dtype=torch.float64), torch.randn(5)]
    before = [t.clone() for t in slow + fast]
    # Two buckets (float32, float64); the bad pair is the second of the float32 bucket.
    with pytest.raises(
        ValueError, match=r"the slow copy of fast\[2\] has shape \[4\] but fast\[2\]"
    ):
        lookahead_sync(slow, fast, 0.5)
    assert all(map(torch.equal, slow + fast, before))
    with pytest.raises(TypeError, match=r"due must be a one-element torch\.bool tensor or None"):
        lookahead_sync(slow[:2], fast[:2], 0.5, due=True)
    with pytest.raises(TypeError, match=r"restore must be a one-element torch\.bool tensor"):
        lookahead_sync(slow[:2], fast[:2], 0.5, due=torch.tensor(True), restore=False)
    assert all(map(torch.equal, slow + fast, before))
    for alpha, error in ((2.0, ValueError), ("x", TypeError)):
        with pytest.raises(error, match="alpha"):
            lookahead_sync([], [], alpha)
    with pytest.raises(ValueError, match="mu"):
        lookahead_sync([], [], 0.5, momentum_buffers=[], momentum=1.5)
    for momentum in (-0.5, float("nan")):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
            lookahead_sync(slow[:2], fast[:2], 0.5, momentum_buffers=slow[:2], momentum=momentum)
    with pytest.raises(TypeError, match=r"due must be .* got a torch\.float32 tensor"):
        lookahead_sync([], [], 0.5, due=torch.tensor(1.0))
    assert all(map(torch.equal, slow + fast, before))
