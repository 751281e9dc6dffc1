"""torch.ops.lookahead_cuda.lookahead_update_ on the CPU against torch's own lerp_/copy_, called
through torch.ops and through the eager entry point that the Python wrapper prefers."""

from typing import ClassVar

import pytest
import torch
from conftest import DTYPE_PAIRS, reference_update_
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lookahead_cuda
from lookahead_cuda import _C
from lookahead_cuda.bench.impls import foreach_update_

# Results that depend on the CPU kernels torch picks: run again under every capability the CPU
# has (test_cpu_capabilities.py).
pytestmark = pytest.mark.cpu_capability

op = torch.ops.lookahead_cuda.lookahead_update_


def eager(slow, fast, alpha):
    """The op as lookahead_cuda.lookahead_update_ calls it outside torch.compile: through the
    dispatcher without boxing (csrc/python_calls.cpp); asserts that this path was taken."""
    assert _C.try_lookahead_update_(slow, fast, alpha), "the eager entry point declined"


ENTRY_POINTS = {"torch.ops": op, "eager": eager}
ALPHAS = [0.5, 0.3, 0.8, 1.0, 0.49999999]


def random_lists(shapes, slow_dtype, fast_dtype):
    slow = [torch.randn(shape, dtype=torch.float64).to(slow_dtype) for shape in shapes]
    fast = [torch.randn(shape, dtype=torch.float64).to(fast_dtype) for shape in shapes]
    return slow, fast


def expected(slow, fast, alpha):
    slow_ref = [s.clone() for s in slow]
    fast_ref = [f.clone() for f in fast]
    reference_update_(slow_ref, fast_ref, alpha)
    return slow_ref, fast_ref


def assert_bitwise(actual, expected_):
    assert len(actual) == len(expected_)
    for i, (a, e) in enumerate(zip(actual, expected_)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        assert torch.equal(a.contiguous().view(torch.uint8), e.contiguous().view(torch.uint8)), i


@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("numel", [0, 1, 7, 4097, 65537])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_matches_torch_lerp_bitwise(slow_dtype, fast_dtype, numel, alpha, entry):
    slow, fast = random_lists([(numel,)], slow_dtype, fast_dtype)
    slow_ref, fast_ref = expected(slow, fast, alpha)
    ENTRY_POINTS[entry](slow, fast, alpha)
    assert_bitwise(slow, slow_ref)
    assert_bitwise(fast, fast_ref)


@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("count", [1, 2, 3, 100, 3000])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_many_tensors_one_call(slow_dtype, fast_dtype, count, entry):
    sizes = torch.randint(0, 3000, (count,)).tolist()
    slow, fast = random_lists([(n,) for n in sizes], slow_dtype, fast_dtype)
    slow_ref, fast_ref = expected(slow, fast, 0.5)
    ENTRY_POINTS[entry](slow, fast, 0.5)
    assert_bitwise(slow, slow_ref)
    assert_bitwise(fast, fast_ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_any_thread_count_writes_every_element(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Spans the grain size many times over, with boundaries that fall inside tensors.
        slow, fast = random_lists(
            [(70001,), (3,), (150000,), (1,), (32768,)], torch.float32, torch.float32
        )
        slow_ref, fast_ref = expected(slow, fast, 0.7)
        op(slow, fast, 0.7)
        assert_bitwise(slow, slow_ref)
        assert_bitwise(fast, fast_ref)
    finally:
        torch.set_num_threads(previous)


def test_multidimensional_and_non_contiguous_tensors():
    base_slow, base_fast = random_lists(
        [(64, 48), (33, 39), (10, 10, 10)], torch.float32, torch.float32
    )
    # Transposed pairs (dense, equal strides), strided column slices, and differing layouts.
    slow = [base_slow[0].t(), base_slow[1][:, ::3], base_slow[2]]
    fast = [
        base_fast[0].t(),
        base_fast[1][:, 1::3],
        base_fast[2].permute(2, 0, 1).contiguous().permute(1, 2, 0),
    ]
    untouched = base_fast[1][:, 0].clone()
    slow_ref, fast_ref = expected(slow, fast, 0.25)
    op(slow, fast, 0.25)
    assert_bitwise(slow, slow_ref)
    assert_bitwise(fast, fast_ref)
    assert torch.equal(base_fast[1][:, 0], untouched)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bumps_version_counters(entry):
    slow, fast = random_lists([(5,), (0,)], torch.float32, torch.float32)
    before = [t._version for t in slow + fast]
    ENTRY_POINTS[entry](slow, fast, 0.5)
    assert all(t._version > v for t, v in zip(slow + fast, before))


def test_foreach_fallback_is_the_same_update():
    for slow_dtype, fast_dtype in DTYPE_PAIRS:
        slow, fast = random_lists([(33,), (4097,)], slow_dtype, fast_dtype)
        slow_ref, fast_ref = expected(slow, fast, 0.3)
        foreach_update_(slow, fast, 0.3)
        assert_bitwise(slow, slow_ref)
        assert_bitwise(fast, fast_ref)


def test_opcheck():
    slow, fast = random_lists([(3, 5), (17,)], torch.float32, torch.float32)
    torch.library.opcheck(op, (slow, fast, 0.5))
    slow, fast = random_lists([(3, 5), (17,)], torch.float32, torch.bfloat16)
    torch.library.opcheck(op, (slow, fast, 0.25))


def test_compiles_without_graph_breaks():
    def update(slow, fast):
        op(slow, fast, 0.5)

    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    slow, fast = random_lists([(8,), (3, 3)], torch.float32, torch.float32)
    slow_ref, fast_ref = expected(slow, fast, 0.5)
    compiled(slow, fast)
    assert_bitwise(slow, slow_ref)
    assert_bitwise(fast, fast_ref)


def special_values(dtype):
    """Values where bitwise claims break first: signed zeros, infinities, NaN, subnormals."""
    info = torch.finfo(dtype)
    return torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            info.tiny / 4,
            -info.tiny / 4,
            info.tiny,
            info.max,
            -info.max,
            1.0,
            -1.0,
        ],
        dtype=torch.float64,
    ).to(dtype)


def with_special_values(numel, dtype):
    """Random values with a third replaced by special ones, and a run of zeros to meet them."""
    values = torch.randn(numel, dtype=torch.float64).to(dtype)
    specials = special_values(dtype)
    chosen = torch.rand(numel) < 1 / 3
    values[chosen] = specials[torch.randint(len(specials), (int(chosen.sum()),))]
    return values


def assert_same_bits_unless_nan(actual, wanted):
    """Bit patterns equal wherever torch's result is not NaN (which includes the sign of zero);
    NaN wherever it is NaN (the sign and payload of a NaN are not promised)."""
    for a, w in zip(actual, wanted):
        nan = torch.isnan(w)
        assert torch.equal(torch.isnan(a), nan)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        assert torch.equal(a[~nan].view(bits), w[~nan].view(bits))


def scalar_form_at_weight_one(slow, fast):
    """The sync at alpha = 1 as torch's scalar form (its CUDA kernel, and ours everywhere) computes
    it: end - (end - start) * (1 - 1), a multiply-add (-0.0) * (end - start) + end in the slow
    dtype's math type. The product is a zero (or NaN), so torch's separate mul and add round
    nothing: the result is the fast weight, a zero's sign being what IEEE gives the sum of two
    zeros."""
    slow_ref, fast_ref = [], []
    for s, f in zip(slow, fast):
        opmath = torch.float64 if s.dtype == torch.float64 else torch.float32
        start, end = s.to(opmath), f.to(opmath)
        result = (torch.mul(end - start, -0.0) + end).to(s.dtype)
        slow_ref.append(result)
        fast_ref.append(result.to(f.dtype))
    return slow_ref, fast_ref


@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.49999997, 0.3])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_special_values_bitwise(slow_dtype, fast_dtype, alpha, threads):
    # Sizes around vector widths and around a split of the tensors over threads.
    sizes = [1, 3, 16, 17, 64, 67, 32773, 100003]
    slow = [with_special_values(n, slow_dtype) for n in sizes]
    fast = [with_special_values(n, fast_dtype) for n in sizes]
    for f in fast:
        f[: len(f) // 2 : 3] = -0.0  # alpha = 1 returns fast: zeros of both signs meet it
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if alpha == 1.0:
            # torch's CPU vector loops give +0 where its scalar form gives -0, and which loop
            # computes an element depends on the vector ISA, the thread count and the size; we
            # promise the scalar form, as on CUDA.
            slow_ref, fast_ref = scalar_form_at_weight_one(slow, fast)
        else:
            slow_ref, fast_ref = expected(slow, fast, alpha)
        op(slow, fast, alpha)
    finally:
        torch.set_num_threads(previous)
    assert_same_bits_unless_nan(slow, slow_ref)
    assert_same_bits_unless_nan(fast, fast_ref)


def test_weight_one_differs_from_torch_only_in_the_sign_of_zeros():
    slow = [with_special_values(n, torch.float32) for n in (17, 4099)]
    fast = [with_special_values(n, torch.float32) for n in (17, 4099)]
    for f in fast:
        f[::2] = -0.0
    slow_ref, fast_ref = expected(slow, fast, 1.0)
    op(slow, fast, 1.0)
    for ours, torchs in zip(slow + fast, slow_ref + fast_ref):
        nan = torch.isnan(torchs)
        assert torch.equal(torch.isnan(ours), nan)
        assert torch.equal(ours[~nan], torchs[~nan])  # equal as numbers: +0 == -0


# -- bad input: a clear error naming what is wrong, and nothing modified ------------------------


def rejected(slow, fast, alpha, error, match):
    with_data = [t for t in list(slow) + list(fast) if t.layout == torch.strided and not t.is_meta]
    before = [t.clone() for t in with_data]
    for entry in (op, _C.try_lookahead_update_):
        with pytest.raises(error, match=match):
            entry(slow, fast, alpha)
        for b, a in zip(before, with_data):
            assert torch.equal(b, a)


def test_rejects_lists_of_different_lengths():
    slow, fast = random_lists([(4,), (4,)], torch.float32, torch.float32)
    rejected(slow, fast[:1], 0.5, ValueError, r"slow has 2 tensors but fast has 1")


def test_rejects_shape_mismatch():
    slow, fast = random_lists([(4,), (4, 3)], torch.float32, torch.float32)
    fast[1] = torch.randn(3, 4)
    rejected(slow, fast, 0.5, ValueError, r"slow\[1\] has shape \[4, 3\] but fast\[1\] has shape")


def test_rejects_tensors_on_different_devices():
    slow, _fast = random_lists([(4,)], torch.float32, torch.float32)
    rejected(slow, [torch.empty(4, device="meta")], 0.5, ValueError, r"fast\[0\] is on meta")


@pytest.mark.parametrize(
    ("slow_dtype", "fast_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float16),
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_rejects_unsupported_dtype_pair(slow_dtype, fast_dtype):
    slow, fast = random_lists([(4,), (4,)], torch.float32, torch.float32)
    slow[1], fast[1] = slow[1].to(slow_dtype), fast[1].to(fast_dtype)
    rejected(slow, fast, 0.5, TypeError, r"unsupported dtype pair at index 1")


def test_rejects_mixed_dtype_pairs_in_one_call():
    slow, fast = random_lists([(4,), (4,)], torch.float32, torch.float32)
    slow[1], fast[1] = slow[1].double(), fast[1].double()
    rejected(slow, fast, 0.5, TypeError, r"index 1 has dtypes .* one call takes one dtype pair")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.bool])
def test_rejects_non_floating_tensors(dtype):
    slow, fast = random_lists([(4,), (4,)], torch.float32, torch.float32)
    fast[1] = torch.ones(4, dtype=dtype)
    rejected(slow, fast, 0.5, TypeError, r"fast\[1\] has dtype torch\.")


def test_rejects_sparse_tensors():
    slow, fast = random_lists([(4, 4)], torch.float32, torch.float32)
    rejected(slow, [fast[0].to_sparse()], 0.5, TypeError, r"fast\[0\] has layout .*dense")


def test_rejects_a_tensor_in_both_lists():
    slow, fast = random_lists([(4,), (4,)], torch.float32, torch.float32)
    rejected(
        slow,
        [fast[0], slow[1]],
        0.5,
        ValueError,
        r"(slow\[1\] and fast\[1\]|fast\[1\] and "
        r"slow\[1\]) share memory",
    )


def test_rejects_overlapping_views():
    base = torch.randn(10)
    slow, _ = random_lists([(6,), (6,)], torch.float32, torch.float32)
    rejected(slow, [base[:6], base[4:]], 0.5, ValueError, r"fast\[0\] and fast\[1\] share memory")


def test_rejects_expanded_tensors():
    slow, _ = random_lists([(3, 4)], torch.float32, torch.float32)
    rejected(
        slow,
        [torch.randn(1, 4).expand(3, 4)],
        0.5,
        ValueError,
        r"fast\[0\] has elements "
        r"that share memory",
    )


@pytest.mark.parametrize("held", [0, 40])
def test_rejects_a_tensor_whose_storage_was_freed_or_shrunk_under_it(held):
    # As FSDP frees a parameter's storage between uses: the tensor keeps its sizes.
    slow, fast = random_lists([(4,), (1000,)], torch.float32, torch.float32)
    fast[1].untyped_storage().resize_(held)
    message = rf"fast\[1\] spans 4000 bytes of its storage, which holds {held}"
    with_storage = [slow[0], slow[1], fast[0]]
    before = [t.clone() for t in with_storage]
    for entry in (op, _C.try_lookahead_update_):
        with pytest.raises(ValueError, match=message):
            entry(slow, fast, 0.5)
        assert all(torch.equal(b, a) for b, a in zip(before, with_storage))


@pytest.mark.parametrize("alpha", [float("nan"), 0.0, -0.1, 1.5, float("inf")])
def test_rejects_alpha_outside_unit_interval(alpha):
    slow, fast = random_lists([(4,)], torch.float32, torch.float32)
    rejected(slow, fast, alpha, ValueError, r"alpha must be in \(0, 1\]")


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_finds_shared_memory_whatever_the_order_of_the_lists(order):
    # Views of one buffer, so that the order of the lists is the order of their addresses.
    base = torch.randn(2, 50, 8)
    slow, fast = list(base[0].unbind()), list(base[1].unbind())
    permutation = {
        "ascending": list(range(50)),
        "descending": list(range(49, -1, -1)),
        "shuffled": torch.randperm(50).tolist(),
    }[order]
    slow, fast = [slow[i] for i in permutation], [fast[i] for i in permutation]
    slow_ref, fast_ref = expected(slow, fast, 0.5)
    op(slow, fast, 0.5)  # disjoint: accepted, whatever the order
    assert_bitwise(slow, slow_ref)
    assert_bitwise(fast, fast_ref)
    at = permutation.index(17)
    fast[at] = base[0, 17:19].flatten()[4:12]  # half of slow[at] and half of its neighbour
    rejected(slow, fast, 0.5, ValueError, rf"(fast\[{at}\] and slow|slow\[\d+\] and fast\[{at}\])")


def fake_call(slow, fast, alpha):
    """The op as torch.compile traces it: on fake tensors (views keep their bases), where only
    its meta kernel runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        op([mode.from_tensor(t) for t in slow], [mode.from_tensor(t) for t in fast], alpha)


def test_the_fake_kernel_validates_as_the_kernels_do():
    slow, fast = random_lists([(4,), (4, 3)], torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"slow\[1\] has shape \[4, 3\] but fast\[1\] has shape"):
        fake_call(slow, [fast[0], torch.randn(3, 4)], 0.5)
    with pytest.raises(TypeError, match=r"unsupported dtype pair at index 0"):
        fake_call([slow[0].double()], [fast[0]], 0.5)
    base = torch.randn(10)
    with pytest.raises(ValueError, match=r"fast\[0\] and fast\[1\] share memory"):
        fake_call([torch.randn(4), torch.randn(4)], [base[:4], base[3:7]], 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in"):
        fake_call(slow, fast, 1.5)
    fake_call([torch.randn(4), torch.randn(4)], [base[:4], base[4:8]], 0.5)  # disjoint views


def test_arguments_of_the_wrong_python_type_are_named():
    t = torch.randn(3)
    for slow, fast, alpha, match in [
        ([t], [1.0], 0.5, r"fast\[0\] is a float, not a tensor"),
        ([t], [None], 0.5, r"fast\[0\] is a NoneType, not a tensor"),
        ([t, t.clone()], [t.clone(), None], 0.5, r"fast\[1\] is a NoneType"),
        (t, [t.clone()], 0.5, r"slow must be a list of tensors, got Tensor"),
        ([t], [t.clone()], "0.5", r"alpha must be a float, got str"),
        ([t], [t.clone()], True, r"alpha must be a float, got bool"),
    ]:
        with pytest.raises(TypeError, match=match):
            lookahead_cuda.lookahead_update_(slow, fast, alpha)


def test_empty_lists_are_validated_too():
    op([], [], 0.5)
    lookahead_cuda.lookahead_update_([], [], 0.5)
    for call in (op, lookahead_cuda.lookahead_update_):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 2"):
            call([], [], 2.0)


def test_rejects_sparse_csr_tensors():
    slow, fast = random_lists([(4, 4)], torch.float32, torch.float32)
    rejected(slow, [fast[0].to_sparse_csr()], 0.5, TypeError, r"fast\[0\] has layout SparseCsr")


def test_rejects_self_overlapping_strided_views():
    base = torch.randn(20)
    slow, _ = random_lists([(3, 3)], torch.float32, torch.float32)
    overlapping = base.as_strided((3, 3), (1, 1))  # element (i, j) at offset i + j
    rejected(slow, [overlapping], 0.5, ValueError, r"fast\[0\] has elements that share memory")
    rejected([overlapping], [torch.randn(3, 3)], 0.5, ValueError, r"slow\[0\] has elements")


@pytest.mark.parametrize("case", ["1-d", "2-d", "strides that interleave"])
def test_accepts_disjoint_interleaved_views(case):
    base = torch.randn(40, 30)
    if case == "1-d":
        flat = base.flatten()
        slow, fast = [flat[::2]], [flat[1::2]]
    elif case == "2-d":
        slow, fast = [base[:, ::2], base[:20, 1::2]], [base[20:, 1::2], torch.randn(40, 15)]
        slow, fast = [slow[0][:20], slow[1]], [fast[0], fast[1][:20]]
    else:
        # Strides (2, 3) over sizes (3, 2): offsets {0, 2, 4, 3, 5, 7}, no two alike, though the
        # strides do not nest; the other list fills the gaps.
        flat = base.flatten()
        slow, fast = [flat.as_strided((3, 2), (2, 3))], [flat.as_strided((3, 2), (2, 3), 100)]
    slow_ref, fast_ref = expected(slow, fast, 0.3)
    op(slow, fast, 0.3)
    assert_bitwise(slow, slow_ref)
    assert_bitwise(fast, fast_ref)


def test_refuses_to_guess_about_huge_interleaved_views():
    flat = torch.randn(2 * (1 << 22) + 2)
    rejected([flat[::2]], [flat[1::2]], 0.5, ValueError, r"cannot verify that slow\[0\] and fast")


# -- the eager entry point: the same op, declined where torch.ops must see the call --------------


class RecordingFunctionMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


class RecordingDispatchMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


class LoggingTensor(torch.Tensor):
    """A subclass with its own __torch_function__, which only torch.ops honours."""

    calls: ClassVar[list] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_eager_entry_point_takes_parameters():
    slow, fast = random_lists([(4,), (3, 5)], torch.float32, torch.float32)
    fast = [torch.nn.Parameter(f, requires_grad=False) for f in fast]
    slow_ref, fast_ref = expected(slow, fast, 0.5)
    eager(slow, fast, 0.5)
    assert_bitwise(slow, slow_ref)
    assert_bitwise(fast, fast_ref)


@pytest.mark.parametrize("case", ["subclass", "not a tensor", "alpha tensor", "function mode"])
def test_eager_entry_point_declines_what_torch_ops_must_handle(case):
    slow, fast = random_lists([(4,), (4,)], torch.float32, torch.float32)
    before = [t.clone() for t in slow + fast]
    alpha = 0.5
    mode = RecordingFunctionMode() if case == "function mode" else None
    if case == "subclass":
        fast[1] = fast[1].as_subclass(LoggingTensor)
    elif case == "not a tensor":
        fast[1] = None
    elif case == "alpha tensor":
        alpha = torch.tensor(0.5)
    if mode is None:
        assert not _C.try_lookahead_update_(slow, fast, alpha)
    else:
        with mode:
            assert not _C.try_lookahead_update_(slow, fast, alpha)
    for b, t in zip(before, slow + fast):
        assert t is None or torch.equal(b, t)


def test_wrapper_honours_torch_function_overrides():
    slow, fast = random_lists([(4,), (4,)], torch.float32, torch.float32)
    slow_ref, fast_ref = expected(slow, fast, 0.5)
    LoggingTensor.calls.clear()
    fast[0] = fast[0].as_subclass(LoggingTensor)
    lookahead_cuda.lookahead_update_(slow, fast, 0.5)
    assert op in LoggingTensor.calls
    with RecordingFunctionMode() as mode:
        lookahead_cuda.lookahead_update_(slow, fast, 0.5)
    assert op in mode.calls
    expected_twice = expected(slow_ref, fast_ref, 0.5)
    assert_bitwise(slow, expected_twice[0])
    assert_bitwise([f.as_subclass(torch.Tensor) for f in fast], expected_twice[1])


def test_eager_entry_point_goes_through_the_dispatcher():
    slow, fast = random_lists([(4,), (4,)], torch.float32, torch.float32)
    with RecordingDispatchMode() as mode:
        eager(slow, fast, 0.5)
    assert mode.calls == [op.default]
    with torch.profiler.profile() as profile:
        eager(slow, fast, 0.5)
    assert "lookahead_cuda::lookahead_update_" in [event.name for event in profile.events()]
    with pytest.raises(ValueError, match=r"fast\[1\] requires grad"):
        eager(slow, [fast[0], fast[1].requires_grad_()], 0.5)
