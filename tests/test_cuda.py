"""The CUDA kernel against torch's own CUDA lerp_/copy_; skipped without a GPU."""

import pytest
import torch
from conftest import DTYPE_PAIRS, reference_update_
from test_lookahead import INNER, ReferenceLookahead, batches, make_model, train

import lookahead_cuda
from lookahead_cuda import Lookahead

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and lookahead_cuda.build_info()["cuda"]),
    reason="needs a GPU and a build with the CUDA kernels",
)
op = torch.ops.lookahead_cuda.lookahead_update_


def random_lists(sizes, slow_dtype, fast_dtype, device="cuda"):
    slow = [torch.randn(n, device=device, dtype=torch.float32).to(slow_dtype) for n in sizes]
    fast = [torch.randn(n, device=device, dtype=torch.float32).to(fast_dtype) for n in sizes]
    return slow, fast


def check(slow, fast, alpha):
    slow_ref = [s.clone() for s in slow]
    fast_ref = [f.clone() for f in fast]
    reference_update_(slow_ref, fast_ref, alpha)
    op(slow, fast, alpha)
    torch.cuda.synchronize()
    for got, want in zip(slow + fast, slow_ref + fast_ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("alpha", [0.5, 0.3, 1.0])
def test_every_dtype_pair_and_odd_sizes(slow_dtype, fast_dtype, alpha):
    slow, fast = random_lists([1, 3, 4097, 65537, 0, 200003], slow_dtype, fast_dtype)
    check(slow, fast, alpha)


@pytest.mark.parametrize("count", [1, 2, 1166, 1167, 1168, 3000, 10000])
def test_any_number_of_tensors(count):
    # Past 1167 pairs the list is split over several launches.
    sizes = torch.randint(1, 5000, (count,)).tolist()
    slow, fast = random_lists(sizes, torch.float32, torch.float32)
    check(slow, fast, 0.5)


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_misaligned_views(offset):
    base_slow, base_fast = random_lists([100003, 100003], torch.float32, torch.bfloat16)
    slow = [base_slow[0][offset:], base_slow[1][:-offset]]
    fast = [base_fast[0][offset:], base_fast[1][offset:]]  # slow[1] aligned, fast[1] not
    untouched = base_fast[0][:offset].clone()
    check(slow, fast, 0.5)
    assert torch.equal(base_fast[0][:offset], untouched)


def test_non_contiguous_and_permuted():
    a, b = torch.randn(64, 48, device="cuda"), torch.randn(64, 48, device="cuda")
    c, d = torch.randn(33, 39, device="cuda"), torch.randn(33, 39, device="cuda")
    check([a.t(), c[:, ::3]], [b.t(), d[:, 1::3]], 0.25)


def test_one_tensor_over_two_billion_elements():
    numel = 2**31 + 5
    needed = numel * 2 * 2 * 2  # two fp16 tensors, plus a reference copy of each
    if torch.cuda.mem_get_info()[0] < needed + (1 << 30):
        pytest.skip("not enough GPU memory")
    slow = torch.empty(numel, device="cuda", dtype=torch.float16).uniform_(-1, 1)
    fast = torch.empty(numel, device="cuda", dtype=torch.float16).uniform_(-1, 1)
    expected = slow.lerp(fast, 0.5)
    op([slow], [fast], 0.5)
    assert torch.equal(slow, expected) and torch.equal(fast, expected)


def test_cuda_graph_capture_and_replay():
    slow, fast = random_lists([1000, 70000, 3], torch.float32, torch.float32)
    op(slow, fast, 0.5)  # first call outside capture: the occupancy query runs here
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        op(slow, fast, 0.4)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        for s, f in zip(slow, fast):
            s.copy_(torch.randn_like(s))
            f.copy_(torch.randn_like(f))
        slow_ref = [s.clone() for s in slow]
        fast_ref = [f.clone() for f in fast]
        reference_update_(slow_ref, fast_ref, 0.4)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(slow + fast, slow_ref + fast_ref):
            assert torch.equal(got, want)


def test_opcheck_on_cuda():
    slow, fast = random_lists([17, 4097], torch.float32, torch.bfloat16)
    torch.library.opcheck(op, ([s.view(-1) for s in slow], fast, 0.5))


def test_rejects_mixed_devices():
    slow, fast = random_lists([4], torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"fast\[0\] is on cpu"):
        op(slow, [fast[0].cpu()], 0.5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    slow, fast = random_lists([5000, 3], torch.float32, torch.float32, device="cuda:1")
    check(slow, fast, 0.5)


@pytest.mark.parametrize("inner_state", ["keep", "pullback"])
def test_lookahead_end_to_end_on_cuda(inner_state):
    def run(device):
        model = make_model().to(device)
        opt = Lookahead(INNER["adam"](model.parameters()), k=3, inner_state=inner_state)
        ref_model = make_model().to(device)
        ref = ReferenceLookahead(
            INNER["adam"](ref_model.parameters()), k=3, inner_state=inner_state
        )
        data = [(x.to(device), y.to(device)) for x, y in batches(10)]
        train(model, opt, data)
        train(ref_model, ref.inner, data, step=ref.step)
        return model, ref_model

    cuda_model, cuda_ref = run("cuda")
    for p, q in zip(cuda_model.parameters(), cuda_ref.parameters()):
        assert torch.equal(p, q)
    cpu_model, _ = run("cpu")
    # Forward and backward differ in rounding between devices; the update itself does not.
    for p, q in zip(cuda_model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-4, atol=1e-5)


def test_slow_weights_follow_the_model_to_the_gpu():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    train(model, opt, batches(1))
    model.cuda()
    train(model, opt, [(x.cuda(), y.cuda()) for x, y in batches(2)])
    for p in model.parameters():
        assert opt.lookahead_state[p]["slow_param"].device == p.device
