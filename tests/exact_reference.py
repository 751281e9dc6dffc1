"""What the CUDA kernels must compute, written independently of them: numpy with each fused
multiply-add rounded once, exactly (the GPU's fma), and exact rational arithmetic where the fast
paths' proofs do not hold. The CPU build of torch cannot be the reference: its vectorised lerp
rounds the weight-1 branch's zeros differently, and its non-FMA builds round twice.

- float32 math: a product of two float32 is exact in float64; TwoSum gives the float64 sum's exact
  error, and rounding that sum to odd before the cast to float32 makes the final rounding correct.
- float64 math: Boldo and Melquiond's emulation (TwoProduct by Veltkamp splitting, TwoSum, a sum
  rounded to odd, one last rounding), for operands where splitting neither overflows nor underflows;
  `fractions.Fraction` for the others.
- float16 by numpy's conversion, bfloat16 by its round-to-nearest-even on the float32 bits; both
  checked against exact rounding in the tests."""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch


class Format(NamedTuple):
    precision: int  # significand bits, the implicit one included
    min_exponent: int
    max_exponent: int


FLOAT64 = Format(53, -1022, 1023)
FLOAT32 = Format(24, -126, 127)
FLOAT16 = Format(11, -14, 15)
BFLOAT16 = Format(8, -126, 127)


def round_fraction(x: Fraction, fmt: Format) -> float:
    """x rounded to nearest, ties to even, in fmt (subnormals and overflow included); x != 0."""
    sign = -1.0 if x < 0 else 1.0
    x = abs(x)
    exponent = x.numerator.bit_length() - x.denominator.bit_length()
    if Fraction(2) ** exponent > x:
        exponent -= 1
    quantum = Fraction(2) ** (max(exponent, fmt.min_exponent) - fmt.precision + 1)
    units, rest = divmod(x, quantum)
    if rest * 2 > quantum or (rest * 2 == quantum and units % 2 == 1):
        units += 1
    largest = (2 - Fraction(2) ** (1 - fmt.precision)) * Fraction(2) ** fmt.max_exponent
    value = units * quantum
    return sign * (float("inf") if value > largest else float(value))


def fma_exact(a: float, b: float, c: float, fmt: Format) -> float:
    """fma(a, b, c) in fmt, from exact rational arithmetic and IEEE 754's rules for the rest."""
    if not (np.isfinite(a) and np.isfinite(b)):
        return a * b + c  # the product is inf or NaN, exactly as in the fused operation
    if not np.isfinite(c):
        return c
    x = Fraction(a) * Fraction(b) + Fraction(c)
    if x != 0:
        return round_fraction(x, fmt)
    product_negative = np.signbit(a) != np.signbit(b)
    if a * b == 0 and c == 0 and product_negative and np.signbit(c):
        return -0.0
    return 0.0


def _round_to_odd(s: np.ndarray, error: np.ndarray) -> np.ndarray:
    """s + error (s the nearest float64, error exact) rounded to odd: s if exact or odd, else its
    neighbour toward the error."""
    bits = s.view(np.int64)
    inexact_even = (error != 0) & np.isfinite(s) & (bits & 1 == 0)
    return np.where(inexact_even, np.nextafter(s, np.copysign(np.inf, error)), s)


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Elementwise fmaf on float32 operands (broadcast), rounded once."""
    a, b, c = (np.asarray(x, dtype=np.float32).astype(np.float64) for x in (a, b, c))
    with np.errstate(all="ignore"):
        product = a * b  # exact: 24 + 24 significand bits
        s, error = _two_sum(product, c)
        return _round_to_odd(s, np.where(np.isfinite(s), error, 0)).astype(np.float32)


_SPLITTER = 2.0**27 + 1


def _two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = _SPLITTER * x
        high = t - (t - x)
        return high, x - high

    product = a * b
    a_high, a_low = split(a)
    b_high, b_low = split(b)
    error = ((a_high * b_high - product) + a_high * b_low + a_low * b_high) + a_low * b_low
    return product, error


def fma64(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Elementwise fma on float64 operands (broadcast), rounded once."""
    a, b, c = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (a, b, c)))
    with np.errstate(all="ignore"):
        product, product_error = _two_product(a, b)
        high, low = _two_sum(c, product)
        tail, tail_error = _two_sum(low, product_error)
        result = high + _round_to_odd(tail, tail_error)
    magnitude = np.abs(np.stack([a, b]))
    # Where splitting overflows or the product's error underflows, and results too small for the
    # proof (or zero, whose sign takes IEEE's rule): exact arithmetic.
    safe = (
        np.isfinite(a)
        & np.isfinite(b)
        & np.isfinite(c)
        & np.all((magnitude < 2.0**500) & ((magnitude > 2.0**-450) | (magnitude == 0)), axis=0)
        & ((np.abs(c) < 2.0**1000) & ((np.abs(c) > 2.0**-900) | (c == 0)))
        & (np.abs(result) > 2.0**-900)
    )
    for i in zip(*np.nonzero(~safe)):
        result[i] = fma_exact(float(a[i]), float(b[i]), float(c[i]), FLOAT64)
    return result


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fma in the operands' precision: float32 or float64."""
    return fma64(a, b, c) if np.result_type(a, b, c) == np.float64 else fma32(a, b, c)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 (as uint16 bits), to nearest even; NaN stays NaN."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def opmath(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values, exactly, in its math type: float64 for float64, float32 otherwise."""
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
        return (bits << 16).view(np.float32)
    values = t.numpy()
    return values if values.dtype == np.float64 else values.astype(np.float32)


def rounded(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Math-type values rounded to dtype, as a CPU tensor."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(bfloat16_bits(x).view(np.int16)).view(torch.bfloat16)
    numpy_dtype = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}
    with np.errstate(over="ignore"):  # to inf, as the kernels' conversions do
        return torch.from_numpy(np.asarray(x).astype(numpy_dtype[dtype]))


def math_type(dtype: torch.dtype) -> type:
    return np.float64 if dtype == torch.float64 else np.float32


def sync(slow: torch.Tensor, fast: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(slow, fast) after a sync on CUDA: torch's CUDA lerp, whose multiply-add nvcc fuses,
    |w| < 0.5 ? fma(w, end - start, start) : fma(-(1 - w), end - start, end) with w the weight in
    the math type; slow gets it rounded to its dtype, fast that value rounded to its own."""
    start, end = opmath(slow), opmath(fast).astype(math_type(slow.dtype))
    w = math_type(slow.dtype)(alpha)
    with np.errstate(all="ignore"):
        diff = end - start
        result = fma(w, diff, start) if abs(w) < 0.5 else fma(-(1 - w), diff, end)
    new_slow = rounded(result, slow.dtype)
    return new_slow, restore(new_slow, fast)


def momentum_sync(
    slow: torch.Tensor,
    fast: torch.Tensor,
    momentum: torch.Tensor,
    lr: float,
    mu: float,
    nesterov: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slow, fast, momentum) after an outer-momentum sync, each multiply-add fused: with
    d = slow - fast, b = mu * b + d; slow -= lr * (nesterov ? d + mu * b : b); fast = slow."""
    kind = math_type(slow.dtype)
    start = opmath(slow)
    lr_, mu_ = kind(lr), kind(mu)
    with np.errstate(all="ignore"):
        pseudo_gradient = start - opmath(fast).astype(kind)
        buffer = fma(mu_, opmath(momentum), pseudo_gradient)
        step = fma(mu_, buffer, pseudo_gradient) if nesterov else buffer
        result = fma(-lr_, step, start)
    new_slow = rounded(result, slow.dtype)
    return new_slow, restore(new_slow, fast), rounded(buffer, slow.dtype)


def restore(slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
    """fast after restarting from slow: slow rounded to fast's dtype."""
    return rounded(opmath(slow), fast.dtype)


def bits(t: torch.Tensor) -> np.ndarray:
    """The bit patterns of a CPU floating tensor, as integers."""
    integer = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(integer).numpy()


QUANTIZATION_BLOCK = 1024


def quantize(slow: torch.Tensor, fast: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit pseudo-gradients p = slow - fast of one contiguous pair (csrc/quantization.h),
    by blocks of 1024 elements: scale = max|p| / 127 (NaN if the block holds one), and
    q = round-half-even(p / max|p| * 127) as int8, 0 where that is NaN (a zero block's 0 / 0)."""
    with np.errstate(all="ignore"):
        start = opmath(slow).reshape(-1)
        p = (start - opmath(fast).reshape(-1).astype(start.dtype)).astype(np.float32)
        q = np.zeros(p.size, np.int8)
        scales = []
        for first in range(0, p.size, QUANTIZATION_BLOCK):
            block = p[first : first + QUANTIZATION_BLOCK]
            magnitude = np.abs(block)
            absmax = np.float32(np.nan) if np.isnan(magnitude).any() else magnitude.max()
            x = block / absmax * np.float32(127)
            q[first : first + QUANTIZATION_BLOCK] = np.where(np.isnan(x), 0, np.rint(x))
            scales.append(absmax / np.float32(127))
    return q, np.array(scales, np.float32)


def dequantize_mean(
    slow: torch.Tensor,
    out_dtype: torch.dtype,
    q_rows: list[np.ndarray],
    scale_rows: list[np.ndarray],
) -> torch.Tensor:
    """slow - the mean of the workers' dequantized blocks (their rows, in order), the sum taken in
    float32 with one rounding per q * scale added; rounded to slow's dtype, then to out_dtype."""
    start = opmath(slow).reshape(-1)
    block_of = np.arange(start.size) // QUANTIZATION_BLOCK
    total = np.zeros(start.size, np.float32)
    with np.errstate(all="ignore"):
        for q, scale in zip(q_rows, scale_rows):
            total = fma32(q.astype(np.float32), scale[block_of], total)
        mean = total / np.float32(len(q_rows))
        new_slow = rounded(start - mean.astype(start.dtype), slow.dtype)
    return restore(new_slow, torch.empty(0, dtype=out_dtype)).view(slow.shape)
