"""Lookahead against an independent per-parameter implementation of the algorithm."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import lookahead_cuda.ops
import lookahead_cuda.optimizer
from lookahead_cuda import Lookahead

# Results that depend on the CPU kernels torch picks: run again under every capability the CPU
# has (test_cpu_capabilities.py).
pytestmark = pytest.mark.cpu_capability

FIRST_MOMENTS = ("momentum_buffer", "exp_avg")


class ReferenceLookahead:
    """Lookahead as the paper states it, one parameter at a time in plain torch."""

    def __init__(
        self,
        inner,
        k=5,
        alpha=0.5,
        inner_state="keep",
        slow_dtype=None,
        nonfinite="propagate",
        capturable=False,  # where the sync is decided, not what it does
    ):
        self.inner, self.k, self.alpha = inner, k, alpha
        self.inner_state, self.slow_dtype, self.nonfinite = inner_state, slow_dtype, nonfinite
        self.slow = None
        self.slow_buffers = {}
        self.count = 0
        self.restores = 0
        # What "reset" restarts from: the state the optimizer made at construction (Adagrad's
        # before torch 2.13), or none; not the state of steps taken before it was wrapped.
        self.initial_state = {
            p: copy.deepcopy(entry)
            for p, entry in inner.state.items()
            if "step" in entry and float(entry["step"]) == 0
        }

    def params(self):
        return [p for group in self.inner.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        if self.slow is None:
            self.slow = [p.detach().clone().to(self.slow_dtype or p.dtype) for p in self.params()]
        self.inner.step(closure)
        self.count += 1
        if self.count < self.k:
            return
        self.count = 0
        if self.nonfinite == "restore" and not all(p.isfinite().all() for p in self.params()):
            self.restores += 1
            for p, s in zip(self.params(), self.slow):
                p.copy_(s)
            if self.inner_state == "pullback":
                for p in self.params():
                    for name, buffer in self.first_moments(p):
                        buffer.copy_(self.slow_buffer(p, name, buffer))
            return
        self.update_slow()
        if self.inner_state == "reset":
            self.inner.state.clear()
            self.inner.state.update(
                {p: copy.deepcopy(entry) for p, entry in self.initial_state.items()}
            )
        if self.inner_state == "pullback":
            for p in self.params():
                for name, buffer in self.first_moments(p):
                    slow = self.slow_buffer(p, name, buffer)
                    slow.lerp_(buffer.to(slow.dtype), self.alpha)
                    buffer.copy_(slow)

    def update_slow(self):
        """The outer step on the weights: Lookahead's lerp (a subclass may take another)."""
        for p, s in zip(self.params(), self.slow):
            s.lerp_(p.to(s.dtype), self.alpha)
            p.copy_(s)

    def first_moments(self, p):
        state = self.inner.state.get(p, {})
        return [(name, state[name]) for name in FIRST_MOMENTS if state.get(name) is not None]

    def slow_buffer(self, p, name, buffer):
        dtype = self.slow_dtype or buffer.dtype
        return self.slow_buffers.setdefault((p, name), torch.zeros_like(buffer, dtype=dtype))


def make_model(dtype=torch.float32):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    return model


def batches(count, dtype=torch.float32):
    generator = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(8, 6, generator=generator, dtype=dtype),
            torch.randn(8, 3, generator=generator),
        )
        for _ in range(count)
    ]


def train(model, optimizer, data, step=None):
    for x, y in data:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        (step or optimizer.step)()


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


INNER = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
}
WITHOUT_FIRST_MOMENT = {"adagrad"}


def run_both(make_inner, steps=17, dtype=torch.float32, **settings):
    ours_model, ref_model = make_model(dtype), make_model(dtype)
    ours = Lookahead(make_inner(ours_model.parameters()), **settings)
    ref = ReferenceLookahead(make_inner(ref_model.parameters()), **settings)
    data = batches(steps, dtype)
    train(ours_model, ours, data)
    train(ref_model, ref.inner, data, step=ref.step)
    return ours_model, ref_model, ours, ref


@pytest.mark.parametrize("name", list(INNER))
@pytest.mark.parametrize("inner_state", ["keep", "reset", "pullback"])
@pytest.mark.parametrize(("k", "alpha"), [(5, 0.5), (1, 0.8), (3, 0.3), (4, 1.0)])
def test_matches_reference(name, inner_state, k, alpha):
    if inner_state == "pullback" and name in WITHOUT_FIRST_MOMENT:
        pytest.skip("no first moment to pull back")
    ours_model, ref_model, ours, ref = run_both(
        INNER[name], k=k, alpha=alpha, inner_state=inner_state
    )
    assert_same_weights(ours_model, ref_model)
    for p, slow in zip(ours_model.parameters(), ref.slow):
        assert torch.equal(ours.lookahead_state[p]["slow_param"], slow)


WARM_STARTED = {
    "adamw": INNER["adamw"],
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.5),
}


@pytest.mark.parametrize("name", list(WARM_STARTED))
def test_reset_restarts_a_warm_started_inner_optimizer_as_a_fresh_one(name):
    # The inner optimizer trained alone first: a reset gives it the state a fresh instance holds
    # (Adagrad's construction-time step 0 and sum; none for AdamW), not its warm-start state.
    model = make_model()
    inner = WARM_STARTED[name](model.parameters())
    fresh = WARM_STARTED[name](make_model().parameters())
    train(model, inner, batches(3))
    opt = Lookahead(inner, k=2, inner_state="reset")
    train(model, opt, batches(5)[3:])  # one sync, then the reset
    for p, q in zip(model.parameters(), fresh.param_groups[0]["params"]):
        assert opt.state[p].keys() == fresh.state[q].keys()
        for key, value in fresh.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    train(model, opt, batches(6)[5:])  # and it steps on from there


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_slow_weights_for_half_precision_parameters(dtype):
    # eps representable in fp16, so that the run stays finite and comparisons mean something
    ours_model, ref_model, ours, _ref = run_both(
        lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-3),
        dtype=dtype,
        k=3,
        inner_state="pullback",
        slow_dtype=torch.float32,
    )
    assert all(p.isfinite().all() for p in ours_model.parameters())
    assert_same_weights(ours_model, ref_model)
    for p in ours_model.parameters():
        assert ours.lookahead_state[p]["slow_param"].dtype == torch.float32
        assert ours.lookahead_state[p]["slow_exp_avg"].dtype == torch.float32


def test_fp32_slow_weights_keep_updates_that_bf16_slow_weights_lose():
    # Each inner step moves a bf16 weight of 1.0 by one unit in the last place (u = 2**-7); with
    # k=1, alpha=0.5 every sync asks the slow weight to move by half of that. bf16 slow weights
    # round the half back (ties to even) and never leave 1.0; fp32 ones keep the halves, and the
    # fast weights restart from them. Measured over 100 steps: 0 u against 50 u of progress.
    u = 2.0**-7
    progress = {}
    for slow_dtype in (None, torch.float32):
        weight = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        opt = Lookahead(torch.optim.SGD([weight], lr=1.0), k=1, alpha=0.5, slow_dtype=slow_dtype)
        for _ in range(100):
            weight.grad = torch.full_like(weight, -u)
            opt.step()
        progress[slow_dtype] = (weight.detach().float() - 1.0) / u
    assert torch.equal(progress[None], torch.zeros(4))
    assert torch.equal(progress[torch.float32], torch.full((4,), 50.0))


def test_is_a_real_optimizer_sharing_the_inner_views():
    model = make_model()
    inner = torch.optim.Adam(model.parameters())
    opt = Lookahead(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    train(model, opt, batches(2))
    # torch's load_state_dict replaces the inner optimizer's lists; the views follow.
    inner.load_state_dict(inner.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert "exp_avg" in opt.state[next(model.parameters())]


def test_hooks_run():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    train(model, opt, batches(2))
    assert calls == ["pre", "post", "pre", "post"]


def test_closure_is_passed_to_the_inner_optimizer():
    model, ref_model = make_model(), make_model()
    x, y = batches(1)[0]

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        return closure

    opt = Lookahead(torch.optim.LBFGS(model.parameters(), lr=0.5), k=2)
    ref = ReferenceLookahead(torch.optim.LBFGS(ref_model.parameters(), lr=0.5), k=2, alpha=0.5)
    for _ in range(3):
        loss = opt.step(closure_for(model, opt))
        ref.step(closure_for(ref_model, ref.inner))
        assert loss is not None
    assert_same_weights(model, ref_model)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_lr_schedulers_through_the_wrapper(schedule):
    def make(model):
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return inner

    def scheduler_for(opt):
        if schedule == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)

    ours_model, ref_model = make_model(), make_model()
    ours = Lookahead(make(ours_model), k=4)
    ref = ReferenceLookahead(make(ref_model), k=4, alpha=0.5)
    ours_sched, ref_sched = scheduler_for(ours), scheduler_for(ref.inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches(12):
            for model, opt, step, sched in (
                (ours_model, ours, ours.step, ours_sched),
                (ref_model, ref.inner, ref.step, ref_sched),
            ):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                step()
                sched.step()
            assert ours.param_groups[0]["lr"] == ref.inner.param_groups[0]["lr"]
    assert_same_weights(ours_model, ref_model)


def resume_run(make_inner, dtype, steps, split, **settings):
    data = batches(steps, dtype)
    straight_model = make_model(dtype)
    straight = Lookahead(make_inner(straight_model.parameters()), **settings)
    train(straight_model, straight, data)

    first_model = make_model(dtype)
    first = Lookahead(make_inner(first_model.parameters()), **settings)
    train(first_model, first, data[:split])
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    torch.manual_seed(99)  # a fresh model whose own initial weights must not leak in
    resumed_model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    resumed = Lookahead(make_inner(resumed_model.parameters()), **settings)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["opt"])
    train(resumed_model, resumed, data[split:])
    return straight_model, straight, resumed_model, resumed


@pytest.mark.parametrize("split", [1, 6, 8])
@pytest.mark.parametrize("inner_state", ["keep", "reset", "pullback"])
def test_exact_resume(split, inner_state):
    straight_model, straight, resumed_model, resumed = resume_run(
        INNER["adam"], torch.float32, 14, split, k=4, alpha=0.6, inner_state=inner_state
    )
    assert_same_weights(straight_model, resumed_model)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        for key, value in straight.lookahead_state[p].items():
            assert torch.equal(value, resumed.lookahead_state[q][key]), key


def test_exact_resume_with_fp32_slow_weights_of_bf16_parameters():
    straight_model, _straight, resumed_model, resumed = resume_run(
        INNER["sgd-momentum"],
        torch.bfloat16,
        11,
        5,
        k=3,
        slow_dtype=torch.float32,
        inner_state="pullback",
    )
    assert_same_weights(straight_model, resumed_model)
    for q in resumed_model.parameters():
        assert resumed.lookahead_state[q]["slow_param"].dtype == torch.float32


def test_state_dict_layout_and_settings_round_trip():
    model = make_model()
    opt = Lookahead(torch.optim.Adam(model.parameters()), k=3, alpha=0.25)
    train(model, opt, batches(2))
    state_dict = opt.state_dict()
    assert set(state_dict) == {"state", "param_groups"}
    assert set(state_dict["state"]) == {0, 1, 2, 3}
    assert state_dict["state"][0]["lookahead_step"].item() == 2
    assert "lookahead_slow_param" in state_dict["state"][3]
    assert state_dict["param_groups"][0]["lookahead_k"] == 3

    other_model = make_model()
    other = Lookahead(torch.optim.Adam(other_model.parameters()), k=7, alpha=0.9)
    other.load_state_dict(state_dict)
    assert (other.k, other.alpha) == (3, 0.25)
    # Loaded tensors are copies: stepping one optimizer leaves the other's state alone.
    p = next(other_model.parameters())
    assert other.lookahead_state[p]["slow_param"].data_ptr() != (
        opt.lookahead_state[next(model.parameters())]["slow_param"].data_ptr()
    )


def test_loads_a_bare_inner_optimizer_state_dict():
    model = make_model()
    inner = torch.optim.Adam(model.parameters())
    train(model, inner, batches(3))
    opt = Lookahead(torch.optim.Adam(make_model().parameters()), k=2)
    opt.load_state_dict(inner.state_dict())
    assert opt.k == 2 and opt.param_groups[0]["lookahead_k"] == 2


def test_bad_state_dict_changes_nothing():
    model = make_model()
    opt = Lookahead(torch.optim.Adam(model.parameters()), k=3)
    train(model, opt, batches(2))
    good = opt.state_dict()
    before = copy.deepcopy(good)
    bad = copy.deepcopy(good)
    bad["state"][1]["lookahead_slow_param"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"lookahead_slow_param of parameter 1 has shape \(5,\)"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["lookahead_k"] = 0
    with pytest.raises(ValueError, match="Invalid k in loaded param group 0"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, after["state"][index][key]), (index, key)


def test_slow_weights_taken_at_first_step_not_construction():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # e.g. a checkpoint loaded after the optimizer was built
    initial = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(1))
    for p, start in zip(model.parameters(), initial):
        assert torch.equal(opt.lookahead_state[p]["slow_param"], start)


def test_parameters_without_gradients():
    model = make_model()
    unused = nn.Linear(3, 3)
    frozen_before = [p.detach().clone() for p in unused.parameters()]
    params = list(model.parameters()) + list(unused.parameters())
    for inner_state in ("keep", "pullback", "reset"):
        opt = Lookahead(torch.optim.Adam(params, lr=0.01), k=2, inner_state=inner_state)
        train(model, opt, batches(5))
        for p, before in zip(unused.parameters(), frozen_before):
            assert torch.equal(p, before)
            assert torch.equal(opt.lookahead_state[p]["slow_param"], before)


def test_add_param_group():
    model = make_model()
    head = nn.Linear(3, 2)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=3, alpha=0.5)
    train(model, opt, batches(2))
    opt.add_param_group({"params": head.parameters(), "lr": 0.2, "lookahead_k": 2})
    group = opt.param_groups[1]
    assert group["lookahead_k"] == 2 and group["lookahead_alpha"] == 0.5
    assert opt.optimizer.param_groups[1] is group

    start = [p.detach().clone() for p in head.parameters()]
    for x, y in batches(2):
        opt.zero_grad()
        nn.functional.mse_loss(head(model(x)), y[:, :2]).backward()
        opt.step()
    # Group 1 synced after its own 2 steps: slow = start + 0.5 * (fast_before_sync - start).
    for p, s0 in zip(head.parameters(), start):
        slow = opt.lookahead_state[p]["slow_param"]
        assert torch.equal(p, slow) and not torch.equal(slow, s0)
    # Group 0 counted 4 steps: synced at 3, one since.
    assert opt.lookahead_state[next(model.parameters())]["step"].item() == 1

    with pytest.raises(ValueError, match="Invalid alpha in the new param group"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "lookahead_alpha": 2.0})
    assert len(opt.param_groups) == 2


def test_a_group_added_through_the_inner_optimizer_gets_the_defaults():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    inner = torch.optim.SGD([a], lr=0.1)
    opt = Lookahead(inner, k=2, alpha=0.5)
    inner.add_param_group({"params": [b]})
    assert opt.k == 2
    b0 = b.detach().clone()
    for _ in range(2):
        a.grad, b.grad = torch.ones(3), torch.ones(4)
        opt.step()
    # Synced after two SGD steps: slow = lerp(b0, fast, 0.5).
    assert torch.equal(
        b, b0.lerp(b0.add(torch.ones(4), alpha=-0.1).add(torch.ones(4), alpha=-0.1), 0.5)
    )
    assert opt.state_dict()["param_groups"][1]["lookahead_k"] == 2


def test_k_and_alpha_change_between_steps_and_per_group():
    model = make_model()
    layers = [model[0], model[2]]
    inner = torch.optim.SGD(
        [{"params": layers[0].parameters()}, {"params": layers[1].parameters()}], lr=0.1
    )
    opt = Lookahead(inner, k=10)
    opt.param_groups[1]["lookahead_k"] = 1
    with pytest.raises(ValueError, match="different lookahead_k"):
        _ = opt.k
    train(model, opt, batches(1))
    assert all(torch.equal(p, opt.lookahead_state[p]["slow_param"]) for p in layers[1].parameters())
    assert not any(
        torch.equal(p, opt.lookahead_state[p]["slow_param"]) for p in layers[0].parameters()
    )
    opt.k = 2
    opt.alpha = 0.3
    assert opt.k == 2 and opt.alpha == 0.3
    assert all(g["lookahead_k"] == 2 for g in opt.param_groups)
    with pytest.raises(ValueError, match=r"Invalid k in Lookahead\.k"):
        opt.k = 0
    assert opt.k == 2


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skipped_step_does_not_count(fused):
    def run(data, inf_at=None):
        model = make_model()
        opt = Lookahead(torch.optim.Adam(model.parameters(), lr=0.01, fused=fused), k=3)
        assert opt._step_supports_amp_scaling == fused
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if i == inf_at:
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        return model, opt

    data = batches(7)
    skipped_model, skipped = run(data, inf_at=2)
    clean_model, clean = run(data[:2] + data[3:])
    # 6 counted steps in both: synced at 3 and 6, the skipped one not counted.
    first = next(skipped_model.parameters())
    assert skipped.lookahead_state[first]["step"].item() == 0
    assert_same_weights(skipped_model, clean_model)
    for p, q in zip(skipped_model.parameters(), clean_model.parameters()):
        assert torch.equal(
            skipped.lookahead_state[p]["slow_param"], clean.lookahead_state[q]["slow_param"]
        )


def test_a_step_that_raises_under_grad_scaler_leaves_no_scale_behind():
    # GradScaler removes the grad_scale and found_inf it gives an amp-aware optimizer only after a
    # step that returned; left, they would unscale the next plain step's gradients again.
    model = make_model()
    opt = Lookahead(torch.optim.Adam(model.parameters(), lr=0.01, fused=True), k=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batches(1)[0]
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    opt.eval()
    with pytest.raises(RuntimeError, match="evaluation mode"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_the_unscale_lookahead_does_for_diloco_workers_is_grad_scalers():
    # lookahead_cuda.amp against GradScaler.unscale_ itself, on dense and sparse gradients, at a
    # scale that is not a power of two (so the reciprocal's rounding shows).
    from lookahead_cuda.amp import unscale_and_step

    def make():
        torch.manual_seed(5)
        dense, table = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(6, 2))
        dense.grad = torch.randn(4, 3) * 3**7
        table.grad = torch.sparse_coo_tensor([[0, 4, 4]], torch.randn(3, 2) * 3**7, (6, 2))
        return [dense, table], torch.optim.SGD([dense, table], lr=0.1)

    scale = torch.tensor(float(3**7))
    params, opt = make()
    unscale_and_step(opt, None, scale, torch.zeros(()))
    ref_params, ref_opt = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=float(3**7))
    scaler.scale(torch.ones(()))  # GradScaler makes its scale tensor at its first scale()
    scaler.unscale_(ref_opt)
    ref_opt.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    params, opt = make()
    before = [p.detach().clone() for p in params]
    unscale_and_step(opt, None, None, torch.ones(()))  # an inf was found: no step
    assert all(map(torch.equal, params, before))
    half = nn.Parameter(torch.randn(3, dtype=torch.float16))
    half.grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        unscale_and_step(torch.optim.SGD([half], lr=0.1), None, scale, torch.zeros(()))


def test_sync_now():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=100, alpha=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(3))
    fast = [p.detach().clone() for p in model.parameters()]
    opt.sync()
    for p, s0, f in zip(model.parameters(), start, fast):
        assert torch.equal(p, torch.lerp(s0, f, 0.5))
        assert torch.equal(opt.lookahead_state[p]["slow_param"], p)
    assert opt.lookahead_state[next(model.parameters())]["step"].item() == 0


@pytest.mark.parametrize("slow_dtype", [None, torch.float32])
def test_evaluate_on_slow_weights(slow_dtype):
    dtype = torch.bfloat16 if slow_dtype else torch.float32
    model = make_model(dtype)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=100, slow_dtype=slow_dtype)
    train(model, opt, batches(3, dtype))
    fast = [p.detach().clone() for p in model.parameters()]
    slow = [opt.lookahead_state[p]["slow_param"].clone() for p in model.parameters()]
    pointers = [p.data_ptr() for p in model.parameters()]
    with opt.slow_weights():
        for p, s in zip(model.parameters(), slow):
            assert torch.equal(p, s.to(dtype))
        assert [p.data_ptr() for p in model.parameters()] == pointers
    for p, f, s in zip(model.parameters(), fast, slow):
        assert torch.equal(p, f)
        assert torch.equal(opt.lookahead_state[p]["slow_param"], s)

    with pytest.raises(RuntimeError, match="boom"), opt.slow_weights():
        raise RuntimeError("boom")
    for p, f in zip(model.parameters(), fast):
        assert torch.equal(p, f)


def test_slow_weights_follow_parameters_to_a_new_dtype():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    train(model, opt, batches(1))
    model.double()
    train(model, opt, batches(1, torch.float64))
    for p in model.parameters():
        assert opt.lookahead_state[p]["slow_param"].dtype == torch.float64


def test_a_partly_moved_model_is_followed_before_any_bucket_syncs(monkeypatch):
    # Group 0 stays fp32; group 1 turns fp64 after the slow weights were taken: the sync finds it
    # before any call, its slow weights follow, and every pair is updated exactly once.
    model, ref_model = make_model(), make_model()

    def groups(m):
        return [{"params": m[0].parameters()}, {"params": m[2].parameters()}]

    opt = Lookahead(torch.optim.SGD(groups(model), lr=0.1), k=2)
    ref = ReferenceLookahead(torch.optim.SGD(groups(ref_model), lr=0.1), k=2)
    train(model, opt, batches(1))
    train(ref_model, ref.inner, batches(1), step=ref.step)
    for m in (model, ref_model):
        m[2].double()
    ref.slow[2:] = [s.double() for s in ref.slow[2:]]

    updated = []
    real_update = lookahead_cuda.functional.lookahead_update_

    def recording_update(slow, fast, alpha):
        real_update(slow, fast, alpha)
        updated.extend(id(f) for f in fast)

    monkeypatch.setattr(lookahead_cuda.functional, "lookahead_update_", recording_update)
    x, y = batches(1)[0]
    for m, inner, step in ((model, opt, opt.step), (ref_model, ref.inner, ref.step)):
        inner.zero_grad()
        nn.functional.mse_loss(m[2](m[1](m[0](x)).double()).float(), y).backward()
        step()
    assert sorted(updated) == sorted(id(p) for p in model.parameters())
    assert_same_weights(model, ref_model)


def test_state_dict_loads_with_weights_only_after_copy():
    model = make_model()
    opt = Lookahead(torch.optim.AdamW(model.parameters()), slow_dtype=torch.float32)
    train(model, opt, batches(2))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["param_groups"][0]["lookahead_slow_dtype"] == torch.float32
    clone = copy.deepcopy(opt)
    assert clone.k == opt.k


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"Invalid k in Lookahead\(\): 0"),
        ({"k": 2.5}, r"Invalid k"),
        ({"k": True}, r"Invalid k"),
        ({"alpha": 0.0}, r"Invalid alpha in Lookahead\(\): 0.0"),
        ({"alpha": 1.5}, r"Invalid alpha"),
        ({"alpha": float("nan")}, r"Invalid alpha"),
        ({"inner_state": "pull"}, r"Invalid inner_state"),
        ({"slow_dtype": torch.int32}, r"Invalid slow_dtype"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    inner = torch.optim.SGD(make_model().parameters(), lr=0.1)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    )
    with pytest.raises(ValueError, match=match):
        Lookahead(inner, **kwargs)
    assert [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups] == (
        groups_before
    )


def test_rejects_what_it_cannot_wrap():
    model = make_model()
    with pytest.raises(TypeError, match=r"wraps a torch\.optim\.Optimizer"):
        Lookahead(model.parameters())
    with pytest.raises(TypeError, match="cannot wrap another Lookahead"):
        Lookahead(Lookahead(torch.optim.SGD(model.parameters(), lr=0.1)))
    with pytest.raises(ValueError, match="Adagrad keeps none"):
        Lookahead(torch.optim.Adagrad(model.parameters()), inner_state="pullback")


def test_unsupported_slow_dtype_for_a_parameter_fails_at_first_step_cleanly():
    model = make_model(torch.float64)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), slow_dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"slow_dtype torch\.float32 cannot hold"):
        train(model, opt, batches(1, torch.float64))
    assert not opt.lookahead_state or all(
        "slow_param" not in s for s in opt.lookahead_state.values()
    )
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
