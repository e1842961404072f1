"""An independent float64 oracle for MXFP4 block quantization (tests only).

Written differently from jax_mxfp4.formats on purpose: exact float64
arithmetic (frexp, division by powers of two, distance to the E2M1 grid)
instead of integer threshold comparisons on bit patterns. Every float32,
bfloat16 and float16 value, and every quotient by a power of two used here, is
exact in float64, so agreement between the two is a real check of the rules in
formats.py's docstring.
"""

from __future__ import annotations

import math

import numpy as np

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def round_to_e2m1_magnitude(q: float) -> int:
    """Nearest E2M1 magnitude code to q >= 0, ties to the even code, saturating at 6."""
    if q >= 6.0:
        return 7
    dist = np.abs(GRID - q)
    best = np.flatnonzero(dist == dist.min())
    if len(best) == 1:
        return int(best[0])
    return int(best[0] if best[0] % 2 == 0 else best[1])


def block_exponent(amax: float, rounding: str) -> int:
    if amax == 0.0:
        return -127
    mant, exp = math.frexp(amax)  # amax = mant * 2**exp, mant in [0.5, 1)
    floor_log2 = exp - 1
    if rounding == "floor":
        e = floor_log2 - 2
    elif rounding == "rceil":
        e = floor_log2 - 2
        while 6.0 * 2.0**e < amax:
            e += 1
        while e > -1000 and 6.0 * 2.0 ** (e - 1) >= amax:
            e -= 1
    else:
        raise ValueError(rounding)
    return max(-127, min(127, e))


def quantize_block(values: np.ndarray, rounding: str) -> tuple[list[int], int]:
    """values: 32 float64 numbers (exact copies of the inputs). Returns (codes, scale byte)."""
    if not np.all(np.isfinite(values)):
        return [0] * len(values), 0xFF
    amax = float(np.max(np.abs(values)))
    e = block_exponent(amax, rounding)
    codes = []
    for v in values:
        sign = 8 if math.copysign(1.0, v) < 0 else 0
        codes.append(sign | round_to_e2m1_magnitude(abs(v) / 2.0**e))
    return codes, e + 127


def quantize(x: np.ndarray, rounding: str) -> tuple[np.ndarray, np.ndarray]:
    """x[..., K] (any float dtype) -> (codes uint8[..., K], scales uint8[..., K/32])."""
    x64 = np.asarray(x).astype(np.float64)
    k = x64.shape[-1]
    flat = x64.reshape(-1, k // 32, 32)
    codes = np.zeros(flat.shape, np.uint8)
    scales = np.zeros(flat.shape[:2], np.uint8)
    for i in range(flat.shape[0]):
        for j in range(flat.shape[1]):
            c, s = quantize_block(flat[i, j], rounding)
            codes[i, j] = c
            scales[i, j] = s
    return codes.reshape(x64.shape), scales.reshape(*x64.shape[:-1], k // 32)


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 values of codes[..., K] with scales[..., K/32] (0xFF -> NaN)."""
    mag = GRID[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    s = np.repeat(scales.astype(np.float64), 32, axis=-1)
    out = mag * np.exp2(s - 127.0)
    return np.where(np.repeat(scales, 32, axis=-1) == 0xFF, np.nan, out)
