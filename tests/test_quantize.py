"""The quantize primitive's CPU handler, bit-exact against the reference."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_mxfp4
from jax_mxfp4 import layout, reference

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MODES = ["floor", "rceil", "compressed_tensors"]
LAYOUTS = ["linear", "swizzled_128x4"]


def wide_random(rng, shape, dtype):
    """Random values over the dtype's exponent range (one magnitude per 32-block), random signs,
    plus raw random bit patterns (NaN/Inf/subnormals) in a tenth of the blocks."""
    np_dtype = jnp.dtype(dtype).type if dtype != jnp.bfloat16 else ml_dtypes.bfloat16
    finfo = ml_dtypes.finfo(np_dtype)
    lo, hi = np.log2(float(finfo.smallest_subnormal)), np.log2(float(finfo.max)) - 3
    k = shape[-1]
    blocks = int(np.prod(shape)) // 32
    scale = np.exp2(rng.uniform(lo, hi, size=(blocks, 1)))
    x = (rng.standard_normal((blocks, 32)) * scale).astype(np_dtype)
    raw = rng.random(blocks) < 0.1
    width = np.dtype(np_dtype).itemsize * 8
    bits = rng.integers(0, 2**width, size=(int(raw.sum()), 32), dtype=np.uint64).astype(f"uint{width}")
    x[raw] = bits.view(np_dtype)
    return x.reshape(*shape[:-1], k)


def assert_quantize_matches(x, scale_layout, rounding):
    got = jax.jit(lambda v: jax_mxfp4.quantize_mxfp4(v, scale_layout=scale_layout, rounding=rounding))(x)
    want = reference.quantize_reference(jnp.asarray(x), scale_layout=scale_layout, rounding=rounding)
    assert_outputs_equal(got, want, f"{x.shape} {x.dtype} {scale_layout} {rounding}")


def assert_outputs_equal(got, want, context: str):
    """(packed, scales) from a handler vs the reference: same shapes, dtypes and bytes."""
    for g, w, name in zip(got, want, ("packed", "scales")):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name} {context}"
        np.testing.assert_array_equal(g, w, err_msg=f"{name} {context}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", MODES)
@pytest.mark.parametrize("scale_layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 32), (31, 64), (127, 96), (128, 128), (129, 160), (2, 100, 224)])
def test_cpu_handler_bit_exact(dtype, rounding, scale_layout, shape, rng):
    assert_quantize_matches(wide_random(rng, shape, DTYPES[dtype]), scale_layout, rounding)


@pytest.mark.parametrize("rounding", MODES)
def test_million_random_blocks(rounding, rng):
    """>= 1e6 random 32-blocks per mode through the CPU handler, bit for bit."""
    x = wide_random(rng, (1024 * 1024 // 64, 64 * 32), jnp.bfloat16)
    assert x.size // 32 >= 1_000_000
    assert_quantize_matches(x, "linear", rounding)


def special_value_rows(dtype: str, rows: int, k: int, seed: int) -> np.ndarray:
    """``rows`` random rows of special values (zeros of both signs, NaN, +-Inf, the
    dtype's subnormal/normal extremes, every E2M1 tie) plus an all-zero and an
    all-negative-zero row."""
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype).type
    finfo = ml_dtypes.finfo(np_dtype)
    specials = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), float(finfo.smallest_subnormal),
                -float(finfo.smallest_subnormal), float(finfo.smallest_normal), float(finfo.max), -float(finfo.max),
                0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -0.1]
    rng = np.random.default_rng(seed)
    values = [rng.choice(specials, size=k) for _ in range(rows)] + [[0.0] * k, [-0.0] * k]
    return np.array(values, np.float64).astype(np_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_through_handler(dtype):
    x = special_value_rows(dtype, rows=64, k=32, seed=1)
    for rounding in MODES:
        for scale_layout in LAYOUTS:
            assert_quantize_matches(x, scale_layout, rounding)


@pytest.mark.parametrize("m", [1, 31, 127, 128, 129, 200])
@pytest.mark.parametrize("k", [32, 160, 4096])
def test_eval_shape(m, k):
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    packed, scales = jax.eval_shape(lambda v: jax_mxfp4.quantize_mxfp4(v), x)
    assert packed.shape == (m, k // 2) and packed.dtype == jnp.uint8
    assert scales.shape == (m, k // 32) and scales.dtype == jnp.uint8
    packed, scales = jax.eval_shape(lambda v: jax_mxfp4.quantize_mxfp4(v, scale_layout="swizzled_128x4"), x)
    assert scales.shape == layout.scale_shape(m, k, "swizzled_128x4")
    assert scales.shape == (-(-m // 128) * 128, -(-(k // 32) // 4) * 4)


def test_swizzled_leading_dims_fold_into_rows():
    x = jax.ShapeDtypeStruct((3, 70, 64), jnp.float16)
    _, scales = jax.eval_shape(lambda v: jax_mxfp4.quantize_mxfp4(v, scale_layout="swizzled_128x4"), x)
    assert scales.shape == (256, 4)  # 210 rows -> 256


def test_lowering_is_a_custom_call():
    text = jax.jit(jax_mxfp4.quantize_mxfp4).lower(jnp.zeros((4, 64), jnp.bfloat16)).as_text()
    assert "jax_mxfp4_quantize" in text and "custom_call" in text


@pytest.mark.parametrize("scale_layout", LAYOUTS)
def test_vmap(scale_layout, rng):
    x = jnp.asarray(wide_random(rng, (3, 40, 64), jnp.bfloat16))
    f = lambda v: jax_mxfp4.quantize_mxfp4(v, scale_layout=scale_layout)  # noqa: E731
    got = jax.vmap(f)(x)
    want = [jnp.stack(a) for a in zip(*(f(x[i]) for i in range(3)))]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # vmap over a non-leading axis
    got_t = jax.vmap(f, in_axes=1)(jnp.swapaxes(x, 0, 1))
    for g, w in zip(got_t, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"shape \(4, 48\): its last dimension K=48 is not a multiple of 32.*pad K to 64"):
        jax_mxfp4.quantize_mxfp4(jnp.zeros((4, 48), jnp.bfloat16))
    with pytest.raises(ValueError, match="x has dtype int32 but must be one of"):
        jax_mxfp4.quantize_mxfp4(jnp.zeros((4, 64), jnp.int32))
    with pytest.raises(ValueError, match="scale_layout='blocked' is not a scale layout"):
        jax_mxfp4.quantize_mxfp4(jnp.zeros((4, 64), jnp.bfloat16), scale_layout="blocked")
    with pytest.raises(ValueError, match="rounding='even' is not a rounding mode"):
        jax_mxfp4.quantize_mxfp4(jnp.zeros((4, 64), jnp.bfloat16), rounding="even")
    with pytest.raises(ValueError, match="at least one dimension"):
        jax_mxfp4.quantize_mxfp4(jnp.zeros((), jnp.bfloat16))
    # Errors are raised at trace time, under jit too.
    with pytest.raises(ValueError, match="K=48 is not a multiple of 32"):
        jax.jit(jax_mxfp4.quantize_mxfp4).lower(jnp.zeros((2, 48), jnp.float32))


# ---------------------------------------------------------------------------
# CUDA kernel (csrc/quantize.cu): run on the device machine.


def reference_on_cpu(x, scale_layout, rounding):
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        out = reference.quantize_reference(jax.device_put(jnp.asarray(x), cpu), scale_layout=scale_layout,
                                           rounding=rounding)
    return [np.asarray(a) for a in out]


def assert_cuda_matches(x, scale_layout, rounding):
    x_gpu = jax.device_put(jnp.asarray(x), jax.devices("gpu")[0])
    f = jax.jit(lambda v: jax_mxfp4.quantize_mxfp4(v, scale_layout=scale_layout, rounding=rounding))
    assert "jax_mxfp4_quantize" in f.lower(x_gpu).as_text()
    assert_outputs_equal(f(x_gpu), reference_on_cpu(x, scale_layout, rounding),
                         f"{x.shape} {x.dtype} {scale_layout} {rounding}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", MODES)
@pytest.mark.parametrize("scale_layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 32), (1, 8192), (127, 2880), (129, 160), (200, 4128), (2, 100, 224)])
def test_cuda_kernel_bit_exact(dtype, rounding, scale_layout, shape, rng):
    assert_cuda_matches(wide_random(rng, shape, DTYPES[dtype]), scale_layout, rounding)


@pytest.mark.gpu
@pytest.mark.parametrize("rounding", MODES)
def test_cuda_million_random_blocks(rounding, rng):
    x = wide_random(rng, (1024 * 1024 // 64, 64 * 32), jnp.bfloat16)
    assert_cuda_matches(x, "linear", rounding)
    assert_cuda_matches(x[:4000], "swizzled_128x4", rounding)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_special_values(dtype):
    x = special_value_rows(dtype, rows=300, k=64, seed=2)
    for rounding in MODES:
        for scale_layout in LAYOUTS:
            assert_cuda_matches(x, scale_layout, rounding)


@pytest.mark.gpu
def test_cuda_vmap_and_padding_written_by_kernel(rng):
    x = jnp.asarray(wide_random(rng, (3, 70, 96), jnp.bfloat16))
    f = lambda v: jax_mxfp4.quantize_mxfp4(v, scale_layout="swizzled_128x4")  # noqa: E731
    got = jax.jit(jax.vmap(f))(x)
    for i in range(3):
        want = reference_on_cpu(np.asarray(x[i]), "swizzled_128x4", "floor")
        np.testing.assert_array_equal(np.asarray(got[1][i]), want[1])
    # The kernel writes the zero padding itself (XLA hands it uninitialized memory).
    for m in (1, 127, 129):
        _, s = jax.jit(f)(jnp.asarray(wide_random(rng, (m, 160), jnp.bfloat16)))
        flat = np.asarray(s).reshape(-1)
        padding = np.ones(flat.size, bool)
        padding[layout.swizzled_offsets_table(m, 160).reshape(-1)] = False
        assert not flat[padding].any()
