"""lookahead_update_if_ and found_nonfinite_, the ops of syncs decided on the device, against
torch's own ops; on the CPU, and on CUDA when a GPU is present."""

import pytest
import torch
from conftest import DTYPE_PAIRS, reference_update_

import lookahead_cuda
from lookahead_cuda import _C

# Results that depend on the CPU kernels torch picks: run again under every capability the CPU
# has (test_cpu_capabilities.py).
pytestmark = pytest.mark.cpu_capability

update_if = torch.ops.lookahead_cuda.lookahead_update_if_
found_nonfinite = torch.ops.lookahead_cuda.found_nonfinite_


# The wrappers' eager path (csrc/python_calls.cpp), asserting that it was taken.
def eager_update_if(slow, fast, alpha, due, restore=None):
    assert _C.try_lookahead_update_if_(slow, fast, alpha, due, restore), "declined"


def eager_found_nonfinite(tensors, found, due=None):
    assert _C.try_found_nonfinite_(tensors, found, due), "declined"


UPDATE_IF = {"torch.ops": update_if, "eager": eager_update_if}
FOUND_NONFINITE = {"torch.ops": found_nonfinite, "eager": eager_found_nonfinite}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not (torch.cuda.is_available() and lookahead_cuda.build_info()["cuda"]),
                reason="needs a GPU and a build with the CUDA kernels",
            ),
        ],
    ),
]
# Flat pairs, a pair with different layouts (ATen's path), and an empty one.
SHAPES = [(70001,), (3,), (33, 39), (0,), (65537,)]


def random_pairs(slow_dtype, fast_dtype, device):
    slow = [torch.randn(s, dtype=torch.float64).to(device, slow_dtype) for s in SHAPES]
    fast = [torch.randn(s, dtype=torch.float64).to(device, fast_dtype) for s in SHAPES]
    fast[2] = fast[2].t().contiguous().t()  # same shape, column-major
    return slow, fast


def flag(value, device):
    return torch.tensor(value, device=device)


def clones(tensors):
    return [t.clone() for t in tensors]


def assert_bitwise(actual, expected):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        assert torch.equal(a.contiguous().view(torch.uint8), e.contiguous().view(torch.uint8)), i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_not_due_writes_nothing(device, slow_dtype, fast_dtype, entry):
    slow, fast = random_pairs(slow_dtype, fast_dtype, device)
    before = clones(slow + fast)
    UPDATE_IF[entry](slow, fast, 0.5, flag(False, device), flag(True, device))
    assert_bitwise(slow + fast, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("restore", [None, False])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_due_is_the_update(device, slow_dtype, fast_dtype, restore, alpha, entry):
    slow, fast = random_pairs(slow_dtype, fast_dtype, device)
    slow_ref, fast_ref = clones(slow), clones(fast)
    reference_update_(slow_ref, fast_ref, alpha)
    restore_flag = None if restore is None else flag(restore, device)
    UPDATE_IF[entry](slow, fast, alpha, flag(True, device), restore_flag)
    assert_bitwise(slow + fast, slow_ref + fast_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_restore_copies_slow_into_fast_and_keeps_slow(device, slow_dtype, fast_dtype, entry):
    slow, fast = random_pairs(slow_dtype, fast_dtype, device)
    fast[1][1] = float("nan")
    fast[0][-1] = float("inf")
    slow_before = clones(slow)
    UPDATE_IF[entry](slow, fast, 0.5, flag(True, device), flag(True, device))
    assert_bitwise(slow, slow_before)
    assert_bitwise(fast, [s.to(f.dtype) for s, f in zip(slow_before, fast)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_one_element_flags_of_any_shape_and_version_bumps(device, entry):
    slow, fast = random_pairs(torch.float32, torch.float32, device)
    before = [t._version for t in slow + fast]
    slow_ref, fast_ref = clones(slow), clones(fast)
    reference_update_(slow_ref, fast_ref, 0.5)
    UPDATE_IF[entry](slow, fast, 0.5, torch.ones(1, 1, dtype=torch.bool, device=device))
    assert_bitwise(slow + fast, slow_ref + fast_ref)
    assert all(t._version > v for t, v in zip(slow + fast, before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_found_nonfinite_sees_every_element(device, dtype, bad, entry):
    sizes = [70001, 3, 0, 65537, 1, 5000]
    # The bad value at chunk and grain boundaries, at the very start, and at the very end.
    for tensor_index, element in [(0, 0), (0, 65535), (0, 65536), (3, 65536), (5, 4999), (4, 0)]:
        tensors = [torch.randn(n, dtype=torch.float64).to(device, dtype) for n in sizes]
        tensors[tensor_index][element] = bad
        found = flag(False, device)
        FOUND_NONFINITE[entry](tensors, found)
        assert found.item(), (tensor_index, element)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_found_nonfinite_leaves_finite_tensors_alone(device, dtype, entry):
    info = torch.finfo(dtype)
    tensors = [torch.randn(n, dtype=torch.float64).to(device, dtype) for n in [70001, 3, 0]]
    tensors[1][0], tensors[1][1], tensors[1][2] = info.max, -info.max, info.tiny / 2
    before = clones(tensors)
    found = flag(False, device)
    FOUND_NONFINITE[entry](tensors, found)
    assert not found.item()
    assert_bitwise(tensors, before)
    found = flag(True, device)
    FOUND_NONFINITE[entry](tensors, found)
    assert found.item()  # a flag already raised stays raised


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_found_nonfinite_in_strided_tensors(device, entry):
    base = torch.randn(40, 30, device=device)
    base[3, 7] = float("nan")
    found = flag(False, device)
    FOUND_NONFINITE[entry]([base[:, ::2], base[:, 1::2]], found)
    assert found.item()
    found = flag(False, device)
    FOUND_NONFINITE[entry]([base[:, 1::2]], found)  # column 7 is odd: not in the even-column view
    assert found.item()
    found = flag(False, device)
    FOUND_NONFINITE[entry]([base[:, ::2]], found)
    assert not found.item()


def test_opcheck():
    slow, fast = random_pairs(torch.float32, torch.bfloat16, "cpu")
    torch.library.opcheck(update_if, (slow, fast, 0.5, flag(True, "cpu"), flag(False, "cpu")))
    torch.library.opcheck(update_if, (slow, fast, 0.25, flag(False, "cpu"), None))
    tensors = [torch.randn(5), torch.randn(3, 3)]
    torch.library.opcheck(found_nonfinite, (tensors, flag(False, "cpu")))
    torch.library.opcheck(found_nonfinite, (tensors, flag(False, "cpu"), flag(True, "cpu")))


def test_compile_without_graph_breaks():
    def sync(slow, fast, counter, k):
        bad = torch.zeros((), dtype=torch.bool)
        found_nonfinite(fast, bad)
        update_if(slow, fast, 0.5, counter >= k, bad)

    compiled = torch.compile(sync, fullgraph=True, backend="aot_eager")
    slow, fast = random_pairs(torch.float32, torch.float32, "cpu")
    slow_ref, fast_ref = clones(slow), clones(fast)
    compiled(slow, fast, torch.tensor(1.0), 2)
    assert_bitwise(slow + fast, slow_ref + fast_ref)
    compiled(slow, fast, torch.tensor(2.0), 2)
    reference_update_(slow_ref, fast_ref, 0.5)
    assert_bitwise(slow + fast, slow_ref + fast_ref)


@pytest.mark.parametrize(
    ("due", "restore", "error", "match"),
    [
        (torch.tensor(1.0), None, TypeError, r"due must be a dense torch\.bool tensor"),
        (torch.tensor([True, False]), None, ValueError, r"due must hold one element"),
        (torch.tensor(True), torch.tensor(1), TypeError, r"restore must be a dense torch\.bool"),
        (torch.tensor(True, device="meta"), None, ValueError, r"due is on meta"),
    ],
)
@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_bad_flags_change_nothing(due, restore, error, match, entry):
    slow, fast = random_pairs(torch.float32, torch.float32, "cpu")
    before = clones(slow + fast)
    with pytest.raises(error, match=match):
        UPDATE_IF[entry](slow, fast, 0.5, due, restore)
    assert_bitwise(slow + fast, before)


@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_found_nonfinite_rejects_bad_input(entry):
    with pytest.raises(TypeError, match=r"found must be a dense torch\.bool tensor"):
        FOUND_NONFINITE[entry]([torch.randn(3)], torch.tensor(0.0))
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch\.float64"):
        FOUND_NONFINITE[entry](
            [torch.randn(3), torch.randn(3, dtype=torch.float64)], flag(False, "cpu")
        )
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch\.int64"):
        FOUND_NONFINITE[entry]([torch.arange(3)], flag(False, "cpu"))
    freed = torch.randn(100)
    freed.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match=r"tensors\[1\] spans 400 bytes of its storage"):
        FOUND_NONFINITE[entry]([torch.randn(3), freed], flag(False, "cpu"))
    # A floating dtype no kernel reads is refused by validation, not inside dispatch.
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch\.float8_e4m3fn"):
        FOUND_NONFINITE[entry]([torch.randn(3).to(torch.float8_e4m3fn)], flag(False, "cpu"))


def any_device(op, *args):
    """The op's kernel for devices without one of ours (ATen one tensor at a time), run on CPU
    tensors: PrivateUse1 has no kernel of its own, so it gets that one."""
    op.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1), *args)


def test_devices_without_a_kernel_decide_the_same_way():
    """Devices without a kernel get the same decisions through torch.where, and version bumps."""
    for due, restore in [(False, None), (True, None), (True, False), (True, True)]:
        slow, fast = random_pairs(torch.float32, torch.bfloat16, "cpu")
        want_slow, want_fast = clones(slow), clones(fast)
        update_if(want_slow, want_fast, 0.3, flag(due, "cpu"), flag(restore or False, "cpu"))
        restore_flag = None if restore is None else flag(restore, "cpu")
        versions = [t._version for t in slow + fast]
        any_device(
            torch.ops.lookahead_cuda.lookahead_update_if_,
            slow,
            fast,
            0.3,
            flag(due, "cpu"),
            restore_flag,
        )
        assert_bitwise(slow + fast, want_slow + want_fast)
        assert all(t._version > v for t, v in zip(slow + fast, versions))
    finite = [torch.randn(7), torch.randn(3, 3).t()]
    for tensors, want in [(finite, False), ([*finite, torch.tensor([1.0, float("inf")])], True)]:
        found = flag(False, "cpu")
        any_device(torch.ops.lookahead_cuda.found_nonfinite_, tensors, found, None)
        assert found.item() == want
    with pytest.raises(ValueError, match="due must hold one element"):
        slow, fast = random_pairs(torch.float32, torch.float32, "cpu")
        any_device(
            torch.ops.lookahead_cuda.lookahead_update_if_,
            slow,
            fast,
            0.3,
            torch.ones(2, dtype=torch.bool),
            None,
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("due", [False, True])
@pytest.mark.parametrize("entry", ["torch.ops", "eager"])
def test_found_nonfinite_reads_nothing_unless_due(device, due, entry):
    flat = torch.randn(70001, device=device)
    flat[-1] = float("nan")
    strided = torch.randn(40, 30, device=device)[:, ::2]
    strided[-1, -1] = float("nan")
    for tensors in ([flat], [strided]):
        found = flag(False, device)
        FOUND_NONFINITE[entry](tensors, found, flag(due, device))
        assert found.item() == due


def test_eager_entry_points_decline_flags_torch_ops_must_handle():
    class Flag(torch.Tensor):
        pass

    slow, fast = random_pairs(torch.float32, torch.float32, "cpu")
    before = clones(slow + fast)
    due = flag(True, "cpu").as_subclass(Flag)
    assert not _C.try_lookahead_update_if_(slow, fast, 0.5, due, None)
    assert not _C.try_lookahead_update_if_(slow, fast, 0.5, flag(True, "cpu"), due)
    found = flag(False, "cpu")
    assert not _C.try_found_nonfinite_(slow, found.as_subclass(Flag), None)
    assert not _C.try_found_nonfinite_(slow, found, due)
    assert_bitwise(slow + fast, before)
