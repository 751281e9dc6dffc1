"""Streaming DiLoCo's rules in one process (a gloo group of one worker): what Lookahead refuses,
and what a collective that fails leaves behind. Workers that really stream are in test_diloco.py."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from conftest import steps_on_sin_gradients

from lookahead_cuda import Lookahead

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)


@pytest.fixture
def one_worker():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def make(group, params=None, **settings):
    torch.manual_seed(0)
    params = params or [torch.nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in (6, 4, 5)]
    settings = {"k": 4, "momentum": 0.9, "alpha": 0.7, **settings}
    return params, Lookahead(torch.optim.SGD(params, lr=0.1), process_group=group, **settings)


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"fragments": 3}, ValueError, r"with 3 fragments it must be a multiple of 3"),
        ({"fragments": 2, "sync_delay": 2}, ValueError, r"sync_delay < k / fragments = 2"),
        ({"sync_delay": -1}, ValueError, "Invalid sync_delay: -1"),
        ({"fragments": 0}, ValueError, "Invalid fragments: 0"),
        ({"fragments": "2"}, TypeError, "Invalid fragments: '2'"),
        ({"fragment_mixing": 1.5}, ValueError, "Invalid fragment_mixing: 1.5"),
    ],
)
def test_refuses_fragments_and_delays_that_cannot_work(one_worker, settings, error, match):
    with pytest.raises(error, match=match):
        make(one_worker, **settings)


def test_refuses_fragments_that_overlap_or_miss_a_parameter(one_worker):
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    with pytest.raises(ValueError, match=r"fragments\[1\]\[0\] is also in fragments\[0\]"):
        make(one_worker, params, fragments=[params[:2], params[:1]])
    with pytest.raises(ValueError, match="parameter 2 of param group 0 is in no fragment"):
        make(one_worker, params, fragments=[params[:1], params[1:2]])


def test_streaming_needs_a_process_group():
    params = [torch.nn.Parameter(torch.randn(3))]
    for settings in ({"fragments": 2}, {"sync_delay": 1}):
        with pytest.raises(ValueError, match="need a process_group"):
            Lookahead(torch.optim.SGD(params, lr=0.1), k=4, **settings)


def test_a_k_that_a_schedule_sets_is_checked_against_the_fragments(one_worker):
    _, opt = make(one_worker, fragments=2)
    with pytest.raises(ValueError, match="must be a multiple of 2"):
        opt.k = 5
    assert opt.k == 4


class Failing:
    """torch.distributed.all_reduce that fails on float tensors (the averages), as a collective
    that times out does, at once or when waited for; integer ones (the workers' agreement) go
    through."""

    def __init__(self, real, at_wait: bool, passed: int = 0):
        self.real, self.at_wait, self.failures = real, at_wait, 0
        self.passed = passed  # the averages that go through before the first failure

    def __call__(self, tensor, *args, async_op=False, **kwargs):
        if not tensor.is_floating_point() or self.passed:
            self.passed -= tensor.is_floating_point()
            return self.real(tensor, *args, async_op=async_op, **kwargs)
        self.failures += 1
        if not self.at_wait:
            raise RuntimeError("collective timed out")
        work = self.real(tensor, *args, async_op=True, **kwargs)

        class FailingWork:
            def wait(self):
                work.wait()
                raise RuntimeError("collective timed out")

        return FailingWork() if async_op else FailingWork().wait()


def snapshot(opt, params):
    state = [opt.lookahead_state[p] for p in params]
    return [s[key].clone() for s in state for key in ("slow_param", "outer_momentum")] + [
        state[0]["step"].clone()
    ]


@pytest.mark.parametrize("delay", [0, 1])
def test_a_failed_collective_changes_no_slow_weights_momentum_or_count_and_is_retried(
    one_worker, monkeypatch, delay
):
    # k = 4 in 2 fragments: fragment 0 syncs at count 2 (its average starts at 1 with a delay).
    params, opt = make(one_worker, fragments=2, sync_delay=delay)
    steps_on_sin_gradients(opt, 4 + 1 - delay)  # one cycle, then up to the step before the start
    failing = Failing(dist.all_reduce, at_wait=delay > 0)
    monkeypatch.setattr(dist, "all_reduce", failing)
    if delay:
        steps_on_sin_gradients(opt, 1)  # the average starts; it fails only when waited for
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="collective timed out"):
        steps_on_sin_gradients(opt, 1)  # fragment 0's sync
    assert failing.failures == 1
    for a, b in zip(snapshot(opt, params), before):
        assert torch.equal(a, b)
    monkeypatch.undo()
    steps_on_sin_gradients(opt, 1)  # counted again, and its sync tried again, at once
    after = snapshot(opt, params)
    assert int(after[-1]) == 2
    assert not torch.equal(after[0], before[0])  # fragment 0 synced this time
    assert torch.equal(after[4], before[4])  # fragment 1 did not


def test_sync_now_syncs_every_fragment_and_restarts_the_count(one_worker):
    params, opt = make(one_worker, fragments=2, sync_delay=1)
    steps_on_sin_gradients(opt, 1)  # fragment 0's average in flight
    opt.sync()
    for p in params:
        assert torch.equal(p, opt.lookahead_state[p]["slow_param"])
    assert int(opt.lookahead_state[params[0]]["step"]) == 0
    steps_on_sin_gradients(opt, 4)  # and the schedule starts over


@pytest.mark.parametrize("delay", [0, 1])
def test_a_collective_that_fails_for_one_param_group_changes_no_group(
    one_worker, monkeypatch, delay
):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in (6, 4)]
    inner = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.05}], lr=0.1)
    opt = Lookahead(inner, k=4, momentum=0.9, alpha=0.7, process_group=one_worker, sync_delay=delay)
    steps_on_sin_gradients(opt, 4 + 3 - delay)  # one cycle, then up to the step before the start
    failing = Failing(dist.all_reduce, at_wait=delay > 0, passed=1)  # group 0's goes through
    monkeypatch.setattr(dist, "all_reduce", failing)
    if delay:
        steps_on_sin_gradients(opt, 1)  # the averages start; group 1's fails when waited for
    keys = ("slow_param", "outer_momentum", "step")
    before = [opt.lookahead_state[p][key].clone() for p in params for key in keys]
    with pytest.raises(RuntimeError, match="collective timed out"):
        steps_on_sin_gradients(opt, 1)
    assert failing.failures == 1
    after = [opt.lookahead_state[p][key] for p in params for key in keys]
    for a, b in zip(after, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("delay", [0, 1])
def test_a_fragment_sync_that_would_be_rejected_raises_before_the_inner_step(one_worker, delay):
    # Fragment 0 (parameter 0) syncs at count 2; with a delay its average starts at count 1.
    params, opt = make(one_worker, fragments=2, sync_delay=delay)
    steps_on_sin_gradients(opt, 4 + 1 - delay)
    original = params[0].data
    params[0].data = torch.randn(7, dtype=torch.float64)  # its slow copy no longer fits
    before = [p.detach().clone() for p in params] + snapshot(opt, params)
    with pytest.raises(ValueError, match="the slow copy of parameter 0 of param group 0 has shape"):
        steps_on_sin_gradients(opt, 1)
    for a, b in zip([*params, *snapshot(opt, params)], before):
        assert torch.equal(a, b)
    params[0].data = original
    steps_on_sin_gradients(opt, 4)  # and the optimizer works on


def float32_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n)) for n in (6, 4, 5)]


@pytest.mark.parametrize("pseudo_gradient_dtype", [None, torch.bfloat16, torch.int8])
def test_a_state_dict_taken_in_evaluation_mode_with_an_average_in_flight(
    one_worker, pseudo_gradient_dtype
):
    settings = {"sync_delay": 1, "pseudo_gradient_dtype": pseudo_gradient_dtype}
    straight, opt = make(one_worker, float32_params(), **settings)
    steps_on_sin_gradients(opt, 8)
    params, opt = make(one_worker, float32_params(), **settings)
    steps_on_sin_gradients(opt, 3)  # the average of the sync at count 4 is in flight
    opt.eval()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    opt.train()
    steps_on_sin_gradients(opt, 5)
    assert all(torch.equal(a, b) for a, b in zip(params, straight))
    resumed, opt = make(one_worker, float32_params(), **settings)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    steps_on_sin_gradients(opt, 5)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))


@pytest.mark.parametrize("blown_up", [float("nan"), float("inf")])
def test_fragment_mixing_zero_puts_the_global_weights_back_whatever_the_fast_ones_hold(
    one_worker, blown_up
):
    params, opt = make(one_worker, fragments=2, sync_delay=1, fragment_mixing=0.0)
    steps_on_sin_gradients(opt, 4 + 1)  # fragment 0's average starts, from finite weights
    with torch.no_grad():
        params[0][0] = blown_up  # during the delay
    steps_on_sin_gradients(opt, 1)  # fragment 0's sync
    assert torch.equal(params[0], opt.lookahead_state[params[0]]["slow_param"])
    assert bool(params[0].isfinite().all())
