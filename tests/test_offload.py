"""Slow weights in host memory (slow_device="cpu"): the chunked transfer-and-update pipeline on the
CPU, where it runs its copies synchronously; the CUDA run with overlapped transfers is in
test_cuda.py."""

import pytest
import torch
from conftest import DTYPE_PAIRS, reference_update_, steps_on_sin_gradients
from test_lookahead import assert_same_weights, batches, make_model, train

from lookahead_cuda import Lookahead, functional
from lookahead_cuda.offload import StagingBuffers, runs_by_bytes

SIZES = [5000, 3, 70001, 1, 0, 4096, 12345]


def random_pairs(slow_dtype, fast_dtype):
    slow = [torch.randn(n, dtype=torch.float64).to(slow_dtype) for n in SIZES]
    fast = [torch.randn(n, dtype=torch.float64).to(fast_dtype) for n in SIZES]
    return slow, fast


def test_chunks_cover_every_tensor_once_in_order():
    sizes = [n * 4 for n in SIZES]
    chunks = list(runs_by_bytes(sizes, limit=20000 * 4))
    assert [i for chunk in chunks for i in chunk] == list(range(len(SIZES)))
    for chunk in chunks:
        assert len(chunk) == 1 or sum(sizes[i] for i in chunk) <= 20000 * 4
    assert len(chunks) > 2


def offloaded(slow, fast, alpha, chunk_bytes, **flags):
    """The sync with its slow weights in host memory, as functional.sync_buckets runs it."""
    buckets = functional.bucket_pairs(zip(slow, fast))
    functional.sync_buckets(buckets, alpha, offload=StagingBuffers(chunk_bytes), **flags)


@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("chunk_bytes", [1, 40000, 1 << 30])
def test_offloaded_update_is_the_update(slow_dtype, fast_dtype, chunk_bytes):
    slow, fast = random_pairs(slow_dtype, fast_dtype)
    slow_ref, fast_ref = [s.clone() for s in slow], [f.clone() for f in fast]
    reference_update_(slow_ref, fast_ref, 0.3)
    offloaded(slow, fast, 0.3, chunk_bytes)
    for got, want in zip(slow + fast, slow_ref + fast_ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("due", [False, True])
@pytest.mark.parametrize("restore", [False, True])
def test_offloaded_update_with_flags(due, restore):
    slow, fast = random_pairs(torch.float32, torch.bfloat16)
    slow_before, fast_before = [s.clone() for s in slow], [f.clone() for f in fast]
    offloaded(slow, fast, 0.5, 40000, due=torch.tensor(due), restore=torch.tensor(restore))
    if not due:
        want_slow, want_fast = slow_before, fast_before
    elif restore:
        want_slow, want_fast = slow_before, [s.to(torch.bfloat16) for s in slow_before]
    else:
        want_slow, want_fast = [s.clone() for s in slow_before], [f.clone() for f in fast_before]
        reference_update_(want_slow, want_fast, 0.5)
    for got, want in zip(slow + fast, want_slow + want_fast):
        assert torch.equal(got, want)


def test_lookahead_with_slow_weights_on_the_cpu_matches_the_default():
    data = batches(9)
    default_model, offloaded_model = make_model(), make_model()
    default = Lookahead(torch.optim.Adam(default_model.parameters(), lr=0.01), k=3)
    offloaded = Lookahead(
        torch.optim.Adam(offloaded_model.parameters(), lr=0.01),
        k=3,
        inner_state="pullback",
        slow_device="cpu",
    )
    default.inner_state = "pullback"
    train(default_model, default, data)
    train(offloaded_model, offloaded, data)
    assert_same_weights(offloaded_model, default_model)
    for p in offloaded_model.parameters():
        assert offloaded.lookahead_state[p]["slow_param"].device.type == "cpu"


def test_slow_device_is_validated():
    params = list(make_model().parameters())
    with pytest.raises(ValueError, match="Invalid slow_device: 'meta'"):
        Lookahead(torch.optim.SGD(params, lr=0.1), slow_device="meta")
    with pytest.raises(ValueError, match=r"slow_device='cpu'.*capturable"):
        Lookahead(torch.optim.SGD(params, lr=0.1), slow_device="cpu", capturable=True)


def test_the_host_memory_path_is_taken_by_setting_alone(monkeypatch):
    # Slow and fast weights on different devices are a model that moved, not a request to keep
    # slow weights in host memory: the op rejects them (and the optimizer follows the model).
    calls = []
    monkeypatch.setattr(functional, "offloaded_update_", lambda *args: calls.append(args))
    buckets = functional.bucket_pairs([(torch.randn(4), torch.empty(4, device="meta"))])
    with pytest.raises(ValueError, match="all tensors of a call must be on one device"):
        functional.sync_buckets(buckets, 0.5)
    assert not calls
    functional.sync_buckets(buckets, 0.5, offload=StagingBuffers())
    assert len(calls) == 1


def test_a_partly_converted_model_is_followed_as_without_offload():
    # One parameter turned float64 mid-run: its slow copy follows to float64 in host memory, as it
    # does on the parameter's device by default, instead of rounding it to float32 at each sync.
    def run(**settings):
        torch.manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 7)]
        opt = Lookahead(torch.optim.SGD(params, lr=0.1), k=2, **settings)
        steps_on_sin_gradients(opt, 3)
        params[1].data = params[1].data.double()
        steps_on_sin_gradients(opt, 3)
        return params, opt

    (offloaded, opt), (default, _) = run(slow_device="cpu"), run()
    for p, q in zip(offloaded, default):
        assert torch.equal(p, q)
    assert opt.lookahead_state[offloaded[1]]["slow_param"].dtype == torch.float64
