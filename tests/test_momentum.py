"""The outer-momentum sync (SNOO; DiLoCo's outer step): the op against a per-tensor torch
reference, and Lookahead(momentum=...) against a per-parameter reference optimizer."""

import io

import pytest
import torch
from conftest import DTYPE_PAIRS, steps_on_sin_gradients
from test_gated_ops import DEVICES
from test_lookahead import (
    INNER,
    ReferenceLookahead,
    assert_same_weights,
    batches,
    make_model,
    train,
)

from lookahead_cuda import Lookahead
from lookahead_cuda.bench.impls import foreach_momentum_update_
from lookahead_cuda.ops import lookahead_momentum_update_, lookahead_momentum_update_if_

# Results that depend on the CPU kernels torch picks: run again under every capability the CPU
# has (test_cpu_capabilities.py).
pytestmark = pytest.mark.cpu_capability

op = torch.ops.lookahead_cuda.lookahead_momentum_update_


def reference_(slow, fast, momentum, lr, mu, nesterov):
    """The update as the papers write it, one tensor at a time, in float64."""
    for s, f, b in zip(slow, fast, momentum):
        d = s.double() - f.double()
        buffer = mu * b.double() + d
        step = d + mu * buffer if nesterov else buffer
        result = s.double() - lr * step
        b.copy_(buffer)
        s.copy_(result)
        f.copy_(s)


def random_triples(shapes, slow_dtype, fast_dtype):
    slow = [torch.randn(s, dtype=torch.float64).to(slow_dtype) for s in shapes]
    fast = [torch.randn(s, dtype=torch.float64).to(fast_dtype) for s in shapes]
    momentum = [torch.randn(s, dtype=torch.float64).to(slow_dtype) for s in shapes]
    return slow, fast, momentum


def clones(*lists):
    return [[t.clone() for t in ts] for ts in lists]


def assert_close_lists(actual, expected, dtype):
    # One rounding per multiply-add in the kernel, the float64 reference rounded once at the end:
    # a few units in the last place of the slow dtype.
    eps = torch.finfo(dtype).eps
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e.double(), rtol=8 * eps, atol=8 * eps)


SHAPES = [(70001,), (3,), (33, 39), (0,), (1,)]


@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("entry", ["wrapper", "torch.ops"])
def test_matches_the_papers_update(slow_dtype, fast_dtype, nesterov, entry):
    slow, fast, momentum = random_triples(SHAPES, slow_dtype, fast_dtype)
    slow[2] = slow[2].t().contiguous().t()  # another element order: ATen's path
    want = clones(slow, fast, momentum)
    reference_(*want, 0.7, 0.9, nesterov)
    call = lookahead_momentum_update_ if entry == "wrapper" else op
    versions = [t._version for t in slow + fast + momentum]
    call(slow, fast, momentum, 0.7, 0.9, nesterov)
    assert all(t._version > v for t, v in zip(slow + fast + momentum, versions))
    assert_close_lists(slow + momentum, want[0] + want[2], slow_dtype)
    for f, s in zip(fast, slow):
        assert torch.equal(f, s.to(fast_dtype))  # fast <- slow, rounded as copy_ rounds


def test_foreach_baseline_is_the_same_update():
    slow, fast, momentum = random_triples(SHAPES, torch.float32, torch.bfloat16)
    want = clones(slow, fast, momentum)
    reference_(*want, 0.5, 0.8, True)
    foreach_momentum_update_(slow, fast, momentum, 0.5, 0.8, True)
    assert_close_lists(slow + momentum, want[0] + want[2], torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_many_tensors_and_thread_counts(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sizes = torch.randint(0, 70000, (40,)).tolist()
        slow, fast, momentum = random_triples([(n,) for n in sizes], torch.float32, torch.float32)
        want = clones(slow, fast, momentum)
        reference_(*want, 0.3, 0.5, True)
        lookahead_momentum_update_(slow, fast, momentum, 0.3, 0.5)
    finally:
        torch.set_num_threads(previous)
    assert_close_lists(slow + fast + momentum, want[0] + want[1] + want[2], torch.float32)


@pytest.mark.parametrize("due", [False, True])
@pytest.mark.parametrize("restore", [None, False, True])
@pytest.mark.parametrize(
    ("slow_dtype", "fast_dtype"), [(torch.float32, torch.bfloat16), (torch.float64, torch.float64)]
)
@pytest.mark.parametrize("device", DEVICES)
def test_gated_form(due, restore, slow_dtype, fast_dtype, device):
    slow, fast, momentum = (
        [t.to(device) for t in ts] for ts in random_triples(SHAPES, slow_dtype, fast_dtype)
    )
    # Another element order (ATen's path) for the slow weights and the momentum of one tensor.
    slow[2], momentum[2] = (t.t().contiguous().t() for t in (slow[2], momentum[2]))
    before = clones(slow, fast, momentum)
    restore_flag = None if restore is None else torch.tensor(restore, device=device)
    lookahead_momentum_update_if_(
        slow, fast, momentum, 0.7, 0.9, True, torch.tensor(due, device=device), restore_flag
    )
    if not due or restore:
        # Not due: nothing written. Restoring: fast <- slow, slow and momentum as they were.
        want_fast = before[1] if not due else [s.to(fast_dtype) for s in before[0]]
        for got, expected in zip(slow + momentum + fast, before[0] + before[2] + want_fast):
            assert torch.equal(got, expected)
        return
    want = clones(*before)
    reference_(*want, 0.7, 0.9, True)
    assert_close_lists(slow + momentum, want[0] + want[2], slow_dtype)
    assert all(torch.equal(f, s.to(fast_dtype)) for f, s in zip(fast, slow))


def test_nan_reaches_the_slow_weights_and_the_momentum():
    slow, fast, momentum = random_triples([(5,)], torch.float32, torch.float32)
    fast[0][2] = float("nan")
    lookahead_momentum_update_(slow, fast, momentum, 0.5, 0.9)
    assert slow[0][2].isnan() and momentum[0][2].isnan() and fast[0][2].isnan()
    assert slow[0][[0, 1, 3, 4]].isfinite().all()


BAD = {
    "length": (lambda s, f, m: (s, f, m[:1], 0.5, 0.9), ValueError, "but momentum has 1;"),
    "dtype": (
        lambda s, f, m: (s, f, [m[0].double(), m[1]], 0.5, 0.9),
        TypeError,
        r"outer momentum.*|momentum\[0\] has dtype torch.float64",
    ),
    "shape": (
        lambda s, f, m: (s, f, [torch.zeros(3), m[1]], 0.5, 0.9),
        ValueError,
        r"momentum\[0\] has shape \[3\]",
    ),
    "shares memory with slow": (
        lambda s, f, m: (s, f, [s[0], m[1]], 0.5, 0.9),
        ValueError,
        "share memory",
    ),
    "lr above 1": (lambda s, f, m: (s, f, m, 1.5, 0.9), ValueError, r"lr must be in \(0, 1\]"),
    "mu of 1": (lambda s, f, m: (s, f, m, 0.5, 1.0), ValueError, r"mu must be in \[0, 1\)"),
    "negative mu": (lambda s, f, m: (s, f, m, 0.5, -0.1), ValueError, r"mu must be in \[0, 1\)"),
    "nan mu": (lambda s, f, m: (s, f, m, 0.5, float("nan")), ValueError, "mu must be in"),
    "string mu": (lambda s, f, m: (s, f, m, 0.5, "0.9"), TypeError, "mu must be a float"),
    "bool mu": (lambda s, f, m: (s, f, m, 0.5, True), TypeError, "mu must be a float"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_named_and_changes_nothing(case):
    edit, error, match = BAD[case]
    slow, fast, momentum = random_triples([(4,), (6,)], torch.float32, torch.float32)
    args = edit(slow, fast, momentum)
    tensors = [t for ts in args[:3] for t in ts]
    before = [t.clone() for t in tensors]
    with pytest.raises(error, match=match):
        lookahead_momentum_update_(*args)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


def test_opcheck_and_compile():
    slow, fast, momentum = random_triples([(3, 5), (17,)], torch.float32, torch.bfloat16)
    torch.library.opcheck(op, (slow, fast, momentum, 0.5, 0.9, True))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def sync(s, f, m):
        op(s, f, m, 0.5, 0.9, False)

    want = clones(slow, fast, momentum)
    reference_(*want, 0.5, 0.9, False)
    sync(slow, fast, momentum)
    assert_close_lists(slow + momentum, want[0] + want[2], torch.float32)


# -- Lookahead(momentum=...) ------------------------------------------------------------------


class ReferenceSNOO(ReferenceLookahead):
    """SNOO as the paper states it, one parameter at a time in plain torch (the slow weights'
    dtype; the momentum buffer in it too)."""

    def __init__(self, inner, momentum=0.9, nesterov=True, **settings):
        super().__init__(inner, **settings)
        self.mu, self.nesterov = momentum, nesterov
        self.buffers = None

    def update_slow(self):
        if self.buffers is None:
            self.buffers = [torch.zeros_like(s) for s in self.slow]
        for p, s, b in zip(self.params(), self.slow, self.buffers):
            d = s - p.to(s.dtype)
            b.mul_(self.mu).add_(d)
            s.sub_(d + self.mu * b if self.nesterov else b, alpha=self.alpha)
            p.copy_(s)


def assert_close_weights(a, b, rtol=2e-5, atol=2e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw", "radam"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("inner_state", ["keep", "reset", "pullback"])
def test_matches_a_per_parameter_reference(name, nesterov, inner_state):
    settings = {"k": 3, "alpha": 0.7, "inner_state": inner_state}
    model, ref_model = make_model(), make_model()
    opt = Lookahead(INNER[name](model.parameters()), momentum=0.9, nesterov=nesterov, **settings)
    ref = ReferenceSNOO(INNER[name](ref_model.parameters()), 0.9, nesterov, **settings)
    data = batches(14)
    train(model, opt, data)
    train(ref_model, ref.inner, data, step=ref.step)
    assert_close_weights(model, ref_model)
    for p, b in zip(model.parameters(), ref.buffers):
        torch.testing.assert_close(
            opt.lookahead_state[p]["outer_momentum"], b, rtol=2e-5, atol=2e-6
        )


def test_momentum_zero_is_lookahead_bitwise():
    # Against the paper's Lookahead in plain torch (slow.lerp_(fast), fast.copy_(slow)), not
    # against this optimizer's own default.
    reference_model, zero_model = make_model(), make_model()
    reference = ReferenceLookahead(torch.optim.AdamW(reference_model.parameters()), k=3, alpha=0.6)
    zero = Lookahead(torch.optim.AdamW(zero_model.parameters()), k=3, alpha=0.6, momentum=0.0)
    data = batches(10)
    train(reference_model, reference.inner, data, step=reference.step)
    train(zero_model, zero, data)
    assert_same_weights(zero_model, reference_model)
    for p, slow in zip(zero_model.parameters(), reference.slow):
        assert torch.equal(zero.lookahead_state[p]["slow_param"], slow)
    assert all("outer_momentum" not in entry for entry in zero.lookahead_state.values())


def test_a_momentum_schedule_through_zero_keeps_the_buffer_until_momentum_returns():
    # Momentum 0 is Lookahead's sync, which leaves the outer momentum buffer as it is (torch's SGD
    # keeps its momentum_buffer at momentum 0 likewise); at momentum > 0 again the buffer takes
    # up where it stopped: b <- mu * b + d.
    params = [torch.nn.Parameter(torch.randn(6, dtype=torch.float64))]
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=1, alpha=0.5, momentum=0.9)
    steps_on_sin_gradients(opt, 2)
    state = opt.lookahead_state[params[0]]
    frozen = state["outer_momentum"].clone()
    opt.momentum = 0.0
    slow = state["slow_param"].clone()
    steps_on_sin_gradients(opt, 1)
    assert torch.equal(state["outer_momentum"], frozen)
    fast = slow - 0.1 * torch.sin(3 * slow)  # the inner SGD step from the synced weights
    assert torch.equal(state["slow_param"], torch.lerp(slow, fast, 0.5))
    opt.momentum = 0.9
    slow = state["slow_param"].clone()
    steps_on_sin_gradients(opt, 1)
    d = slow - (slow - 0.1 * torch.sin(3 * slow))
    buffer = 0.9 * frozen + d
    torch.testing.assert_close(state["outer_momentum"], buffer, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(
        state["slow_param"], slow - 0.5 * (d + 0.9 * buffer), rtol=1e-14, atol=1e-15
    )


@pytest.mark.parametrize(("fast_dtype", "slow_dtype"), [(torch.bfloat16, torch.float32)])
def test_fp32_slow_weights_and_momentum_for_bf16_parameters(fast_dtype, slow_dtype):
    model = make_model(fast_dtype)
    opt = Lookahead(
        torch.optim.AdamW(model.parameters(), lr=0.01), k=2, momentum=0.9, slow_dtype=slow_dtype
    )
    train(model, opt, batches(6, fast_dtype))
    for p in model.parameters():
        ours = opt.lookahead_state[p]
        assert ours["outer_momentum"].dtype == slow_dtype and ours["slow_param"].dtype == slow_dtype
        assert torch.equal(p, ours["slow_param"].to(fast_dtype))  # just synced


@pytest.mark.parametrize("split", [2, 5, 7])
def test_exact_resume_with_weights_only_loads(split):
    def build(model):
        return Lookahead(
            torch.optim.AdamW(model.parameters(), lr=0.01), k=3, alpha=0.7, momentum=0.9
        )

    data = batches(12)
    straight_model = make_model()
    straight = build(straight_model)
    train(straight_model, straight, data)

    model = make_model()
    opt = build(model)
    train(model, opt, data[:split])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_model()
    resumed_model.load_state_dict(saved["model"])
    resumed = build(resumed_model)
    resumed.load_state_dict(saved["optimizer"])
    train(resumed_model, resumed, data[split:])
    assert_same_weights(resumed_model, straight_model)
    for p, q in zip(resumed_model.parameters(), straight_model.parameters()):
        ours, theirs = resumed.lookahead_state[p], straight.lookahead_state[q]
        if split >= 3:
            assert torch.equal(ours["outer_momentum"], theirs["outer_momentum"])


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"momentum": 1.0}, ValueError, r"Invalid momentum in Lookahead\(\): 1.0; expected"),
        ({"momentum": -0.1}, ValueError, "Invalid momentum"),
        ({"momentum": float("nan")}, ValueError, "Invalid momentum"),
        ({"momentum": "0.9"}, ValueError, "Invalid momentum"),
        ({"momentum": True}, ValueError, "Invalid momentum"),
        ({"nesterov": 1}, ValueError, "Invalid nesterov"),
        ({"momentum": 0.9, "alpha": 1.2}, ValueError, "outer learning rate.*DiLoCo uses 0.7"),
    ],
)
def test_bad_settings_are_refused(settings, error, match):
    with pytest.raises(error, match=match):
        Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.1), **settings)


def test_settings_per_group_set_later_and_for_added_groups():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model[0].parameters(), lr=0.1), k=2, momentum=0.5)
    assert opt.param_groups[0]["lookahead_momentum"] == 0.5 and opt.nesterov is True
    opt.add_param_group({"params": model[2].parameters(), "lookahead_nesterov": False})
    assert opt.param_groups[1]["lookahead_momentum"] == 0.5
    with pytest.raises(ValueError, match="different lookahead_nesterov"):
        _ = opt.nesterov
    before = opt.momentum
    with pytest.raises(ValueError, match=r"Invalid momentum in Lookahead\.momentum"):
        opt.momentum = 1.5
    assert opt.momentum == before
    opt.momentum = 0.0  # off: the next syncs are Lookahead's
    train(model, opt, batches(2))
    opt.momentum = 0.9  # on again: buffers appear at the next sync
    train(model, opt, batches(2))
    assert all("outer_momentum" in opt.lookahead_state[p] for p in model.parameters())


@pytest.mark.parametrize("mode", ["capturable", "compiled", "slow_device"])
def test_decided_on_the_device_compiled_and_offloaded_give_the_host_result(mode):
    def build(model, **extra):
        return Lookahead(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            k=3,
            alpha=0.7,
            momentum=0.9,
            **extra,
        )

    data = batches(10)
    host_model = make_model()
    host = build(host_model)
    if mode == "compiled":  # a compiled SGD may round differently from an eager one
        host.optimizer.step = torch.compile(host.optimizer.step, backend="aot_eager")
    train(host_model, host, data)
    model = make_model()
    extra = {"capturable": True} if mode == "capturable" else {}
    extra = {"slow_device": "cpu"} if mode == "slow_device" else extra
    opt = build(model, **extra)
    step = torch.compile(opt.step, backend="aot_eager") if mode == "compiled" else opt.step
    train(model, opt, data, step=step)
    assert_same_weights(model, host_model)


def test_the_divergence_guard_leaves_slow_weights_and_momentum_untouched():
    model = make_model()
    opt = Lookahead(
        torch.optim.SGD(model.parameters(), lr=0.05), k=2, momentum=0.9, nonfinite="restore"
    )
    train(model, opt, batches(4))
    kept = {
        p: {k: v.clone() for k, v in opt.lookahead_state[p].items()} for p in model.parameters()
    }
    train(model, opt, batches(1))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    train(model, opt, batches(1))  # the sync restores
    assert opt.nonfinite_restores == 1
    for p in model.parameters():
        ours = opt.lookahead_state[p]
        assert torch.equal(ours["slow_param"], kept[p]["slow_param"])
        assert torch.equal(ours["outer_momentum"], kept[p]["outer_momentum"])
        assert torch.equal(p, ours["slow_param"])


def test_the_momentum_follows_a_model_that_changes_dtype():
    # Converted with the slow weights, as a checkpoint loaded into the converted model converts
    # both: the two runs agree bitwise.
    def run(reload):
        torch.manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 7)]
        opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2, momentum=0.9)
        steps_on_sin_gradients(opt, 5)
        if reload:
            saved = opt.state_dict()
            params = [torch.nn.Parameter(p.detach().double()) for p in params]
            opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2, momentum=0.9)
            opt.load_state_dict(saved)
        else:
            for p in params:
                p.data = p.data.double()
        steps_on_sin_gradients(opt, 5)
        return params, opt

    (moved, opt), (reloaded, _) = run(reload=False), run(reload=True)
    for p, q in zip(moved, reloaded):
        assert p.dtype == torch.float64 and torch.equal(p, q)
        assert opt.lookahead_state[p]["outer_momentum"].dtype == torch.float64
