"""The 8-bit pseudo-gradients of DiLoCo's average: quantize_pseudo_gradients_ and
dequantize_mean_ on the CPU (and on CUDA when a GPU is present) against an independent numpy
reference (tests/exact_reference.py), bit for bit."""

import numpy as np
import pytest
import torch
from conftest import DTYPE_PAIRS
from exact_reference import QUANTIZATION_BLOCK, bits, dequantize_mean, quantize
from test_gated_ops import DEVICES

from lookahead_cuda import _C
from lookahead_cuda.ops import dequantize_mean_, quantize_pseudo_gradients_

# Results that depend on the CPU kernels chosen (vector_target.h): run under every capability.
pytestmark = pytest.mark.cpu_capability

SIZES = [1, 5, QUANTIZATION_BLOCK - 1, QUANTIZATION_BLOCK, QUANTIZATION_BLOCK + 1, 3000, 70001]


def pairs(slow_dtype, fast_dtype, sizes=SIZES, device="cpu"):
    slow = [torch.randn(n, dtype=torch.float64).to(device, slow_dtype) for n in sizes]
    fast = [
        (s.double() + 1e-2 * torch.randn(n, dtype=torch.float64, device=device)).to(fast_dtype)
        for s, n in zip(slow, sizes)
    ]
    return slow, fast


def buffers(sizes, device="cpu", workers=None):
    numel = sum(sizes)
    blocks = sum(-(-n // QUANTIZATION_BLOCK) for n in sizes)
    shape = (lambda n: (n,)) if workers is None else (lambda n: (workers, n))
    # Poisoned: every element must be written.
    payload = torch.full(shape(numel), 99, dtype=torch.int8, device=device)
    scales = torch.full(shape(blocks), float("nan"), dtype=torch.float32, device=device)
    return payload, scales


def quantized(slow, fast):
    payload, scales = buffers([s.numel() for s in slow], slow[0].device)
    quantize_pseudo_gradients_(slow, fast, payload, scales)
    return payload, scales


def reference(slow, fast):
    parts = [quantize(s.cpu(), f.cpu()) for s, f in zip(slow, fast)]
    return np.concatenate([q for q, _ in parts]), np.concatenate([s for _, s in parts])


def assert_same_bits(actual: np.ndarray, wanted: np.ndarray):
    nan = np.isnan(wanted)
    assert np.array_equal(np.isnan(actual), nan)
    assert np.array_equal(actual[~nan].view(np.int32), wanted[~nan].view(np.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("threads", [1, 3])
def test_quantize_matches_the_reference_bitwise(device, slow_dtype, fast_dtype, threads):
    slow, fast = pairs(slow_dtype, fast_dtype, device=device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        payload, scales = quantized(slow, fast)
    finally:
        torch.set_num_threads(previous)
    q, s = reference(slow, fast)
    assert np.array_equal(payload.cpu().numpy(), q)
    assert_same_bits(scales.cpu().numpy(), s)


def test_special_values_quantize_as_the_reference_says():
    p = torch.randn(3 * QUANTIZATION_BLOCK, dtype=torch.float64)
    p[5] = float("nan")  # block 0: NaN scale, every value 0
    p[QUANTIZATION_BLOCK + 7] = float("inf")  # block 1: infinite scale
    p[2 * QUANTIZATION_BLOCK :] = 0.0  # block 2: zeros
    p[2 * QUANTIZATION_BLOCK + 3] = 4e-45  # and one subnormal, its own maximum
    slow, fast = [torch.zeros(p.numel())], [(-p).float()]
    payload, scales = quantized(slow, fast)
    q, s = reference(slow, fast)
    assert np.array_equal(payload.numpy(), q)
    assert_same_bits(scales.numpy(), s)
    assert np.isnan(s[0]) and np.isinf(s[1]) and q[2 * QUANTIZATION_BLOCK + 3] == 127


def test_a_round_trip_is_within_half_a_step_of_each_block():
    slow, fast = pairs(torch.float32, torch.float32)
    payload, scales = quantized(slow, fast)
    offset, block = 0, 0
    for s, f in zip(slow, fast):
        p = (s - f).numpy()
        for first in range(0, p.size, QUANTIZATION_BLOCK):
            part = p[first : first + QUANTIZATION_BLOCK]
            scale = scales[block].item()
            back = payload[offset + first : offset + first + part.size].numpy() * scale
            assert np.abs(back - part).max() <= 0.5 * scale * (1 + 1e-6)
            assert np.abs(payload[offset + first : offset + first + part.size].numpy()).max() == 127
            block += 1
        offset += p.size


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("slow_dtype", "fast_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("workers", [1, 3])
def test_dequantize_mean_matches_the_reference_bitwise(device, slow_dtype, fast_dtype, workers):
    slow, _ = pairs(slow_dtype, fast_dtype, device=device)
    sizes = [s.numel() for s in slow]
    rows = [quantized(*pairs(slow_dtype, fast_dtype, device=device)) for _ in range(workers)]
    payloads = torch.stack([r[0] for r in rows])
    scales = torch.stack([r[1] for r in rows])
    out = [torch.full_like(s, float("nan"), dtype=fast_dtype) for s in slow]
    dequantize_mean_(slow, out, payloads, scales)
    offset, block = 0, 0
    for s, o, n in zip(slow, out, sizes):
        blocks = -(-n // QUANTIZATION_BLOCK)
        q_rows = [payloads[w, offset : offset + n].cpu().numpy() for w in range(workers)]
        s_rows = [scales[w, block : block + blocks].cpu().numpy() for w in range(workers)]
        wanted = dequantize_mean(s.cpu(), fast_dtype, q_rows, s_rows)
        assert np.array_equal(bits(o.cpu()), bits(wanted))
        offset, block = offset + n, block + blocks


def test_refuses_what_it_cannot_send():
    slow, fast = pairs(torch.float32, torch.float32, sizes=[10, 2000])
    payload, scales = buffers([10, 2000])
    cases = [
        (payload.float(), scales, TypeError, "payload must be torch.int8"),
        (payload[:-1], scales, ValueError, r"payload must have shape \(2010\)"),
        (payload, scales[:1], ValueError, r"scales must have shape \(3\)"),
        (payload.view(2, -1), scales, ValueError, "payload must have shape"),
    ]
    for bad_payload, bad_scales, error, match in cases:
        with pytest.raises(error, match=match):
            quantize_pseudo_gradients_(slow, fast, bad_payload, bad_scales)
    strided = [slow[0], torch.randn(4000)[::2]]
    with pytest.raises(ValueError, match=r"slow\[1\] and fast\[1\] are not flat arrays"):
        quantize_pseudo_gradients_(strided, [fast[0], torch.randn(2000)], payload, scales)
    with pytest.raises(ValueError, match=r"payloads must have shape \(workers, 2010\)"):
        dequantize_mean_(slow, fast, payload, scales)
    quantize_pseudo_gradients_([], [], payload[:0], scales[:0])  # nothing to send


def test_registered_ops_pass_opcheck_and_take_the_eager_path():
    slow, fast = pairs(torch.float32, torch.bfloat16, sizes=[7, 1500])
    payload, scales = buffers([7, 1500])
    torch.library.opcheck(
        torch.ops.lookahead_cuda.quantize_pseudo_gradients_, (slow, fast, payload, scales)
    )
    assert _C.try_quantize_pseudo_gradients_(slow, fast, payload, scales)
    rows = (payload.unsqueeze(0), scales.unsqueeze(0))
    out = [torch.empty_like(f) for f in fast]
    torch.library.opcheck(torch.ops.lookahead_cuda.dequantize_mean_, (slow, out, *rows))
    assert _C.try_dequantize_mean_(slow, out, *rows)
