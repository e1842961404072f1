"""rounding="compressed_tensors" against the real compressed-tensors library, bit for bit.

The library's MXFP4 weight path on CPU is: per-32-group amin/amax in the weight
dtype -> ``calculate_qparams`` (the float scale, in the weight dtype) ->
``MXFP4PackedCompressor.compress`` (``weight_packed`` and the uint8
``weight_scale`` that end up in a checkpoint). We call exactly those and
compare with our CPU custom call and the jnp reference.

Blocks where the library itself produces undefined output are excluded from
the comparison and checked against our documented result instead: any NaN or
Inf, or amax >= 1.75 * 2**127 (float16: >= 57344), where its bit trick
overflows to an infinite scale.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_mxfp4
from jax_mxfp4 import reference

torch = pytest.importorskip("torch", reason="the compressed-tensors comparison needs torch (pip install '.[test]')")
ct = pytest.importorskip("compressed_tensors", reason="needs compressed-tensors==0.20.0 (pip install '.[test]')")
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

torch.set_num_threads(2)
SCHEME = preset_name_to_scheme("MXFP4A16", ["Linear"])
NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OVERFLOW_AMAX = {"float32": 1.75 * 2.0**127, "bfloat16": 1.75 * 2.0**127, "float16": 57344.0}
MAX_BYTE = {"float32": 252, "bfloat16": 252, "float16": 140}
CHUNK = 1 << 17  # blocks per library call: bounds peak memory


def to_torch(x: np.ndarray, dtype: str) -> "torch.Tensor":
    width = {"float32": np.uint32, "bfloat16": np.uint16, "float16": np.uint16}[dtype]
    bits = torch.from_numpy(np.ascontiguousarray(x).view(width).astype(np.int64))
    raw = bits.to(torch.int32) if dtype == "float32" else bits.to(torch.int16)
    return raw.view(TORCH[dtype])


@torch.no_grad()
def library_quantize(x: np.ndarray, dtype: str):
    """(packed uint8[rows, K/2], scale bytes uint8[rows, K/32]) as compressed-tensors writes them."""
    packed, scales = [], []
    for start in range(0, x.shape[0], CHUNK):
        w = to_torch(x[start:start + CHUNK], dtype)
        groups = w.unflatten(-1, (-1, 32))
        scale, _ = calculate_qparams(torch.amin(groups, dim=-1), torch.amax(groups, dim=-1), SCHEME.weights)
        zero_point = torch.zeros(scale.shape, dtype=SCHEME.weights.zp_dtype)
        out = MXFP4PackedCompressor.compress(
            {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}, SCHEME)
        packed.append(out["weight_packed"].numpy())
        scales.append(out["weight_scale"].numpy())
    return np.concatenate(packed), np.concatenate(scales)


def undefined_blocks(x: np.ndarray, dtype: str) -> np.ndarray:
    """[rows, K/32] mask of blocks whose library output is undefined (see module docstring)."""
    with np.errstate(invalid="ignore"):  # NaN payloads
        blocks = x.astype(np.float64).reshape(x.shape[0], -1, 32)
        amax = np.max(np.abs(blocks), axis=-1)
    return ~np.isfinite(amax) | (amax >= OVERFLOW_AMAX[dtype])


def wide_random(rng, rows, k, dtype):
    finfo = ml_dtypes.finfo(NP[dtype])
    lo, hi = np.log2(float(finfo.smallest_subnormal)), np.log2(float(finfo.max))
    scale = np.exp2(rng.uniform(lo, hi, size=(rows, k // 32, 1)))
    with np.errstate(over="ignore"):
        x = (rng.standard_normal((rows, k // 32, 32)) * scale).astype(NP[dtype])
    # A tenth of the rows: raw bit patterns (NaN, Inf, subnormals, ...).
    width = np.dtype(NP[dtype]).itemsize * 8
    raw_rows = rows // 10
    bits = rng.integers(0, 2**width, size=(raw_rows, k), dtype=np.uint64).astype(f"uint{width}")
    x = x.reshape(rows, k)
    x[:raw_rows] = bits.view(NP[dtype])
    # Exact E2M1 decision boundaries: k/4 * 2^e and amax at significand 1.75.
    ties = rng.integers(0, 20, size=(rows // 10, k)).astype(np.float64) / 4
    ties *= np.exp2(rng.integers(-20, 20, size=(rows // 10, 1)))
    with np.errstate(over="ignore"):  # float16 overflows to Inf: an undefined block, fine
        x[raw_rows:2 * raw_rows] = ties.astype(NP[dtype])
    return x


def assert_ours_equal_library(x, dtype):
    lib_packed, lib_scales = library_quantize(x, dtype)
    ours_packed, ours_scales = jax.jit(
        lambda v: jax_mxfp4.quantize_mxfp4(v, rounding="compressed_tensors"))(jnp.asarray(x))
    ref_packed, ref_scales = reference.quantize_reference(jnp.asarray(x), rounding="compressed_tensors")
    ours_packed, ours_scales = np.asarray(ours_packed), np.asarray(ours_scales)
    np.testing.assert_array_equal(ours_packed, np.asarray(ref_packed))
    np.testing.assert_array_equal(ours_scales, np.asarray(ref_scales))

    defined = ~undefined_blocks(x, dtype)
    np.testing.assert_array_equal(ours_scales[defined], lib_scales[defined])
    defined_bytes = np.repeat(defined, 16, axis=1)
    np.testing.assert_array_equal(ours_packed[defined_bytes], lib_packed[defined_bytes])
    return defined


def test_one_million_bfloat16_blocks(rng):
    x = wide_random(rng, 1 << 14, 64 * 32, "bfloat16")
    assert x.size // 32 >= 1_000_000
    defined = assert_ours_equal_library(x, "bfloat16")
    assert defined.sum() > 900_000


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_random_blocks(dtype, rng):
    x = wide_random(rng, 1 << 12, 64 * 32, dtype)  # 262,144 blocks
    assert_ours_equal_library(x, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_16bit_pattern_as_block_amax(dtype, rng):
    """Each 16-bit pattern heads a block whose other 31 elements are smaller in magnitude."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(NP[dtype])
    with np.errstate(invalid="ignore", over="ignore"):  # NaN patterns
        head = patterns.astype(np.float64)
        rest = head[:, None] * rng.uniform(-1, 1, size=(head.size, 31))
        x = np.concatenate([head[:, None], rest], axis=1).astype(NP[dtype])
    x[:, 0] = patterns  # keep the exact pattern (incl. NaN payloads, -0.0)
    assert_ours_equal_library(x, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_special_values(dtype):
    finfo = ml_dtypes.finfo(NP[dtype])
    tiny = float(finfo.smallest_subnormal)
    rows = [
        [0.0] * 32,
        [-0.0] * 32,
        [0.0, -0.0, 1.0, -1.0] * 8,
        [-0.1, 6.0] + [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0] * 3 + [-0.0] * 6,
        [tiny, -tiny] * 16,
        [-tiny] + [1.0e3] + [0.0] * 30,  # a negative whose quotient underflows to -0.0
        [float(finfo.smallest_normal)] * 32,
        [1.75 * 2.0**e for e in range(-16, 16)],
        [1.7499 * 2.0**e for e in range(-16, 16)],
        [float(finfo.max) / 2] + [1.0] * 31,
    ]
    x = np.array(rows, np.float64).astype(NP[dtype])
    assert_ours_equal_library(x, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_overflowing_blocks_saturate_instead_of_library_garbage(dtype):
    big = float(ml_dtypes.finfo(NP[dtype]).max)
    x = np.array([[big, -big * 0.9, 1.0] + [0.5] * 29], np.float64).astype(NP[dtype])
    assert undefined_blocks(x, dtype).all()
    packed, scales = jax_mxfp4.quantize_mxfp4(jnp.asarray(x), rounding="compressed_tensors")
    assert int(scales[0, 0]) == MAX_BYTE[dtype]  # the largest byte the library writes for valid blocks
    values = np.asarray(jax_mxfp4.dequantize_mxfp4(packed, scales, dtype=jnp.dtype(dtype)), np.float64)
    assert np.all(np.isfinite(values))
    assert values[0, 0] == 6.0 * 2.0 ** (MAX_BYTE[dtype] - 127) and values[0, 1] < 0
    nan_block = np.array([[np.nan] + [1.0] * 31], np.float64).astype(NP[dtype])
    _, scales = jax_mxfp4.quantize_mxfp4(jnp.asarray(nan_block), rounding="compressed_tensors")
    assert int(scales[0, 0]) == 0xFF


def test_library_decompression_equals_our_dequantization():
    """All 16 codes x every scale byte but NaN: the library's bf16 decompression == ours."""
    codes = np.tile(np.arange(16, dtype=np.uint8), 255 * 2)[None, :].reshape(255, 32)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    scales = np.arange(255, dtype=np.uint8)[:, None]
    out = MXFP4PackedCompressor.decompress(
        {"weight_packed": torch.from_numpy(packed), "weight_scale": torch.from_numpy(scales)}, SCHEME)
    lib = out["weight"].to(torch.float32).numpy()
    ours = np.asarray(jax_mxfp4.dequantize_mxfp4(jnp.asarray(packed), jnp.asarray(scales), dtype=jnp.bfloat16),
                      np.float32)
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(lib))
    np.testing.assert_array_equal(ours, lib)
