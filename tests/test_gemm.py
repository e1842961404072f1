"""mxfp4_matmul / mxfp4_linear on CPU against the reference, within the documented tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp4
from jax_mxfp4 import reference

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def random_weights(rng, n, k, rounding="floor"):
    w = jnp.asarray(rng.standard_normal((n, k)) * np.exp2(rng.integers(-6, 3, size=(n, 1))), jnp.float32)
    return reference.quantize_reference(w, rounding=rounding)


def assert_close_to_reference(y, x, wp, ws, **kwargs):
    want = reference.matmul_reference(x, wp, ws, **kwargs)
    assert y.shape == want.shape and y.dtype == want.dtype
    xq = reference.fake_quantize_reference(x, rounding=kwargs.get("activation_rounding", "floor"))
    tol = np.asarray(reference.matmul_tolerance(xq if kwargs.get("activation_format") else x, wp, ws, y.dtype))
    err = np.abs(np.asarray(y, np.float64) - np.asarray(want, np.float64))
    assert np.all(np.isfinite(np.asarray(y, np.float64)))
    assert np.all(err <= tol), f"max excess {np.max(err - tol)}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (7, 31, 64), (33, 127, 96), (129, 200, 160), (16, 128, 4096)])
def test_cpu_matmul_matches_reference(dtype, m, n, k, rng):
    wp, ws = random_weights(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), DTYPES[dtype])
    y = jax.jit(lambda v: jax_mxfp4.mxfp4_matmul(v, wp, ws, kernel="cpu"))(x)
    assert_close_to_reference(y, x, wp, ws)


@pytest.mark.parametrize("kernel", ["cpu", "xla"])
def test_w4a4_matches_fake_quantized_reference(kernel, rng):
    wp, ws = random_weights(rng, 48, 128)
    x = jnp.asarray(rng.standard_normal((2, 5, 128)), jnp.bfloat16)
    for rounding in ["floor", "rceil"]:
        y = jax_mxfp4.mxfp4_matmul(x, wp, ws, activation_format="mxfp4", activation_rounding=rounding,
                                   kernel=kernel)
        assert_close_to_reference(y, x, wp, ws, activation_format="mxfp4", activation_rounding=rounding)


def test_xla_kernel_matches_reference(rng):
    wp, ws = random_weights(rng, 40, 96)
    x = jnp.asarray(rng.standard_normal((3, 96)), jnp.float32)
    y = jax_mxfp4.mxfp4_matmul(x, wp, ws, kernel="xla")
    assert_close_to_reference(y, x, wp, ws)


def test_prepare_and_linear_with_bias(rng):
    wp, ws = random_weights(rng, 24, 64)
    bias = jnp.asarray(rng.standard_normal(24), jnp.bfloat16)
    prepared = jax_mxfp4.prepare_weights(wp, ws, activation_dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    y = jax.jit(jax_mxfp4.mxfp4_linear)(x, prepared, bias)
    want = (reference.matmul_reference(x, wp, ws, out_dtype=jnp.float32) + bias.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)


def test_vmap_over_activations_and_weights(rng):
    wp, ws = random_weights(rng, 16, 64)
    x = jnp.asarray(rng.standard_normal((4, 3, 64)), jnp.float32)
    f = lambda v: jax_mxfp4.mxfp4_matmul(v, wp, ws, kernel="cpu")  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), np.asarray(f(x)))
    # Batched weights (e.g. experts): one GEMM per element.
    wps = jnp.stack([wp, wp[::-1]])
    wss = jnp.stack([ws, ws[::-1]])
    g = lambda a, b: jax_mxfp4.mxfp4_matmul(x[0], a, b, kernel="cpu")  # noqa: E731
    got = jax.vmap(g)(wps, wss)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(g(wps[1], wss[1])))


def test_lowering_is_a_custom_call(rng):
    wp, ws = random_weights(rng, 8, 32)
    text = jax.jit(lambda v: jax_mxfp4.mxfp4_matmul(v, wp, ws, kernel="cpu")).lower(
        jnp.zeros((2, 32), jnp.bfloat16)).as_text()
    assert "jax_mxfp4_gemm" in text


def test_bad_inputs_raise_clear_errors(rng):
    wp, ws = random_weights(rng, 8, 64)
    x = jnp.zeros((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"w_scales has shape \(8, 3\) but w_packed \(8, 32\) needs linear scales of shape \(8, 2\)"):
        jax_mxfp4.mxfp4_matmul(x, wp, jnp.zeros((8, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"w_packed has shape \(8, 32\), i.e. K=64, but x has K=96"):
        jax_mxfp4.mxfp4_matmul(jnp.zeros((2, 96), jnp.bfloat16), wp, ws)
    with pytest.raises(ValueError, match="w_packed has dtype int8 but must be uint8"):
        jax_mxfp4.mxfp4_matmul(x, wp.astype(jnp.int8), ws)
    with pytest.raises(ValueError, match="x has dtype int8 but must be one of"):
        jax_mxfp4.mxfp4_matmul(x.astype(jnp.int8), wp, ws)
    with pytest.raises(ValueError, match="K=48 is not a multiple of 32"):
        jax_mxfp4.mxfp4_matmul(jnp.zeros((2, 48), jnp.bfloat16), wp, ws)
    with pytest.raises(ValueError, match="activation_format='nvfp4'"):
        jax_mxfp4.mxfp4_matmul(x, wp, ws, activation_format="nvfp4")
    with pytest.raises(ValueError, match="w_packed must be 2-D"):
        jax_mxfp4.mxfp4_matmul(x, wp[None], ws)
    with pytest.raises(ValueError, match="needs linear scales"):
        jax_mxfp4.dequantize_mxfp4(wp, ws[:, :1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_xla_fast_dequantize_is_exact_for_normal_values(dtype, rng):
    """The xla kernel's dequantization equals the reference wherever values are >= 2**-126."""
    from jax_mxfp4.kernels.xla import dequantize_fast

    packed = jnp.asarray(rng.integers(0, 256, size=(64, 128), dtype=np.uint8))
    scales = rng.integers(2, 255, size=(64, 8), dtype=np.uint8)
    scales[0, :] = [2, 3, 127, 200, 252, 253, 254, 0xFF]
    scales = jnp.asarray(scales)
    got = np.asarray(dequantize_fast(packed, scales, DTYPES[dtype]).astype(jnp.float32))
    want = np.asarray(reference.dequantize_reference(packed, scales, dtype=DTYPES[dtype]).astype(jnp.float32))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
