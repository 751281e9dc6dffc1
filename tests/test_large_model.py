"""Large-model training on the CPU: syncs decided on the device (capturable), torch.compile, the
divergence guard, and evaluation on slow weights, each against the per-parameter reference.

The CUDA-graph and fused-AMP tests that need a GPU are in test_cuda.py.
"""

import pytest
import torch
import torch._dynamo
from test_lookahead import (
    INNER,
    WITHOUT_FIRST_MOMENT,
    ReferenceLookahead,
    assert_same_weights,
    batches,
    make_model,
    run_both,
    train,
)
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lookahead_cuda import Lookahead


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


# -- capturable: the same algorithm, decided on the device ----------------------------------------


@pytest.mark.parametrize("name", [n for n in INNER if n not in WITHOUT_FIRST_MOMENT])
@pytest.mark.parametrize("inner_state", ["keep", "pullback"])
def test_capturable_matches_reference(name, inner_state):
    ours_model, ref_model, ours, _ = run_both(
        INNER[name], k=3, alpha=0.4, inner_state=inner_state, capturable=True
    )
    assert_same_weights(ours_model, ref_model)
    counter = ours.lookahead_state[next(ours_model.parameters())]["step"]
    assert counter.device == next(ours_model.parameters()).device and counter.item() == 17 % 3


def test_capturable_never_branches_on_the_host(monkeypatch):
    """Every step goes through the gated op; the host-decided op is never called."""
    from lookahead_cuda import functional

    def host_decided(*args):
        raise AssertionError("a capturable step called the host-decided op")

    calls = []
    gated = functional.lookahead_update_if_
    monkeypatch.setattr(functional, "lookahead_update_", host_decided)
    monkeypatch.setattr(functional, "lookahead_update_if_", lambda *a: calls.append(gated(*a)))
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=4, capturable=True)
    train(model, opt, batches(6))
    assert len(calls) == 6


def test_capturable_rejects_reset_however_it_is_set():
    model = make_model()

    def sgd():
        return torch.optim.SGD(model.parameters(), lr=0.1)

    refused = r"Invalid inner_state in .*'reset' .* capturable"
    with pytest.raises(ValueError, match=refused):
        Lookahead(sgd(), capturable=True, inner_state="reset")
    opt = Lookahead(sgd(), capturable=True)
    train(model, opt, batches(1))
    with pytest.raises(ValueError, match=refused):
        opt.inner_state = "reset"
    saved = opt.state_dict()
    saved["param_groups"][0]["lookahead_inner_state"] = "reset"
    with pytest.raises(ValueError, match=refused):
        opt.load_state_dict(saved)
    with pytest.raises(ValueError, match=refused):
        opt.add_param_group(
            {"params": [torch.nn.Parameter(torch.randn(2))], "lookahead_inner_state": "reset"}
        )
    opt.param_groups[0]["lookahead_inner_state"] = "reset"  # edited directly: refused at the step
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=refused):
        train(model, opt, batches(1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(TypeError, match="Invalid capturable: 1"):
        Lookahead(sgd(), capturable=1)


def test_capturable_resumes_exactly():
    data = batches(11)
    straight_model = make_model()
    straight = Lookahead(
        torch.optim.Adam(straight_model.parameters(), lr=0.01), k=3, capturable=True
    )
    train(straight_model, straight, data)

    model = make_model()
    opt = Lookahead(torch.optim.Adam(model.parameters(), lr=0.01), k=3, capturable=True)
    train(model, opt, data[:5])
    saved = opt.state_dict()
    resumed_model = make_model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = Lookahead(torch.optim.Adam(resumed_model.parameters(), lr=0.01), capturable=True)
    resumed.load_state_dict(saved)
    train(resumed_model, resumed, data[5:])
    assert_same_weights(resumed_model, straight_model)


# -- torch.compile ---------------------------------------------------------------------------------

SETTINGS = [
    {},
    {"inner_state": "pullback"},
    {"nonfinite": "restore"},
    {"capturable": True, "inner_state": "pullback"},
]


def sgd(params):
    return torch.optim.SGD(params, lr=0.05)


def sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_compiled_step_gives_the_eager_weights(backend, settings):
    # A compiled SGD may round differently from an eager one (torch 2.11 does), so the eager
    # Lookahead steps a compiled SGD: what is compared is Lookahead's own part of the step.
    data = batches(10)
    eager_model = make_model()
    eager = Lookahead(sgd_momentum(eager_model.parameters()), k=3, **settings)
    eager.optimizer.step = torch.compile(eager.optimizer.step, backend=backend)
    train(eager_model, eager, data)

    model = make_model()
    opt = Lookahead(sgd_momentum(model.parameters()), k=3, **settings)
    train(model, opt, data, step=torch.compile(opt.step, backend=backend))
    assert_same_weights(model, eager_model)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(
            opt.lookahead_state[p]["slow_param"], eager.lookahead_state[q]["slow_param"]
        )


def test_compiled_adam_step_matches_the_reference_around_compiled_adam():
    """Compiled Adam rounds differently from eager Adam, so the reference steps a compiled Adam."""
    data = batches(10)
    ref_model = make_model()
    ref = ReferenceLookahead(torch.optim.Adam(ref_model.parameters(), lr=0.01), k=3)
    inner_step = torch.compile(ref.inner.step, backend="aot_eager")
    ref.inner.step = inner_step
    train(ref_model, ref.inner, data, step=ref.step)

    model = make_model()
    opt = Lookahead(torch.optim.Adam(model.parameters(), lr=0.01), k=3)
    train(model, opt, data, step=torch.compile(opt.step, backend="aot_eager"))
    assert_same_weights(model, ref_model)


@pytest.mark.parametrize("settings", SETTINGS)
def test_compiled_step_adds_no_graph_break_and_never_recompiles(settings):
    model = make_model()
    opt = Lookahead(torch.optim.Adam(model.parameters(), lr=0.01), k=3, **settings)
    data = batches(12)
    train(model, opt, data[:1])  # the inner optimizer creates its state eagerly, as usual
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter)
    # State that appears at the first compiled step (pullback's slow buffers) recompiles once.
    train(model, opt, data[1:3], step=step)
    graphs = counter.frame_count
    # Nine more steps cross three syncs; a guard on the step count would recompile here.
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(model, opt, data[3:], step=step)
    assert counter.frame_count == graphs
    # torch.optim breaks the graph around every inner step on purpose (torch._dynamo.graph_break()
    # in Optimizer's _use_grad); any other break would be ours.
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("User-inserted graph break" in reason for reason in breaks), breaks
    assert opt.lookahead_state[next(model.parameters())]["step"].item() == 12 % 3


def test_inductor_compiled_step():
    data = batches(7)
    eager_model = make_model()
    eager = Lookahead(torch.optim.Adam(eager_model.parameters(), lr=0.01), k=3)
    train(eager_model, eager, data)
    model = make_model()
    opt = Lookahead(torch.optim.Adam(model.parameters(), lr=0.01), k=3)
    train(model, opt, data, step=torch.compile(opt.step))
    # Inductor's Adam rounds differently from eager Adam; the syncs themselves are the op's.
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(opt.lookahead_state[p]["slow_param"], p.new_zeros(p.shape))
    assert opt.lookahead_state[next(model.parameters())]["step"].item() == 7 % 3


# -- the divergence guard --------------------------------------------------------------------------


def train_with_blow_up(model, step, data, blow_up_at, value=float("nan")):
    """Trains on data, setting one weight to value right after step blow_up_at."""
    for i, (x, y) in enumerate(data):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        step()
        if i == blow_up_at:
            with torch.no_grad():
                model[2].weight[1, 3] = value


@pytest.mark.parametrize("mode", ["host", "capturable", "compiled"])
@pytest.mark.parametrize("inner_state", ["keep", "pullback"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_restore_matches_reference(mode, inner_state, value):
    data = batches(11)
    settings = {"k": 3, "alpha": 0.5, "inner_state": inner_state, "nonfinite": "restore"}
    ref_model = make_model()
    # Plain SGD with "keep": a momentum buffer would carry the blow-up past the restore (the guard
    # restores the weights, and with "pullback" the first moment; not the rest of the inner state).
    make_inner = sgd_momentum if inner_state == "pullback" else sgd
    ref = ReferenceLookahead(make_inner(ref_model.parameters()), **settings)
    if mode == "compiled":  # a compiled SGD may round differently from an eager one
        ref.inner.step = torch.compile(ref.inner.step, backend="aot_eager")
    train_with_blow_up(ref_model, ref.step, data, blow_up_at=3, value=value)
    assert ref.restores == 1

    model = make_model()
    opt = Lookahead(make_inner(model.parameters()), capturable=mode == "capturable", **settings)
    step = torch.compile(opt.step, backend="aot_eager") if mode == "compiled" else opt.step
    train_with_blow_up(model, step, data, blow_up_at=3, value=value)
    assert opt.nonfinite_restores == 1
    assert_same_weights(model, ref_model)
    for p in model.parameters():
        assert p.isfinite().all() and opt.lookahead_state[p]["slow_param"].isfinite().all()


def test_restore_leaves_the_slow_weights_untouched():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05), k=3, nonfinite="restore")
    data = batches(6)
    train(model, opt, data[:3])  # a sync: the slow weights are now the parameters
    slow = [opt.lookahead_state[p]["slow_param"].clone() for p in model.parameters()]
    train_with_blow_up(model, opt.step, data[3:], blow_up_at=0)
    assert opt.nonfinite_restores == 1
    for p, s in zip(model.parameters(), slow):
        assert torch.equal(opt.lookahead_state[p]["slow_param"], s)
        assert torch.equal(p, s)


def test_propagate_lets_a_blow_up_reach_the_slow_weights():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05), k=3)
    train_with_blow_up(model, opt.step, batches(6), blow_up_at=3)
    assert opt.nonfinite_restores == 0
    assert opt.lookahead_state[model[2].weight]["slow_param"].isnan().any()


def test_restore_is_per_group():
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt = Lookahead(torch.optim.SGD(groups, lr=0.05), k=3, nonfinite="restore")
    data = batches(3)
    train(model, opt, data[:2])
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    first_slow = [opt.lookahead_state[p]["slow_param"].clone() for p in model[0].parameters()]
    second_fast = [p.detach().clone() for p in model[2].parameters()]
    second_slow = [opt.lookahead_state[p]["slow_param"].clone() for p in model[2].parameters()]
    opt.sync()
    assert opt.nonfinite_restores == 1
    for p, s in zip(model[0].parameters(), first_slow):
        assert torch.equal(p, s) and torch.equal(opt.lookahead_state[p]["slow_param"], s)
    for p, f, s in zip(model[2].parameters(), second_fast, second_slow):
        assert torch.equal(p, torch.lerp(s, f, 0.5))


def test_nonfinite_setting_is_validated_and_per_group():
    model = make_model()
    with pytest.raises(ValueError, match=r"Invalid nonfinite in Lookahead\(\): 'skip'"):
        Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="skip")
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    assert opt.nonfinite == "propagate"
    opt.nonfinite = "restore"
    assert all(group["lookahead_nonfinite"] == "restore" for group in opt.param_groups)
    with pytest.raises(ValueError, match=r"Invalid nonfinite in Lookahead\.nonfinite"):
        opt.nonfinite = "ignore"


def test_restore_count_survives_a_checkpoint():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05), k=2, nonfinite="restore")
    train_with_blow_up(model, opt.step, batches(4), blow_up_at=0)
    assert opt.nonfinite_restores == 1
    other = Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.05))
    other.load_state_dict(opt.state_dict())
    assert other.nonfinite_restores == 1 and other.nonfinite == "restore"


# -- evaluation on slow weights --------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"capturable": True}, {"nonfinite": "restore"}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slow_weights_under_the_large_model_settings(settings, dtype):
    model = make_model(dtype)
    slow_dtype = torch.float32 if dtype == torch.bfloat16 else None
    opt = Lookahead(
        torch.optim.SGD(model.parameters(), lr=0.05), k=3, slow_dtype=slow_dtype, **settings
    )
    train(model, opt, batches(4, dtype))  # one step after a sync: fast != slow
    fast = [p.detach().clone() for p in model.parameters()]
    slow = [opt.lookahead_state[p]["slow_param"].to(dtype, copy=True) for p in model.parameters()]
    addresses = [p.data_ptr() for p in model.parameters()]
    with opt.slow_weights():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), slow))
        assert [p.data_ptr() for p in model.parameters()] == addresses
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))
    train(model, opt, batches(2, dtype))  # and training goes on from the fast weights
