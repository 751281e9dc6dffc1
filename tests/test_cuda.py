"""The CUDA kernel against torch's own CUDA lerp_/copy_, and Lookahead's large-model features that
need a GPU (CUDA graphs, device-side AMP counting, the divergence guard without host syncs);
skipped without a GPU."""

import pytest
import torch
from conftest import DTYPE_PAIRS, reference_update_
from test_lookahead import INNER, ReferenceLookahead, batches, make_model, train

import lookahead_cuda
from lookahead_cuda import Lookahead

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and lookahead_cuda.build_info()["cuda"]),
        reason="needs a GPU and a build with the CUDA kernels",
    ),
]
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


@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("offset", [1, 3, 7])  # up to 7 elements to peel (8 fp16 in 16 bytes)
def test_misaligned_views(slow_dtype, fast_dtype, offset):
    base_slow, base_fast = random_lists([100003, 100003], slow_dtype, fast_dtype)
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
    # Warm up exactly what is captured (the kernel variant depends on the alpha branch): its
    # occupancy query runs here, outside the capture.
    op(slow, fast, 0.4)
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


@pytest.mark.parametrize("inner_state", ["keep", "pullback"])
@pytest.mark.parametrize("nonfinite", ["propagate", "restore"])
def test_slow_weights_follow_the_model_to_the_gpu(inner_state, nonfinite, monkeypatch):
    from lookahead_cuda import functional

    def offloaded(*args):
        raise AssertionError("a model that moved took the host-memory path")

    monkeypatch.setattr(functional, "offloaded_update_", offloaded)
    model = make_model()
    opt = Lookahead(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        k=2,
        inner_state=inner_state,
        nonfinite=nonfinite,
    )
    train(model, opt, batches(3))
    model.cuda()
    for state in opt.state.values():  # as a user moves the inner state along with the model
        state["momentum_buffer"] = state["momentum_buffer"].cuda()
    train(model, opt, [(x.cuda(), y.cuda()) for x, y in batches(2)])
    for p in model.parameters():
        ours = opt.lookahead_state[p]
        assert ours["slow_param"].device == p.device
        if inner_state == "pullback":
            assert ours["slow_momentum_buffer"].device == p.device


# -- large-model training (issue: torch.compile, CUDA graphs, AMP, divergence guard) --------------


def graph_training_run(data, k, capture):
    """A whole step (forward, backward, capturable Adam, capturable Lookahead) replayed from a CUDA
    graph when capture is True, else run eagerly; returns the model, the optimizer and, after each
    step, the first parameter's slow weights."""
    model = make_model().cuda()
    opt = Lookahead(
        torch.optim.Adam(model.parameters(), lr=0.01, capturable=True), k=k, capturable=True
    )
    x_static, y_static = (t.clone() for t in data[0])

    def step():
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x_static), y_static).backward()
        opt.step()

    # Warm-up on a side stream, as CUDA graph capture requires: state and slow weights appear here.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:2]:
            x_static.copy_(x)
            y_static.copy_(y)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = None
    if capture:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    first = next(model.parameters())
    slow_after_each = []
    for x, y in data[2:]:
        x_static.copy_(x)
        y_static.copy_(y)
        if graph is None:
            step()
        else:
            graph.replay()
        slow_after_each.append(opt.lookahead_state[first]["slow_param"].clone())
    torch.cuda.synchronize()
    return model, opt, slow_after_each


def test_whole_step_in_a_cuda_graph_matches_eager():
    data = [(x.cuda(), y.cuda()) for x, y in batches(14)]
    graph_model, graph_opt, graph_slow = graph_training_run(data, k=3, capture=True)
    eager_model, eager_opt, eager_slow = graph_training_run(data, k=3, capture=False)
    for p, q in zip(graph_model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(
            graph_opt.lookahead_state[p]["slow_param"], eager_opt.lookahead_state[q]["slow_param"]
        )
    # Two warm-up steps, then 12 replays (steps 3 to 14): after step 3, the slow weights change on
    # steps 6, 9 and 12 only.
    changed = [i + 3 for i in range(1, 12) if not torch.equal(graph_slow[i], graph_slow[i - 1])]
    assert changed == [6, 9, 12]
    assert all(torch.equal(a, b) for a, b in zip(graph_slow, eager_slow))


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skip_is_counted_on_the_device(fused):
    def run(data, inf_at=None):
        model = make_model().cuda()
        opt = Lookahead(torch.optim.Adam(model.parameters(), lr=0.01, fused=fused), k=3)
        scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if i == inf_at:
                next(model.parameters()).grad[0, 0] = float("inf")
            if fused and i >= 2:
                # The fused path counts on the device: no step may wait for the host.
                torch.cuda.set_sync_debug_mode("error")
            try:
                scaler.step(opt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            scaler.update()
        return model, opt

    data = [(x.cuda(), y.cuda()) for x, y in batches(8)]
    skipped_model, skipped = run(data, inf_at=4)
    clean_model, clean = run(data[:4] + data[5:])
    counter = skipped.lookahead_state[next(skipped_model.parameters())]["step"]
    assert counter.device.type == ("cuda" if fused else "cpu")
    assert counter.item() == 7 % 3
    for p, q in zip(skipped_model.parameters(), clean_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(
            skipped.lookahead_state[p]["slow_param"], clean.lookahead_state[q]["slow_param"]
        )


@pytest.mark.parametrize("capturable", [False, True])
def test_restore_decided_on_the_device(capturable):
    model = make_model().cuda()
    opt = Lookahead(
        torch.optim.SGD(model.parameters(), lr=0.05),
        k=3,
        nonfinite="restore",
        capturable=capturable,
    )
    data = [(x.cuda(), y.cuda()) for x, y in batches(6)]
    train(model, opt, data[:3])
    slow = [opt.lookahead_state[p]["slow_param"].clone() for p in model.parameters()]
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    torch.cuda.set_sync_debug_mode("error")
    try:
        train(model, opt, data[3:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.nonfinite_restores == 1
    for p, s in zip(model.parameters(), slow):
        assert torch.equal(p, s) and torch.equal(opt.lookahead_state[p]["slow_param"], s)


def test_compiled_step_on_cuda():
    data = [(x.cuda(), y.cuda()) for x, y in batches(10)]
    eager_model = make_model().cuda()
    eager = Lookahead(torch.optim.SGD(eager_model.parameters(), lr=0.05, momentum=0.9), k=3)
    train(eager_model, eager, data)
    model = make_model().cuda()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), k=3)
    train(model, opt, data, step=torch.compile(opt.step, backend="aot_eager"))
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slow_weights_take_no_extra_copy_of_the_model_on_the_gpu(dtype):
    layers = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda().to(dtype)
    slow_dtype = torch.float32 if dtype == torch.bfloat16 else None
    opt = Lookahead(torch.optim.SGD(layers.parameters(), lr=0.1), k=2, slow_dtype=slow_dtype)
    for p in layers.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    fast = [p.detach().clone() for p in layers.parameters()]
    slow = [opt.lookahead_state[p]["slow_param"].to(dtype, copy=True) for p in layers.parameters()]
    largest = max(p.numel() * p.element_size() for p in layers.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in layers.parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with opt.slow_weights():
        assert all(torch.equal(p, s) for p, s in zip(layers.parameters(), slow))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 2 * largest < model_bytes
    assert all(torch.equal(p, f) for p, f in zip(layers.parameters(), fast))


def test_bench_step_times_with_and_without_a_cuda_graph(tmp_path):
    import json

    from lookahead_cuda.bench.cli import main

    out = tmp_path / "e2e.json"
    argv = ["--device", "cuda", "--e2e", "--tensors", "4", "--numel", "5000", "--reps", "2"]
    assert main([*argv, "--k", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["e2e"]
    assert [r["optimizer"] for r in rows][2:] == [
        "AdamW(capturable), eager",
        "AdamW(capturable), graph",
    ]
    assert all(r["step_ms"] > 0 for r in rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slow_weights_in_host_memory(dtype):
    from lookahead_cuda import functional
    from lookahead_cuda.offload import StagingBuffers

    slow_dtype = torch.float32 if dtype == torch.bfloat16 else None
    data = [(x.cuda().to(dtype), y.cuda()) for x, y in batches(9, dtype)]

    def run(**settings):
        model = make_model(dtype).cuda()
        opt = Lookahead(
            torch.optim.Adam(model.parameters(), lr=0.01),
            k=3,
            inner_state="pullback",
            slow_dtype=slow_dtype,
            **settings,
        )
        train(model, opt, data)
        return model, opt

    on_gpu_model, _ = run()
    on_host_model, on_host = run(slow_device="cpu")
    for p, q in zip(on_host_model.parameters(), on_gpu_model.parameters()):
        assert torch.equal(p, q)
        slow = on_host.lookahead_state[p]["slow_param"]
        assert slow.device.type == "cpu" and slow.is_pinned()
        assert on_host.lookahead_state[p]["slow_exp_avg"].device.type == "cpu"

    # Many chunks, so that transfers overlap the CPU kernel.
    slow = [torch.randn(n, pin_memory=True) for n in [70001, 3, 1 << 20, 5]]
    fast = [torch.randn(n, device="cuda") for n in [70001, 3, 1 << 20, 5]]
    slow_ref, fast_ref = [s.cuda() for s in slow], [f.clone() for f in fast]
    reference_update_(slow_ref, fast_ref, 0.5)
    buckets = functional.bucket_pairs(zip(slow, fast))
    functional.sync_buckets(buckets, 0.5, offload=StagingBuffers(chunk_bytes=1 << 16))
    for got, want in zip(slow + fast, slow_ref + fast_ref):
        assert torch.equal(got.cuda(), want)


@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_sync_matches_the_cpu_kernel_bitwise(slow_dtype, fast_dtype, nesterov):
    # Both backends round each multiply-add once (the CPU where it has FMA, as torch's kernels
    # there assume), so they agree to the bit; misaligned views take the peeled path.
    from lookahead_cuda.ops import lookahead_momentum_update_

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU rounds multiply-adds twice")
    sizes = [1, 3, 4097, 65537, 200003]
    cpu = [
        [torch.randn(n, dtype=torch.float64).to(dtype) for n in sizes]
        for dtype in (slow_dtype, fast_dtype, slow_dtype)
    ]
    gpu = [[t.cuda() for t in ts] for ts in cpu]
    gpu = [[*ts[:-1], torch.cat([ts[-1][:1], ts[-1]])[1:]] for ts in gpu]  # a misaligned view
    lookahead_momentum_update_(*cpu, 0.7, 0.9, nesterov)
    lookahead_momentum_update_(*gpu, 0.7, 0.9, nesterov)
    for a, b in zip([t for ts in cpu for t in ts], [t for ts in gpu for t in ts]):
        assert torch.equal(a, b.cpu())
