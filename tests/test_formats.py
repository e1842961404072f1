"""formats.py (the reference's element math) against the float64 oracle."""

import hypothesis.strategies as st
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given

import oracle
from jax_mxfp4 import formats

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
MODES = ["floor", "rceil"]


def special_blocks(np_dtype):
    """Blocks covering every special case of formats.py's docstring."""
    finfo = ml_dtypes.finfo(np_dtype)
    tiny_sub = float(finfo.smallest_subnormal)
    tiny_norm = float(finfo.smallest_normal)
    big = float(finfo.max)
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 6.0, 7.0, 7.9, -0.25, -0.75, -2.5]
    rows = [
        [0.0] * 32,                                   # all-zero block
        [-0.0] * 32,                                  # all negative zero
        [0.0, -0.0, 1.0, -1.0] * 8,                   # signs of zero with a finite amax
        (ties + [8.0 - 0.0625] + [0.0] * 17)[:32],    # ties at every decision point, amax in [4, 8)
        [x * 4 for x in ties] + [0.0] * 18,           # the same one binade up
        [6.0] + [0.1, -0.1] * 15 + [0.3],             # negatives that round to zero -> 0x8
        [tiny_sub] * 32,                              # smallest subnormal everywhere
        [tiny_sub * i for i in range(32)],            # a subnormal-only block
        [tiny_norm, tiny_sub, -tiny_sub] + [0.0] * 29,
        [big, -big] + [1.0] * 30,                     # largest finite values
        [float("nan")] + [1.0] * 31,                  # NaN poisons the block
        [float("inf")] + [1.0] * 31,                  # Inf too
        [-float("inf")] + [0.0] * 31,
        [1.5 * 2.0**e for e in range(-16, 16)],       # rceil's significand boundary 1.5
        [1.75 * 2.0**e for e in range(-16, 16)],
        [1.5000001 * 2.0**e for e in range(-16, 16)],
    ]
    x = np.array(rows, dtype=np.float64).astype(np_dtype)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", MODES)
def test_special_values_match_oracle(dtype, rounding):
    x = special_blocks(DTYPES[dtype])
    codes, scales = formats.quantize_blocks(jnp.asarray(x), rounding)
    want_codes, want_scales = oracle.quantize(x, rounding)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)
    np.testing.assert_array_equal(np.asarray(codes), want_codes)


def test_special_values_spelled_out():
    """The documented rules on hand-checkable inputs (spec vectors, floor mode)."""
    x = np.zeros(32, np.float32)
    x[:12] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -0.0, -0.1, 0.26]
    codes, scales = formats.quantize_blocks(jnp.asarray(x[None]), "floor")
    # amax = 7: E = floor(log2 7) - 2 = 0 -> byte 127; ties go to the even code.
    assert int(scales[0, 0]) == 127
    assert list(np.asarray(codes[0, :12])) == [0, 2, 2, 4, 4, 6, 6, 7, 7, 8, 8, 1]
    nan_codes, nan_scales = formats.quantize_blocks(jnp.asarray(np.full((1, 32), np.nan, np.float32)), "rceil")
    assert int(nan_scales[0, 0]) == 0xFF and not np.asarray(nan_codes).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", MODES)
def test_random_blocks_match_oracle(dtype, rounding, rng):
    # Random magnitudes over the dtype's whole exponent range, random signs.
    finfo = ml_dtypes.finfo(DTYPES[dtype])
    lo, hi = np.log2(float(finfo.smallest_subnormal)), np.log2(float(finfo.max)) - 3
    scale = np.exp2(rng.uniform(lo, hi, size=(400, 1)))
    x = (rng.standard_normal((400, 32)) * scale).astype(DTYPES[dtype])
    codes, scales = formats.quantize_blocks(jnp.asarray(x), rounding)
    want_codes, want_scales = oracle.quantize(x, rounding)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)
    np.testing.assert_array_equal(np.asarray(codes), want_codes)


@given(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
             min_size=32, max_size=32),
    st.sampled_from(MODES),
)
def test_hypothesis_float32_blocks(values, rounding):
    x = np.array(values, np.float32)[None]
    codes, scales = formats.quantize_blocks(jnp.asarray(x), rounding)
    want_codes, want_scales = oracle.quantize(x, rounding)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)
    np.testing.assert_array_equal(np.asarray(codes), want_codes)


@given(st.lists(st.integers(0, 0xFFFF), min_size=32, max_size=32),
       st.sampled_from(["float16", "bfloat16"]), st.sampled_from(MODES))
def test_hypothesis_16bit_patterns(bit_patterns, dtype, rounding):
    """Any 16-bit pattern (NaN, Inf, subnormals included) as float16 / bfloat16."""
    x = np.array(bit_patterns, np.uint16).view(DTYPES[dtype])[None]
    codes, scales = formats.quantize_blocks(jnp.asarray(x), rounding)
    want_codes, want_scales = oracle.quantize(x, rounding)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)
    np.testing.assert_array_equal(np.asarray(codes), want_codes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dequantize_is_exact(dtype, rng):
    codes = rng.integers(0, 16, size=(64, 64), dtype=np.uint8)
    scales = rng.integers(0, 255, size=(64, 2), dtype=np.uint8)  # includes 0 and 254, no NaN
    scales[0, 0], scales[1, 1], scales[2, 0] = 0, 254, 0xFF
    got = np.asarray(formats.dequantize_codes(jnp.asarray(codes), jnp.asarray(scales), getattr(jnp, dtype)))
    with np.errstate(over="ignore"):  # 6 * 2**127 overflows float32 (and much less float16): Inf
        want = oracle.dequantize(codes, scales).astype(DTYPES[dtype])  # numpy rounds to nearest even
    np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))
    np.testing.assert_array_equal(np.signbit(got.astype(np.float64)), np.signbit(want.astype(np.float64)))


def test_f16_bits_exact_including_subnormals():
    h = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = np.asarray(formats.f32_bits(jnp.asarray(h)))
    want = h.astype(np.float32).view(np.uint32)
    finite = np.isfinite(h)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.all(np.isnan(got[~np.isfinite(h) & np.isnan(h)].view(np.float32)))


def test_nibble_order_low_first():
    packed = formats.pack_nibbles(jnp.asarray(np.array([[1, 2, 15, 8]], np.uint8)))
    assert list(np.asarray(packed)[0]) == [0x21, 0x8F]
    np.testing.assert_array_equal(np.asarray(formats.unpack_nibbles(packed)), [[1, 2, 15, 8]])


def test_e8m0_to_float32():
    b = np.arange(256, dtype=np.uint8)
    got = np.asarray(formats.e8m0_to_float32(jnp.asarray(b)))
    np.testing.assert_array_equal(got[:255], np.exp2(np.arange(255) - 127.0).astype(np.float32))
    assert np.isnan(got[255])


def test_parse_rounding_errors():
    with pytest.raises(ValueError, match="rounding='nearest' is not a rounding mode"):
        formats.parse_rounding("nearest")
