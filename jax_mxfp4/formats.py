"""MXFP4 element formats and block quantization math: the reference definition.

Formats (OCP Microscaling Formats (MX) Specification v1.0, sections 5 and 6):

* **E2M1** (FP4): sign bit, 2 exponent bits (bias 1), 1 mantissa bit. The eight
  magnitudes are ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (code 1 is the subnormal 0.5);
  there is no Inf or NaN. Code bit 3 is the sign. Two codes share a byte:
  element ``2i`` of a row in the **low** nibble of byte ``i``, element ``2i+1``
  in the high nibble (as compressed-tensors and vLLM store ``weight_packed``).
* **E8M0**: an unsigned biased exponent, value ``2**(byte - 127)``; byte
  ``0xFF`` is NaN. One scale per 32 consecutive elements along the last axis.

Quantizing one block of 32 (``quantize_blocks`` below):

1. ``amax = max |x|`` over the block.
2. A block exponent ``E`` from ``amax`` by the rounding mode:

   * ``"floor"`` (OCP spec section 6.3): ``E = floor(log2 amax) - 2``, so
     ``amax / 2**E`` lies in ``[4, 8)`` and the top of the range saturates to 6.
   * ``"rceil"`` (NVIDIA's hardware / cuBLAS / TransformerEngine rule):
     ``E = ceil(log2(amax / 6))``; nothing saturates.
   * ``"compressed_tensors"``: bit-identical to what compressed-tensors 0.20
     writes into MXFP4 checkpoints: ``E = floor(log2(amax / 3.5))`` computed
     in the input's dtype, with that library's special cases (float16 zero
     blocks get ``E = 0``; a negative whose quotient underflows in the input
     dtype loses its sign; the comment above ``_ct_block_exponent`` has them
     all). Where the library overflows (amax >= 1.75 * 2**127, float16 >=
     57344) E is capped at the largest exponent it writes for a valid block
     (125; float16: 13), so such blocks saturate instead of becoming garbage.

   ``E`` is clamped to ``[-127, 127]`` and stored as the byte ``E + 127``.
3. Every element becomes the E2M1 code nearest to ``x / 2**E``, ties to even,
   saturating at +-6 (no Inf exists to overflow to).

Special values, for ``"floor"`` and ``"rceil"``:

* **NaN or +-Inf** anywhere in a block makes it a NaN block: scale byte
  ``0xFF`` (E8M0 NaN, so the whole block dequantizes to NaN, spec section 5.2)
  and all 32 codes ``0``. A non-finite value has no meaningful FP4 encoding and
  silently saturating an Inf would hide an overflow upstream.
* **All-zero block**: scale byte ``0`` (``2**-127``), codes ``0``/``8`` by sign.
* **Sign of zero**: the code's sign bit is the input's sign bit, as the GPU's
  ``cvt.rn.satfinite.e2m1x2.f32`` does, so ``-0.0`` and a negative value that
  rounds to zero are code ``0x8``.
* **Subnormal inputs** are exact: everything is computed on the IEEE bit
  patterns with integer arithmetic, never with the FPU, because XLA's CPU
  threads flush subnormals to zero and real bf16 checkpoints contain them.
* **Exponent clamp**: blocks with ``amax < 2**-125`` (``floor``) hit the lower
  clamp ``E = -127``; their elements are still rounded against ``2**-127``.
  The upper clamp cannot be reached from float32/bfloat16/float16 input.
* **Ties**: ``q = |x| / 2**E`` exactly at a midpoint (0.25, 0.75, 1.25, 1.75,
  2.5, 3.5, 5) rounds to the even code (0, 1, 1, 2, 2, 4, 4).

The C++ twin of this module is ``csrc/mxfp4.h``; the CPU handlers and CUDA
kernels use it and are tested bit for bit against the functions here.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "BLOCK_SIZE",
    "E2M1_MAX",
    "E2M1_VALUES",
    "E8M0_BIAS",
    "E8M0_NAN",
    "InputDType",
    "Rounding",
    "SUPPORTED_INPUT_DTYPES",
    "dequantize_codes",
    "e8m0_to_float32",
    "f32_bits",
    "input_dtype_code",
    "pack_nibbles",
    "parse_rounding",
    "quantize_blocks",
    "unpack_nibbles",
]

BLOCK_SIZE = 32
E2M1_MAX = 6.0
E8M0_BIAS = 127
E8M0_NAN = 0xFF
MIN_SCALE_EXPONENT = -127
MAX_SCALE_EXPONENT = 127

#: Value of each 4-bit E2M1 code (index = code; bit 3 is the sign).
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)

SUPPORTED_INPUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_F32_ABS_MASK = 0x7FFFFFFF
_F32_INF = 0x7F800000
_F32_QNAN = 0x7FC00000

# Decision thresholds t * 2**(E-2) for t below, compared strictly (q > t/4) or
# not (q >= t/4); the alternation makes ties round to the even code.
_THRESHOLD_T = (1, 3, 5, 7, 10, 14, 20)
_THRESHOLD_STRICT = (True, False, True, False, True, False, True)


class Rounding(enum.IntEnum):
    """How a block's shared exponent is chosen (values match csrc/mxfp4.h)."""

    FLOOR = 0
    RCEIL = 1
    COMPRESSED_TENSORS = 2

    @property
    def option(self) -> str:
        return self.name.lower()


class InputDType(enum.IntEnum):
    """Input element types of the quantizer (values match csrc/mxfp4.h)."""

    F32 = 0
    BF16 = 1
    F16 = 2


def parse_rounding(rounding: str | Rounding) -> Rounding:
    """Returns the ``Rounding`` named by ``rounding`` or raises ``ValueError``."""
    if isinstance(rounding, Rounding):
        return rounding
    names = [r.option for r in Rounding]
    if isinstance(rounding, str) and rounding in names:
        return Rounding[rounding.upper()]
    raise ValueError(
        f"rounding={rounding!r} is not a rounding mode; use one of {names} "
        "('floor' is the OCP rule, 'rceil' never saturates, 'compressed_tensors' "
        "matches compressed-tensors checkpoints)."
    )


def input_dtype_code(dtype) -> InputDType:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return InputDType.F32
    if dtype == jnp.bfloat16:
        return InputDType.BF16
    if dtype == jnp.float16:
        return InputDType.F16
    raise ValueError(
        f"dtype {dtype} is not supported; MXFP4 quantization takes float32, "
        "bfloat16 or float16 (cast with x.astype(jnp.bfloat16))."
    )


# ---------------------------------------------------------------------------
# Bit-level helpers (jnp, integer only: exact under flush-to-zero).


def _u32(v):
    return jnp.asarray(v, dtype=jnp.uint32)


def _floor_log2_u32(v):
    """floor(log2 v) for v > 0 (int32)."""
    return 31 - lax.clz(v.astype(jnp.uint32)).astype(jnp.int32)


def _f16_bits_to_f32_bits(h):
    h = h.astype(jnp.uint32)
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    inf_nan = sign | _F32_INF | (mant << 13)
    normal = sign | ((exp + 112) << 23) | (mant << 13)
    lz = _floor_log2_u32(jnp.maximum(mant, 1))
    sub_exp = (lz - 24 + 127).astype(jnp.uint32)
    subnormal = sign | (sub_exp << 23) | ((mant << (23 - lz).astype(jnp.uint32)) & 0x7FFFFF)
    return jnp.where(
        exp == 0x1F, inf_nan, jnp.where(exp != 0, normal, jnp.where(mant == 0, sign, subnormal))
    )


def f32_bits(x) -> jnp.ndarray:
    """Exact float32 bit patterns (uint32) of a float32/bfloat16/float16 array."""
    dtype = jnp.dtype(x.dtype)
    if dtype == jnp.float32:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if dtype == jnp.bfloat16:
        return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    if dtype == jnp.float16:
        return _f16_bits_to_f32_bits(lax.bitcast_convert_type(x, jnp.uint16))
    input_dtype_code(dtype)  # raises the standard message
    raise AssertionError("unreachable")


def _f32_bits_of_int_times_pow2(t, p):
    """Float32 bits of ``t * 2**p`` (``t`` a small positive int), Inf on overflow.

    Exact for ``p >= -149``; below the subnormal grid the value is floored.
    """
    t = _u32(t)
    p = jnp.asarray(p, dtype=jnp.int32)
    lz = _floor_log2_u32(t)
    exp = p + lz
    normal = ((exp + 127).astype(jnp.uint32) << 23) | ((t << (23 - lz).astype(jnp.uint32)) & 0x7FFFFF)
    shift = p + 149  # value in units of 2**-149; below that grid: floored (0 for a power of two)
    subnormal = jnp.where(shift >= 0, t << jnp.clip(shift, 0, 31).astype(jnp.uint32),
                          t >> jnp.clip(-shift, 0, 31).astype(jnp.uint32))
    subnormal = jnp.where(shift <= -32, _u32(0), subnormal)
    return jnp.where(exp > 127, _u32(_F32_INF), jnp.where(exp >= -126, normal, subnormal))


def _f32_bits_to_bf16(bits):
    """Round-to-nearest-even float32 bits -> bfloat16 array (NaN stays NaN)."""
    is_nan = (bits & _F32_ABS_MASK) > _F32_INF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = jnp.where(is_nan, (bits >> 16) | 0x40, rounded).astype(jnp.uint16)
    return lax.bitcast_convert_type(out, jnp.bfloat16)


def _f32_bits_to_f16(bits):
    """Round-to-nearest-even float32 bits -> float16 array, with overflow to Inf."""
    sign = ((bits >> 16) & 0x8000).astype(jnp.uint32)
    a = bits & _F32_ABS_MASK
    exp = (a >> 23).astype(jnp.int32) - 127
    mant = a & 0x7FFFFF
    # Normal half.
    h = ((jnp.maximum(exp + 15, 0).astype(jnp.uint32)) << 10) | (mant >> 13)
    rem = mant & 0x1FFF
    h = h + ((rem > 0x1000) | ((rem == 0x1000) & ((h & 1) == 1))).astype(jnp.uint32)
    # Subnormal half: value in units of 2**-24.
    full = mant | 0x800000
    shift = jnp.clip(-exp - 1, 1, 31).astype(jnp.uint32)
    q = full >> shift
    srem = full & ((_u32(1) << shift) - 1)
    half = _u32(1) << (shift - 1)
    sub = q + ((srem > half) | ((srem == half) & ((q & 1) == 1))).astype(jnp.uint32)
    mag = jnp.where(
        a > _F32_INF,
        _u32(0x7E00),
        jnp.where(
            a >= 0x477FF000,
            _u32(0x7C00),
            jnp.where(exp >= -14, h, jnp.where(exp < -25, _u32(0), sub)),
        ),
    )
    return lax.bitcast_convert_type((sign | mag).astype(jnp.uint16), jnp.float16)


def _bits_to_dtype(bits, dtype):
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return lax.bitcast_convert_type(bits, jnp.float32)
    if dtype == jnp.bfloat16:
        return _f32_bits_to_bf16(bits)
    if dtype == jnp.float16:
        return _f32_bits_to_f16(bits)
    raise ValueError(
        f"dtype={dtype} is not a dequantization dtype; use jnp.float32, jnp.bfloat16 or jnp.float16."
    )


# ---------------------------------------------------------------------------
# Block exponents.


def _normalised_log2_and_frac(amax_bits):
    """(floor(log2 amax), the 23 significand bits after the leading one) of amax > 0."""
    exp_field = (amax_bits >> 23).astype(jnp.int32)
    lz = _floor_log2_u32(jnp.maximum(amax_bits, 1))
    log2_normal = exp_field - 127
    log2_sub = lz - 149
    frac_sub = (amax_bits << (23 - lz).astype(jnp.uint32)) & 0x7FFFFF
    is_normal = exp_field != 0
    return (
        jnp.where(is_normal, log2_normal, log2_sub),
        jnp.where(is_normal, amax_bits & 0x7FFFFF, frac_sub),
    )


def _floor_rceil_exponent(amax_bits, rounding: Rounding):
    log2_floor, frac23 = _normalised_log2_and_frac(amax_bits)
    e = log2_floor - 2
    if rounding == Rounding.RCEIL:
        # amax / 2**(f-2) > 6 exactly when the significand exceeds 1.5.
        e = e + (frac23 > 0x400000).astype(jnp.int32)
    return jnp.where(amax_bits == 0, MIN_SCALE_EXPONENT, e)


# compressed-tensors 0.20 (quantization/utils/mxfp_utils.py round_to_power_2 +
# generate_mx_scales; compressors/mx_utils.py compress_mx_scale; the codes from
# quantization/utils/fp4_utils.py cast_to_fp4 and nvfp4/helpers.py
# pack_fp4_to_uint8) computes everything in the weight's dtype W. Its scale is
# 2**X with X = floor(log2(amax / 3.5)) (it rounds amax up to the next power
# of two when the significand is >= 1.75 by adding to and masking the float
# bits), the stored byte X + 127 clamped at 0. Consequences in W:
#  * float32/bfloat16: zero and subnormal amax give byte 0;
#  * float16: amax in [0.75, 1) * 2**-14 gives X = -16; amax below that (zero
#    included) makes the scale 0, which the library replaces by 1 (X = 0);
#  * amax >= 1.75 * 2**127 (float16: 57344) overflows the bit trick to Inf and
#    the library writes garbage (byte 127, all codes 0, on x86). We cap X at the
#    largest exponent the library itself writes for a valid block (125;
#    float16: 13): such blocks saturate to +-6 * 2**X and stay finite.
#  * Elements: q = x / 2**X rounded in W (exact down to W's subnormals), then
#    round-half-even on the E2M1 grid. The sign bit is set for q < 0 strictly:
#    -0.0, and negatives whose quotient underflows to -0.0 in W, give code 0x0.
#  * NaN or Inf in a block: a NaN block, as for floor/rceil (the library's
#    output there depends on NaN payloads and is not reproducible).
_CT_MAX_EXPONENT = {InputDType.F32: 125, InputDType.BF16: 125, InputDType.F16: 13}
# Quotients at or below 2**this round to zero in W (half the smallest subnormal).
_HALF_MIN_SUBNORMAL_EXPONENT = {InputDType.F32: -150, InputDType.BF16: -134, InputDType.F16: -25}


def _ct_block_exponent(amax_bits, dtype):
    code = input_dtype_code(dtype)
    exp_field = (amax_bits >> 23).astype(jnp.int32)
    rounds_up = ((amax_bits & 0x7FFFFF) >= 0x600000).astype(jnp.int32)  # significand >= 1.75
    formula = exp_field - 127 - 2 + rounds_up
    if code == InputDType.F16:
        e = jnp.where(amax_bits < 0x38400000, 0, jnp.where(amax_bits < 0x38800000, -16, formula))
    else:
        e = jnp.where(exp_field == 0, MIN_SCALE_EXPONENT, jnp.maximum(formula, MIN_SCALE_EXPONENT))
    return jnp.minimum(e, _CT_MAX_EXPONENT[code])


def _ct_quantize_blocks(blocks, amax_bits, dtype):
    abs_bits = blocks & _F32_ABS_MASK
    nan_block = amax_bits >= _F32_INF
    exponent = _ct_block_exponent(amax_bits, dtype)
    scale_bytes = jnp.where(nan_block, E8M0_NAN, exponent + E8M0_BIAS).astype(jnp.uint8)
    magnitude = _e2m1_magnitude_codes(abs_bits, exponent[..., None])
    sign_limit = _f32_bits_of_int_times_pow2(
        1, exponent[..., None] + _HALF_MIN_SUBNORMAL_EXPONENT[input_dtype_code(dtype)])
    negative = ((blocks >> 31) == 1) & (abs_bits > sign_limit)
    codes = jnp.where(negative, _u32(8), _u32(0)) | magnitude
    codes = jnp.where(nan_block[..., None], _u32(0), codes)
    return codes.astype(jnp.uint8).reshape(*blocks.shape[:-2], -1), scale_bytes


# ---------------------------------------------------------------------------
# Quantization and dequantization of whole blocks.


@functools.partial(jax.jit, static_argnames=("rounding",))
def quantize_blocks(x, rounding: str | Rounding = "floor"):
    """Quantizes ``x[..., K]`` (K % 32 == 0) block by block.

    Returns ``(codes, scale_bytes)``: ``codes`` is uint8 ``[..., K]`` holding one
    4-bit E2M1 code per element (not yet packed), ``scale_bytes`` is uint8
    ``[..., K // 32]``. Pure jnp on integer bit patterns; see the module
    docstring for the rules and every special value.
    """
    rounding = parse_rounding(rounding)
    dtype = jnp.dtype(x.dtype)
    input_dtype_code(dtype)
    k = x.shape[-1]
    if k % BLOCK_SIZE:
        raise ValueError(f"the last axis of x must be a multiple of {BLOCK_SIZE}; got shape {x.shape}.")
    bits = f32_bits(x)
    blocks = bits.reshape(*x.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)
    abs_bits = blocks & _F32_ABS_MASK
    amax_bits = jnp.max(abs_bits, axis=-1)

    if rounding == Rounding.COMPRESSED_TENSORS:
        return _ct_quantize_blocks(blocks, amax_bits, dtype)

    nan_block = amax_bits >= _F32_INF
    exponent = jnp.clip(_floor_rceil_exponent(amax_bits, rounding), MIN_SCALE_EXPONENT, MAX_SCALE_EXPONENT)
    scale_bytes = jnp.where(nan_block, E8M0_NAN, exponent + E8M0_BIAS).astype(jnp.uint8)
    magnitude = _e2m1_magnitude_codes(abs_bits, exponent[..., None])
    codes = ((blocks >> 28) & 8) | magnitude
    codes = jnp.where(nan_block[..., None], _u32(0), codes)
    return codes.astype(jnp.uint8).reshape(x.shape), scale_bytes


def _e2m1_magnitude_codes(abs_bits, exponent):
    """Round |x| / 2**exponent to an E2M1 magnitude code (0..7), ties to even, saturating."""
    code = jnp.zeros(abs_bits.shape, jnp.uint32)
    for t, strict in zip(_THRESHOLD_T, _THRESHOLD_STRICT):
        threshold = _f32_bits_of_int_times_pow2(t, exponent - 2)
        passed = abs_bits > threshold if strict else abs_bits >= threshold
        code = code + passed.astype(jnp.uint32)
    return code


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_codes(codes, scale_bytes, dtype=jnp.bfloat16):
    """Exact values ``E2M1(code) * 2**(scale - 127)`` of ``codes[..., K]`` with
    ``scale_bytes[..., K // 32]``, in ``dtype`` (rounded to nearest even there:
    exact for float32 and bfloat16; float16 overflows to Inf / rounds its small
    values to its subnormal grid). Scale byte 0xFF gives NaN for the whole block.
    """
    codes = jnp.asarray(codes).astype(jnp.uint32)
    k = codes.shape[-1]
    scales = jnp.repeat(jnp.asarray(scale_bytes).astype(jnp.int32), BLOCK_SIZE, axis=-1)
    scales = scales.reshape(*codes.shape[:-1], k)
    mag = codes & 7
    sign = (codes & 8) << 28
    # Magnitude t * 2**p from the code's fields e (2 bits) and m: e = 0 is the
    # subnormal m * 0.5 (t = 1, p = -1); e > 0 is (1 + m/2) * 2**(e-1), i.e.
    # t = 2 + m, p = e - 2. Arithmetic, not a table lookup, so it partitions
    # like any elementwise op under sharding.
    e = (mag >> 1).astype(jnp.int32)
    m = mag & 1
    t = jnp.where(e == 0, _u32(1), 2 + m)
    p = jnp.where(e == 0, -1, e - 2)
    value = _f32_bits_of_int_times_pow2(t, p + scales - E8M0_BIAS)
    bits = jnp.where(mag == 0, _u32(0), value) | sign
    bits = jnp.where(scales == E8M0_NAN, _u32(_F32_QNAN), bits)
    return _bits_to_dtype(bits, dtype)


def e8m0_to_float32(scale_bytes) -> jnp.ndarray:
    """E8M0 bytes as float32 values ``2**(byte - 127)`` (0xFF -> NaN), exact."""
    b = jnp.asarray(scale_bytes).astype(jnp.int32)
    bits = jnp.where(
        b == E8M0_NAN,
        _u32(_F32_QNAN),
        jnp.where(b == 0, _u32(0x00400000), (b.astype(jnp.uint32) << 23)),
    )
    return lax.bitcast_convert_type(bits, jnp.float32)


# ---------------------------------------------------------------------------
# Nibble packing.


def pack_nibbles(codes):
    """Packs uint8 codes ``[..., K]`` (K even) into bytes ``[..., K // 2]``;
    element 2i goes to the low nibble."""
    codes = jnp.asarray(codes).astype(jnp.uint8)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)


def unpack_nibbles(packed):
    """Inverse of ``pack_nibbles``: uint8 ``[..., K // 2]`` -> codes ``[..., K]``."""
    packed = jnp.asarray(packed).astype(jnp.uint8)
    low = packed & 0xF
    high = packed >> 4
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)

